/* DMA address layer: identity for off/passthrough, IOVAs + a vIOMMU driver otherwise (see dma.h). */
#include "dma.h"

static const char *const mode_names[] = {
    [IOMMU_OFF] = "off",
    [IOMMU_PASSTHROUGH] = "passthrough",
    [IOMMU_STRICT] = "strict",
    [IOMMU_LAZY] = "lazy",
};

bool iommu_mode_parse(const char *s, enum iommu_mode *out)
{
    for (size_t i = 0; i < ARRAY_SIZE(mode_names); i++) {
        if (strcmp(s, mode_names[i]) == 0) {
            *out = (enum iommu_mode)i;
            return true;
        }
    }
    return false;
}

const char *iommu_mode_name(enum iommu_mode mode)
{
    return (size_t)mode < ARRAY_SIZE(mode_names) ? mode_names[mode] : "?";
}

const char *iommu_mode_param(enum iommu_mode dflt, enum iommu_mode *out)
{
    char mode[16];
    *out = dflt;
    if (cmdline_get("iovmm.iommu", mode, sizeof(mode)) && !iommu_mode_parse(mode, out))
        return "iovmm.iommu must be off, passthrough, strict or lazy";
    return NULL;
}

bool dma_fail(struct dma_ctx *ctx, const char *why)
{
    if (!ctx->error)
        ctx->error = why;
    return false;
}

static bool parse_word(const char *key, const char *const *words, size_t n, int *out)
{
    char val[16];
    if (!cmdline_get(key, val, sizeof(val)))
        return true; /* absent: keep the default */
    for (size_t i = 0; i < n; i++) {
        if (strcmp(val, words[i]) == 0) {
            *out = (int)i;
            return true;
        }
    }
    return false;
}

static const char *read_params(struct dma_ctx *ctx, enum viommu_kind *kind)
{
    static const char *const kinds[] = {"auto", "virtio", "vtd"};
    static const char *const ats[] = {"auto", "on", "off"};
    static const char *const flush[] = {"domain", "pages"};
    int k = VIOMMU_AUTO, a = ATS_AUTO, f = LAZY_FLUSH_DOMAIN;
    if (!parse_word("iovmm.viommu", kinds, ARRAY_SIZE(kinds), &k))
        return "iovmm.viommu must be auto, virtio or vtd";
    if (!parse_word("iovmm.ats", ats, ARRAY_SIZE(ats), &a))
        return "iovmm.ats must be auto, on or off";
    if (!parse_word("iovmm.lazy_flush", flush, ARRAY_SIZE(flush), &f))
        return "iovmm.lazy_flush must be domain or pages";
    /* Linux's flush queue holds 256 IOVAs per CPU. */
    if (cmdline_u64("iovmm.lazy_batch", 256, &ctx->lazy_batch) || ctx->lazy_batch == 0 ||
        ctx->lazy_batch > LAZY_BATCH_MAX)
        return "iovmm.lazy_batch must be 1..4096";
    *kind = (enum viommu_kind)k;
    ctx->ats_mode = (enum ats_mode)a;
    ctx->lazy_flush = (enum lazy_flush)f;
    return NULL;
}

static const char *unsupported(struct dma_ctx *ctx, const char *why)
{
    ctx->unsupported = true;
    return why;
}

static const struct iommu_driver *pick_driver(enum viommu_kind kind)
{
    if (kind != VIOMMU_VTD && virtio_iommu_driver.present())
        return &virtio_iommu_driver;
    if (kind != VIOMMU_VIRTIO && vtd_driver.present())
        return &vtd_driver;
    return NULL;
}

const char *dma_init(struct dma_ctx *ctx, const struct pci_dev *pci, enum iommu_mode mode)
{
    *ctx = (struct dma_ctx){.mode = mode, .requested = mode, .pci = pci, .gran = 4096};
    enum viommu_kind kind;
    const char *err = read_params(ctx, &kind);
    if (err) {
        ctx->usage = true;
        return err;
    }
    ctx->ats_pos = pci_find_ext_cap(pci, PCI_EXT_CAP_ID_ATS);
    if (mode == IOMMU_OFF)
        return ctx->ats_mode == ATS_ON ? unsupported(ctx, "iovmm.ats=on needs a vIOMMU mode (iovmm.iommu)") : NULL;
    ctx->drv = pick_driver(kind);
    if (!ctx->drv)
        return unsupported(ctx, kind == VIOMMU_VIRTIO ? "no virtio-iommu (1af4:1057) on PCI bus 0"
                                : kind == VIOMMU_VTD  ? "no VT-d remapping unit (DMAR table or 0xfed90000)"
                                                      : "no vIOMMU: no virtio-iommu on PCI bus 0 and no VT-d unit");
    static struct dma_range pending[LAZY_BATCH_MAX];
    ctx->pending = pending;
    err = ctx->drv->attach(ctx);
    if (err)
        return err;
    if (ctx->ats_mode == ATS_ON && !ctx->ats_enabled)
        return unsupported(ctx, ctx->ats_note ? ctx->ats_note : "iovmm.ats=on but the device has no ATS capability");
    return NULL;
}

const char *dma_exit_status(const struct dma_ctx *ctx, int *code)
{
    *code = ctx->usage ? EXIT_USAGE : ctx->unsupported ? EXIT_UNSUPPORTED : EXIT_FAILED;
    return ctx->usage ? "error" : ctx->unsupported ? "unsupported" : "failed";
}

int report_early_exit(const char *test, const char *status, const char *why, int code, struct dma_ctx *dma)
{
    struct result r;
    result_begin(&r, test, status);
    result_str(&r, "error", why);
    if (dma)
        dma_report(dma, &r);
    result_emit(&r);
    return code;
}

int report_dma_setup_error(const char *test, const char *why, struct dma_ctx *dma)
{
    int code;
    const char *status = dma_exit_status(dma, &code);
    return report_early_exit(test, status, why, code, dma);
}

void result_begin_run(struct result *r, const char *test, const char *why, enum iommu_mode iommu)
{
    result_begin(r, test, why ? "failed" : "ok");
    if (why)
        result_str(r, "error", why);
    result_str(r, "iommu", iommu_mode_name(iommu));
}

/* Serialises the driver calls of every vCPU (see dma.h). */
struct spinlock iommu_lock;

/* Takes iommu_lock, counting the cycles spent waiting for it (another vCPU's request). */
static void iommu_lock_take(struct dma_ctx *ctx)
{
    u64 t0 = rdtsc();
    spin_lock(&iommu_lock);
    ctx->lock_wait_cycles += rdtsc() - t0;
}

static const char *drv_map(struct dma_ctx *ctx, u64 iova, u64 pa, u64 size, u32 prot)
{
    if (ctx->drv->concurrent_sync)
        return ctx->drv->map(ctx, iova, pa, size, prot);
    iommu_lock_take(ctx);
    const char *err = ctx->drv->map(ctx, iova, pa, size, prot);
    spin_unlock(&iommu_lock);
    return err;
}

static const char *drv_unmap(struct dma_ctx *ctx, u64 iova, u64 size, bool sync)
{
    if (sync && ctx->drv->concurrent_sync)
        return ctx->drv->unmap_sync(ctx, iova, size);
    iommu_lock_take(ctx);
    const char *err = sync ? ctx->drv->unmap_sync(ctx, iova, size) : ctx->drv->unmap_deferred(ctx, iova, size);
    spin_unlock(&iommu_lock);
    return err;
}

static const char *drv_flush(struct dma_ctx *ctx)
{
    iommu_lock_take(ctx);
    const char *err = ctx->drv->flush(ctx, ctx->pending, ctx->npending);
    spin_unlock(&iommu_lock);
    return err;
}

static bool translated(const struct dma_ctx *ctx) { return ctx->mode == IOMMU_STRICT || ctx->mode == IOMMU_LAZY; }

static u32 dir_prot(enum dma_dir dir)
{
    return dir == DMA_TO_DEVICE ? IOMMU_PROT_READ
           : dir == DMA_FROM_DEVICE ? IOMMU_PROT_WRITE
                                    : IOMMU_PROT_READ | IOMMU_PROT_WRITE;
}

u64 dma_map(struct dma_ctx *ctx, const void *va, u64 len, enum dma_dir dir)
{
    u64 t0 = rdtsc();
    u64 pa = (u64)(uintptr_t)va; /* identity-mapped guest */
    if (len == 0 || pa + len < pa)
        return DMA_MAPPING_ERROR;
    u64 addr = pa;
    if (translated(ctx)) {
        u64 off = pa & (ctx->gran - 1), size = ALIGN_UP(off + len, ctx->gran);
        u64 iova = iova_alloc(ctx->iova, size);
        if (iova == IOVA_NONE) {
            dma_fail(ctx, "IOVA space exhausted");
            return DMA_MAPPING_ERROR;
        }
        const char *err = drv_map(ctx, iova, pa - off, size, dir_prot(dir));
        if (err) {
            dma_fail(ctx, err);
            iova_free(ctx->iova, iova, size);
            return DMA_MAPPING_ERROR;
        }
        addr = iova + off;
    }
    ctx->maps++;
    ctx->map_cycles += rdtsc() - t0;
    return addr;
}

u64 dma_guard_iova(struct dma_ctx *ctx, u64 size)
{
    if (!translated(ctx) || size == 0)
        return DMA_MAPPING_ERROR;
    u64 iova = iova_alloc(ctx->iova, size);
    return iova == IOVA_NONE ? DMA_MAPPING_ERROR : iova;
}

static void lazy_flush(struct dma_ctx *ctx)
{
    if (ctx->npending == 0)
        return;
    u64 t0 = rdtsc();
    const char *err = drv_flush(ctx);
    if (err) {
        dma_fail(ctx, err);
    } else {
        /* Only now may the IOVAs be handed out again. */
        for (u64 i = 0; i < ctx->npending; i++) {
            if (!iova_free(ctx->iova, ctx->pending[i].iova, ctx->pending[i].size))
                dma_fail(ctx, "IOVA free failed (double unmap or allocator full)");
        }
    }
    ctx->npending = 0;
    ctx->flushes++;
    ctx->flush_cycles += rdtsc() - t0;
}

void dma_unmap(struct dma_ctx *ctx, u64 dma_addr, u64 len, enum dma_dir dir)
{
    (void)dir;
    u64 t0 = rdtsc();
    if (translated(ctx)) {
        u64 off = dma_addr & (ctx->gran - 1), iova = dma_addr - off, size = ALIGN_UP(off + len, ctx->gran);
        if (ctx->mode == IOMMU_STRICT) {
            const char *err = drv_unmap(ctx, iova, size, true);
            if (err)
                dma_fail(ctx, err);
            else if (!iova_free(ctx->iova, iova, size))
                dma_fail(ctx, "IOVA free failed (double unmap or allocator full)");
        } else {
            const char *err = drv_unmap(ctx, iova, size, false);
            if (err)
                dma_fail(ctx, err);
            ctx->pending[ctx->npending++] = (struct dma_range){iova, size};
            if (ctx->npending >= ctx->lazy_batch)
                lazy_flush(ctx);
        }
    }
    ctx->unmaps++;
    ctx->unmap_cycles += rdtsc() - t0;
}

const char *dma_unmap_to_end(struct dma_ctx *ctx, u64 dma_addr, u64 len)
{
    if (ctx->mode != IOMMU_STRICT || ctx->drv != &virtio_iommu_driver) {
        dma_fail(ctx, "iovmm.unmap_to_end needs virtio-iommu in strict mode");
        return ctx->error;
    }
    u64 off = dma_addr & (ctx->gran - 1), iova = dma_addr - off, size = ALIGN_UP(off + len, ctx->gran);
    /* A size of 2^64 - iova: the UNMAP's virt_end = iova + size - 1 is u64 max (unsigned wrap). */
    const char *err = drv_unmap(ctx, iova, 0 - iova, true);
    if (err)
        dma_fail(ctx, err);
    else if (!iova_free(ctx->iova, iova, size))
        dma_fail(ctx, "IOVA free failed (double unmap or allocator full)");
    ctx->unmaps++;
    return ctx->error;
}

void dma_flush(struct dma_ctx *ctx)
{
    if (ctx->mode == IOMMU_LAZY)
        lazy_flush(ctx);
}

const char *dma_split(struct dma_ctx *parent, struct dma_ctx *child, u64 iova_bytes)
{
    *child = *parent;
    child->maps = child->unmaps = child->flushes = child->iommu_reqs = child->iommu_syncs = 0;
    child->map_cycles = child->unmap_cycles = child->flush_cycles = child->lock_wait_cycles = 0;
    child->npending = 0;
    child->error = NULL;
    if (!translated(parent))
        return NULL;
    child->iova = mem_alloc(sizeof(*child->iova), 64);
    child->pending = mem_alloc(sizeof(*child->pending) * LAZY_BATCH_MAX, 64);
    if (!child->iova || !child->pending)
        return "out of guest memory for a per-vCPU DMA context";
    u64 first = iova_alloc(parent->iova, iova_bytes);
    if (first == IOVA_NONE)
        return "the IOVA space has no room for a per-vCPU range";
    iova_init(child->iova, first, first + iova_bytes - 1, parent->gran);
    return NULL;
}

void dma_merge(struct dma_ctx *parent, const struct dma_ctx *child)
{
    parent->maps += child->maps;
    parent->unmaps += child->unmaps;
    parent->flushes += child->flushes;
    parent->iommu_reqs += child->iommu_reqs;
    parent->iommu_syncs += child->iommu_syncs;
    parent->map_cycles += child->map_cycles;
    parent->unmap_cycles += child->unmap_cycles;
    parent->flush_cycles += child->flush_cycles;
    parent->lock_wait_cycles += child->lock_wait_cycles;
    if (child->error)
        dma_fail(parent, child->error);
    if (!translated(parent) || child->iova == parent->iova || child->iova->n != 1)
        return;
    /* Nothing mapped any more: the range is one free run again, which goes back whole. */
    struct iova_range whole = child->iova->r[0];
    if (child->iova->in_use == 0 && !iova_free(parent->iova, whole.first, whole.last - whole.first + 1))
        dma_fail(parent, "returning a per-vCPU IOVA range failed");
}

void dma_report(struct dma_ctx *ctx, struct result *r)
{
    result_str(r, "iommu_mode", iommu_mode_name(ctx->mode));
    result_str(r, "viommu", ctx->drv ? ctx->drv->name : "none");
    result_u64(r, "maps", ctx->maps);
    result_u64(r, "unmaps", ctx->unmaps);
    result_u64(r, "flushes", ctx->flushes);
    result_u64(r, "iommu_reqs", ctx->iommu_reqs);
    result_u64(r, "iommu_syncs", ctx->iommu_syncs);
    result_u64(r, "map_cycles", ctx->map_cycles);
    result_u64(r, "unmap_cycles", ctx->unmap_cycles);
    result_u64(r, "flush_cycles", ctx->flush_cycles);
    result_u64(r, "lock_wait_cycles", ctx->lock_wait_cycles);
    if (ctx->mode == IOMMU_LAZY)
        result_u64(r, "lazy_batch", ctx->lazy_batch);
    if (ctx->iova)
        result_u64(r, "iova_in_use", ctx->iova->in_use);
    result_u64(r, "ats_cap", ctx->ats_pos != 0);
    result_u64(r, "ats", ctx->ats_enabled);
    if (ctx->ats_note && !ctx->ats_enabled)
        result_str(r, "ats_note", ctx->ats_note);
    if (ctx->drv && ctx->drv->report)
        ctx->drv->report(ctx, r);
}
