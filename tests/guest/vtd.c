/*
 * Intel VT-d driver (legacy mode, one remapping unit), polled, following what Linux's
 * drivers/iommu/intel does: root + context tables, a 3- or 4-level second-level page table for the
 * DMA domain (DID 2), pass-through context (TT=2, DID 1) for passthrough mode when ECAP.PT (else a
 * 1:1 page table of RAM), TT=1 when ATS is enabled on the endpoint; queued invalidation for every
 * flush, each batch closed by a wait descriptor with a status write that is polled. Strict: PSI
 * (+ device-TLB) + wait per unmap. Lazy: PTEs cleared at unmap, one domain-selective flush
 * (+ whole device-TLB) + wait per batch. Caching mode: a PSI + wait after every map, and lazy is
 * turned into strict (Linux: "IOMMU batching disallowed due to virtualization").
 */
#include "acpi.h"
#include "dma.h"

#define VTD_DEFAULT_BASE 0xfed90000ULL
#define MMIO_LIMIT 0x100000000ULL

#define R_VER 0x000
#define R_CAP 0x008
#define R_ECAP 0x010
#define R_GCMD 0x018
#define R_GSTS 0x01c
#define R_RTADDR 0x020
#define R_FSTS 0x034
#define R_IQH 0x080
#define R_IQT 0x088
#define R_IQA 0x090
#define R_IQER 0x0b0

#define G_TE (1u << 31)
#define G_SRTP (1u << 30)
#define G_WBF (1u << 27)
#define G_QIE (1u << 26)
#define G_IRE (1u << 25)
#define G_CFI (1u << 23)
#define G_LEVEL_BITS (G_TE | G_QIE | G_IRE | G_CFI)

#define FSTS_PFO (1u << 0)
#define FSTS_IQE (1u << 4)
#define FSTS_ICE (1u << 5)
#define FSTS_ITE (1u << 6)
#define FSTS_QI_ERRORS (FSTS_IQE | FSTS_ICE | FSTS_ITE)

#define CAP_RWBF(c) (((c) >> 4) & 1)
#define CAP_CM(c) (((c) >> 7) & 1)
#define CAP_SAGAW(c) (((c) >> 8) & 0x1f)
#define CAP_MGAW(c) ((u32)(((c) >> 16) & 0x3f) + 1)
#define CAP_FRO(c) ((((c) >> 24) & 0x3ff) * 16)
#define CAP_SLLPS_2M(c) (((c) >> 34) & 1)
#define CAP_PSI(c) (((c) >> 39) & 1)
#define CAP_NFR(c) ((u32)(((c) >> 40) & 0xff) + 1)
#define CAP_MAMV(c) ((u32)(((c) >> 48) & 0x3f))
#define CAP_DWD(c) (((c) >> 54) & 1)
#define CAP_DRD(c) (((c) >> 55) & 1)
#define CAP_ESRTPS(c) (((c) >> 63) & 1)
#define ECAP_C(e) ((e) & 1)
#define ECAP_QI(e) (((e) >> 1) & 1)
#define ECAP_DT(e) (((e) >> 2) & 1)
#define ECAP_PT(e) (((e) >> 6) & 1)
#define ECAP_DIT(e) (((e) >> 41) & 1)

#define TT_MULTI_LEVEL 0
#define TT_DEV_IOTLB 1
#define TT_PASS_THROUGH 2
#define DID_PASS_THROUGH 1
#define DID_DMA 2

#define PTE_R 1ULL
#define PTE_W 2ULL
#define PTE_PS (1ULL << 7)
#define PTE_ADDR 0x000ffffffffff000ULL
#define SZ_2M 0x200000ULL

#define QI_CC 1
#define QI_IOTLB 2
#define QI_DEVTLB 3
#define QI_WAIT 5
#define QI_GRAN(g) ((u64)(g) << 4) /* 1 global, 2 domain, 3 page/device */
#define QI_WAIT_SW (1ULL << 5)
#define QI_BUSY 1
#define QI_DONE 2
#define IQ_ENTRIES 256
#define QI_BATCH_MAX (IQ_ENTRIES - 2) /* room for the wait descriptor, and never a full ring */
#define MSI_FIRST 0xfee00000ULL
#define MSI_LAST 0xfeefffffULL

struct qi_desc {
    u64 lo, hi;
};

static struct {
    struct dma_ctx *ctx;
    u64 base, cap, ecap;
    u32 ver, gcmd; /* gcmd: shadow of the level-type command bits */
    bool from_dmar, coherent, cm, identity;
    u64 *root, *context, *pgd;
    int levels;
    u32 aw, did, tt;
    u16 sid, ats_qdep;
    struct qi_desc *iq;
    u32 iq_tail;
    u64 pt_pages;
} t;

static volatile u32 wait_status;
static struct qi_desc batch[QI_BATCH_MAX];
static u32 nbatch;
static struct iova_space space;
static char errbuf[224];

static u64 gpa(const volatile void *p) { return (u64)(uintptr_t)p; }
static u32 rd32(u32 off) { return mmio_read32(t.base + off); }

/* ------------------------------------------------------------------ discovery */

static u64 dmar_drhd_base(bool *found)
{
    u32 len;
    const u8 *dmar = acpi_find_table("DMAR", &len);
    *found = false;
    for (u32 off = 48; dmar && off + 16 <= len;) {
        u16 type, slen;
        memcpy(&type, dmar + off, 2);
        memcpy(&slen, dmar + off + 2, 2);
        if (slen < 4 || off + slen > len)
            break;
        if (type == 0 && slen >= 16) {
            u64 base;
            memcpy(&base, dmar + off + 8, 8);
            *found = true;
            return base;
        }
        off += slen;
    }
    return VTD_DEFAULT_BASE;
}

static bool unit_responds(u64 base)
{
    if (base == 0 || base > MMIO_LIMIT - 0x1000)
        return false;
    u32 ver = mmio_read32(base + R_VER);
    u64 cap = mmio_read64(base + R_CAP);
    return ver != 0 && ver != 0xffffffff && cap != 0 && cap != ~0ULL;
}

static bool vtd_present(void)
{
    bool dmar;
    return unit_responds(dmar_drhd_base(&dmar));
}

/* ------------------------------------------------------------------ registers */

static const char *wait_gsts(u32 bit, bool set, const char *what)
{
    u64 deadline = rdtsc() + ms_to_cycles(1000);
    while (((rd32(R_GSTS) & bit) != 0) != set) {
        if (rdtsc() > deadline) {
            snprintf(errbuf, sizeof(errbuf), "VT-d: GSTS.%s did not %s within 1 s after the GCMD write", what,
                     set ? "set" : "clear");
            return errbuf;
        }
        cpu_relax();
    }
    return NULL;
}

static const char *set_level(u32 bit, bool on, const char *what)
{
    t.gcmd = on ? t.gcmd | bit : t.gcmd & ~bit;
    mmio_write32(t.base + R_GCMD, t.gcmd);
    return wait_gsts(bit, on, what);
}

/* SRTP waits for RTPS to set; WBF waits for WBFS to clear (like Linux). */
static const char *one_shot(u32 bit, const char *what)
{
    mmio_write32(t.base + R_GCMD, t.gcmd | bit);
    return wait_gsts(bit, bit != G_WBF, what);
}

static void sync_entry(const volatile void *p)
{
    if (!t.coherent)
        clflush(p);
}

/* ------------------------------------------------------------------ queued invalidation */

static const char *qi_sync(void);

static const char *qi_queue(u64 lo, u64 hi)
{
    if (nbatch == QI_BATCH_MAX) {
        const char *err = qi_sync();
        if (err)
            return err;
    }
    batch[nbatch++] = (struct qi_desc){lo, hi};
    return NULL;
}

static const char *qi_error(u32 fsts)
{
    snprintf(errbuf, sizeof(errbuf), "VT-d invalidation queue error: FSTS=0x%x IQH=0x%llx IQT=0x%llx IQER=0x%llx", fsts,
             (unsigned long long)mmio_read64(t.base + R_IQH), (unsigned long long)mmio_read64(t.base + R_IQT),
             (unsigned long long)mmio_read64(t.base + R_IQER));
    return errbuf;
}

static const char *qi_wait(void)
{
    u64 deadline = rdtsc() + ms_to_cycles(10000); /* a hang detector, generous for a loaded host */
    for (u32 spin = 0; wait_status != QI_DONE; spin++) {
        /* The status is checked first: a unit that completes during the IQT write costs no FSTS read. */
        if ((spin & 63) == 63) {
            u32 fsts = rd32(R_FSTS);
            if (fsts & FSTS_QI_ERRORS)
                return qi_error(fsts);
        }
        if (rdtsc() > deadline)
            return "VT-d invalidation wait descriptor did not complete (status write) within 10 s";
        cpu_relax();
    }
    return NULL;
}

/* Appends the queued descriptors and a wait descriptor (status write), moves IQT, polls. */
static const char *qi_sync(void)
{
    wait_status = QI_BUSY;
    for (u32 i = 0; i < nbatch; i++) {
        t.iq[t.iq_tail] = batch[i];
        t.iq_tail = (t.iq_tail + 1) % IQ_ENTRIES;
    }
    t.iq[t.iq_tail] = (struct qi_desc){QI_WAIT | QI_WAIT_SW | ((u64)QI_DONE << 32), gpa(&wait_status)};
    t.iq_tail = (t.iq_tail + 1) % IQ_ENTRIES;
    t.ctx->iommu_reqs += nbatch + 1;
    t.ctx->iommu_syncs++;
    nbatch = 0;
    mb(); /* descriptors in memory before the tail moves */
    mmio_write32(t.base + R_IQT, t.iq_tail << 4);
    return qi_wait();
}

static u64 drain_bits(void) { return (CAP_DRD(t.cap) ? 1ULL << 7 : 0) | (CAP_DWD(t.cap) ? 1ULL << 6 : 0); }

static const char *q_iotlb_domain(u32 did)
{
    return qi_queue(QI_IOTLB | QI_GRAN(2) | drain_bits() | (u64)did << 16, 0);
}

/* Smallest m such that one naturally aligned block of 2^m pages covers [iova, iova + size). */
static u32 psi_mask(u64 iova, u64 size)
{
    u64 x = (iova >> 12) ^ ((iova + size - 1) >> 12);
    return x ? 64 - (u32)__builtin_clzll(x) : 0;
}

/* Page-selective IOTLB invalidation, or domain-selective when PSI is absent or AM > MAMV. */
static const char *q_iotlb_range(u64 iova, u64 size, bool leaf_only)
{
    u32 m = psi_mask(iova, size);
    if (!CAP_PSI(t.cap) || m > CAP_MAMV(t.cap))
        return q_iotlb_domain(t.did);
    u64 addr = iova & ~((4096ULL << m) - 1);
    return qi_queue(QI_IOTLB | QI_GRAN(3) | drain_bits() | (u64)t.did << 16, addr | (leaf_only ? 1ULL << 6 : 0) | m);
}

static const char *q_devtlb(u64 addr_with_size_bits, bool s)
{
    u64 lo = QI_DEVTLB | (u64)t.ats_qdep << 16 | (u64)t.sid << 32;
    if (ECAP_DIT(t.ecap)) /* PFSID = the function's own SID (no VFs here) */
        lo |= (u64)(t.sid & 0xf) << 12 | (u64)(t.sid >> 4) << 52;
    return qi_queue(lo, (addr_with_size_bits & ~0xfffULL) | (s ? 1 : 0));
}

/* Device-TLB invalidation of the same aligned block as the PSI (size encoded in the low ADDR bits). */
static const char *q_devtlb_range(u64 iova, u64 size)
{
    u32 m = psi_mask(iova, size);
    if (m >= 52)
        return q_devtlb(0x7ffffffffffff000ULL, true);
    u64 addr = iova & ~((4096ULL << m) - 1);
    return m == 0 ? q_devtlb(addr, false) : q_devtlb(addr | ((1ULL << (12 + m - 1)) - 1), true);
}

static const char *qi_enable(void)
{
    t.iq = mem_alloc(4096, 4096);
    if (!t.iq)
        return "out of guest memory for the VT-d invalidation queue";
    t.iq_tail = 0;
    mmio_write32(t.base + R_IQT, 0);
    mmio_write64(t.base + R_IQA, gpa(t.iq)); /* QS=0: 256 128-bit descriptors */
    return set_level(G_QIE, true, "QIES");
}

/* ------------------------------------------------------------------ page tables */

static u64 *new_table(void)
{
    u64 *p = mem_alloc(4096, 4096);
    if (p) {
        t.pt_pages++;
        for (u32 i = 0; !t.coherent && i < 4096; i += 64)
            clflush((u8 *)p + i);
    }
    return p;
}

static u32 level_index(u64 iova, int level) { return (u32)(iova >> (12 + 9 * (level - 1))) & 511; }

/* The entry for iova at `level` (1: 4 KiB leaf, 2: 2 MiB), creating tables when alloc. */
static u64 *walk(u64 iova, int level, bool alloc, const char **err)
{
    u64 *table = t.pgd;
    for (int l = t.levels; l > level; l--) {
        u64 *e = &table[level_index(iova, l)];
        if (!(*e & (PTE_R | PTE_W))) {
            u64 *n = alloc ? new_table() : NULL;
            if (!n) {
                *err = alloc ? "out of guest memory for VT-d page tables" : "VT-d: unmapping an IOVA that is not mapped";
                return NULL;
            }
            *e = gpa(n) | PTE_R | PTE_W; /* Linux writes R|W in non-leaf entries */
            sync_entry(e);
        } else if (*e & PTE_PS) {
            *err = "VT-d: the IOVA is inside a large page";
            return NULL;
        }
        table = (u64 *)(uintptr_t)(*e & PTE_ADDR);
    }
    return &table[level_index(iova, level)];
}

/* Maps [iova, iova + size) to pa; `identity` allows 2 MiB pages and identical re-mappings. */
static const char *map_range(u64 iova, u64 pa, u64 size, u64 prot, bool identity)
{
    const char *err = NULL;
    while (size) {
        bool big = identity && CAP_SLLPS_2M(t.cap) && !((iova | pa) & (SZ_2M - 1)) && size >= SZ_2M;
        u64 step = big ? SZ_2M : 4096, pte = (pa & PTE_ADDR) | prot | (big ? PTE_PS : 0);
        u64 *e = walk(iova, big ? 2 : 1, true, &err);
        if (!e)
            return err;
        if ((*e & (PTE_R | PTE_W)) && !(identity && *e == pte))
            return "VT-d: mapping an IOVA that is already mapped";
        *e = pte;
        sync_entry(e);
        iova += step, pa += step, size -= step;
    }
    return NULL;
}

static const char *unmap_range(u64 iova, u64 size)
{
    const char *err = NULL;
    for (u64 off = 0; off < size; off += 4096) {
        u64 *e = walk(iova + off, 1, false, &err);
        if (!e)
            return err;
        if (!(*e & (PTE_R | PTE_W)))
            return "VT-d: unmapping an IOVA that is not mapped";
        *e = 0;
        sync_entry(e);
    }
    return NULL;
}

static u64 aperture_last(void)
{
    u32 bits = t.levels == 4 ? 48 : 39;
    if (CAP_MGAW(t.cap) < bits)
        bits = CAP_MGAW(t.cap);
    return (1ULL << bits) - 1;
}

static const char *identity_map(void)
{
    struct e820_entry e;
    for (u32 i = 0; e820_entry_at(i, &e); i++) {
        u64 start = e.addr & ~0xfffULL, end = ALIGN_UP(e.addr + e.size, 4096);
        if (e.type != E820_RAM || end <= start)
            continue;
        if (end > aperture_last())
            end = aperture_last() + 1;
        const char *err = start < end ? map_range(start, start, end - start, PTE_R | PTE_W, true) : NULL;
        if (err)
            return err;
    }
    t.identity = true;
    return NULL;
}

/* ------------------------------------------------------------------ set-up */

static const char *read_unit(struct dma_ctx *ctx)
{
    t.base = dmar_drhd_base(&t.from_dmar);
    if (!unit_responds(t.base)) {
        ctx->unsupported = true;
        return "no VT-d remapping unit responds at the DMAR/default register base";
    }
    t.ver = rd32(R_VER);
    t.cap = mmio_read64(t.base + R_CAP);
    t.ecap = mmio_read64(t.base + R_ECAP);
    t.coherent = ECAP_C(t.ecap);
    t.cm = CAP_CM(t.cap);
    if (!ECAP_QI(t.ecap)) {
        ctx->unsupported = true;
        return "VT-d without queued invalidation (ECAP.QI=0): the test guest has no register-based invalidation";
    }
    u32 sagaw = CAP_SAGAW(t.cap);
    /* Like Linux: the widest of 48-bit/4-level and 39-bit/3-level (5-level is not supported here). */
    t.levels = (sagaw & 4) ? 4 : (sagaw & 2) ? 3 : 0;
    if (!t.levels) {
        ctx->unsupported = true;
        return "VT-d CAP.SAGAW offers neither 39-bit (3-level) nor 48-bit (4-level) tables";
    }
    t.aw = (u32)t.levels - 2;
    return NULL;
}

/* Linux's init_dmars order: clear faults, TE and QI off, QI on, root table, global flushes. */
static const char *init_unit(void)
{
    mmio_write32(t.base + R_FSTS, FSTS_PFO | FSTS_QI_ERRORS);
    t.gcmd = rd32(R_GSTS) & G_LEVEL_BITS;
    const char *err = (t.gcmd & G_TE) ? set_level(G_TE, false, "TES") : NULL;
    if (!err && (t.gcmd & G_QIE))
        err = set_level(G_QIE, false, "QIES");
    if (!err)
        err = qi_enable();
    if (err)
        return err;
    t.root = new_table();
    t.context = new_table();
    if (!t.root || !t.context)
        return "out of guest memory for the VT-d root and context tables";
    t.root[2 * (t.sid >> 8)] = gpa(t.context) | 1;
    sync_entry(&t.root[2 * (t.sid >> 8)]);
    mmio_write64(t.base + R_RTADDR, gpa(t.root)); /* TTM = 00: legacy */
    err = one_shot(G_SRTP, "RTPS");
    if (err || CAP_ESRTPS(t.cap))
        return err;
    err = qi_queue(QI_CC | QI_GRAN(1), 0);
    if (!err)
        err = qi_queue(QI_IOTLB | QI_GRAN(1) | drain_bits(), 0);
    return err ? err : qi_sync();
}

/* Decides ATS like Linux (ECAP.DT, the capability, Page Aligned Request); enabled after the context. */
static bool want_ats(struct dma_ctx *ctx)
{
    if (!ctx->ats_pos)
        return false;
    if (ctx->ats_mode == ATS_OFF) {
        ctx->ats_note = "disabled by iovmm.ats=off";
        return false;
    }
    if (t.tt == TT_PASS_THROUGH) {
        ctx->ats_note = "not used with a pass-through context (TT=2)";
        return false;
    }
    if (!ECAP_DT(t.ecap)) {
        ctx->ats_note = "the VT-d unit has no device-TLB support (ECAP.DT=0)";
        return false;
    }
    u16 cap = pci_read16(ctx->pci, (u16)(ctx->ats_pos + PCI_ATS_CAP));
    if (!(cap & PCI_ATS_CAP_PAGE_ALIGNED)) {
        ctx->ats_note = "the ATS capability lacks Page Aligned Request (Linux skips such devices)";
        return false;
    }
    t.ats_qdep = PCI_ATS_CAP_QDEP(cap); /* 0 means 32, which the descriptor also encodes as 0 */
    return true;
}

/* Writes the device's context entry (P last); caching mode then needs a context + IOTLB flush. */
static const char *write_context(void)
{
    u32 i = 2 * (t.sid & 0xff);
    u64 lo = 1 | (u64)t.tt << 2 | (t.tt == TT_PASS_THROUGH ? 0 : gpa(t.pgd));
    t.context[i + 1] = t.aw | (u64)t.did << 8;
    barrier();
    t.context[i] = lo;
    sync_entry(&t.context[i]);
    if (t.cm) {
        /* Device-selective context-cache invalidation with DID 0 (Linux), then the new domain. */
        const char *err = qi_queue(QI_CC | QI_GRAN(3) | (u64)t.sid << 32, 0);
        if (!err)
            err = q_iotlb_domain(t.did);
        return err ? err : qi_sync();
    }
    return CAP_RWBF(t.cap) ? one_shot(G_WBF, "WBFS") : NULL;
}

static const char *setup_domain(struct dma_ctx *ctx)
{
    if (ctx->mode == IOMMU_PASSTHROUGH && ECAP_PT(t.ecap)) {
        u32 sagaw = CAP_SAGAW(t.cap);
        t.tt = TT_PASS_THROUGH;
        t.did = DID_PASS_THROUGH;
        t.aw = (sagaw & 8) ? 3 : (sagaw & 4) ? 2 : 1; /* TT=2 wants the largest supported AW */
        want_ats(ctx); /* only for the note */
        return NULL;
    }
    t.did = DID_DMA;
    t.pgd = new_table();
    if (!t.pgd)
        return "out of guest memory for the VT-d page directory";
    t.tt = want_ats(ctx) ? TT_DEV_IOTLB : TT_MULTI_LEVEL;
    ctx->ats_enabled = t.tt == TT_DEV_IOTLB;
    if (ctx->mode == IOMMU_PASSTHROUGH)
        return identity_map(); /* ECAP.PT=0: 1:1 page tables of RAM (older Linux's static identity domain) */
    iova_init(&space, 4096, aperture_last(), 4096);
    iova_reserve(&space, MSI_FIRST, MSI_LAST); /* Linux reserves the interrupt window in every domain */
    ctx->iova = &space;
    return NULL;
}

static const char *vtd_attach(struct dma_ctx *ctx)
{
    t = (typeof(t)){.ctx = ctx, .sid = pci_sid(ctx->pci)};
    nbatch = 0;
    const char *err = read_unit(ctx);
    if (!err)
        err = init_unit();
    if (err)
        return err;
    if (t.cm && ctx->mode == IOMMU_LAZY)
        ctx->mode = IOMMU_STRICT;
    err = setup_domain(ctx);
    if (!err)
        err = write_context();
    if (err)
        return err;
    if (ctx->ats_enabled) {
        u16 ctrl = (u16)(ctx->ats_pos + PCI_ATS_CTRL);
        pci_write16(ctx->pci, ctrl, PCI_ATS_CTRL_ENABLE); /* STU 0: 4 KiB */
        if (!(pci_read16(ctx->pci, ctrl) & PCI_ATS_CTRL_ENABLE))
            return "the ATS Enable bit does not read back as set after the guest wrote it";
    }
    return set_level(G_TE, true, "TES");
}

static const char *vtd_map(struct dma_ctx *ctx, u64 iova, u64 pa, u64 size, u32 prot)
{
    (void)ctx;
    const char *err = map_range(iova, pa, size, prot, false);
    if (err || !t.cm)
        return err;
    /* Caching mode: not-present -> present must be invalidated too (no device-TLB flush for maps). */
    err = q_iotlb_range(iova, size, false);
    return err ? err : qi_sync();
}

static const char *vtd_unmap_sync(struct dma_ctx *ctx, u64 iova, u64 size)
{
    const char *err = unmap_range(iova, size);
    if (!err) /* IH=1: page-table pages are never freed here, only leaves change */
        err = q_iotlb_range(iova, size, true);
    if (!err && ctx->ats_enabled)
        err = q_devtlb_range(iova, size);
    return err ? err : qi_sync();
}

static const char *vtd_unmap_deferred(struct dma_ctx *ctx, u64 iova, u64 size)
{
    (void)ctx;
    return unmap_range(iova, size);
}

static const char *vtd_flush(struct dma_ctx *ctx, const struct dma_range *r, u64 n)
{
    const char *err = NULL;
    if (ctx->lazy_flush == LAZY_FLUSH_DOMAIN) {
        err = q_iotlb_domain(t.did);
        if (!err && ctx->ats_enabled)
            err = q_devtlb(0x7ffffffffffff000ULL, true);
    }
    for (u64 i = 0; !err && ctx->lazy_flush == LAZY_FLUSH_PAGES && i < n; i++) {
        err = q_iotlb_range(r[i].iova, r[i].size, true);
        if (!err && ctx->ats_enabled)
            err = q_devtlb_range(r[i].iova, r[i].size);
    }
    return err ? err : qi_sync();
}

static void report_faults(struct result *r)
{
    u32 fsts = rd32(R_FSTS), fro = (u32)CAP_FRO(t.cap), nfr = CAP_NFR(t.cap), pending = 0;
    result_hex(r, "fsts", fsts);
    for (u32 i = 0; fro && i < nfr && t.base + fro + 16ULL * (i + 1) <= MMIO_LIMIT; i++) {
        u64 rec = t.base + fro + 16ULL * i;
        u32 top = mmio_read32(rec + 12); /* Linux reads the F bit's dword first */
        if (!(top >> 31))
            continue;
        if (pending++ == 0) {
            result_u64(r, "fault_reason", top & 0xff);
            result_hex(r, "fault_sid", mmio_read32(rec + 8) & 0xffff);
            result_hex(r, "fault_addr", mmio_read64(rec) & ~0xfffULL);
            result_u64(r, "fault_write", !((top >> 30) & 1));
        }
    }
    result_u64(r, "faults", pending);
}

static void vtd_report(struct dma_ctx *ctx, struct result *r)
{
    (void)ctx;
    result_hex(r, "vtd_base", t.base);
    result_u64(r, "dmar", t.from_dmar);
    result_hex(r, "vtd_cap", t.cap);
    result_hex(r, "vtd_ecap", t.ecap);
    result_u64(r, "caching_mode", t.cm);
    result_u64(r, "levels", (u64)t.levels);
    result_u64(r, "did", t.did);
    result_u64(r, "tt", t.tt);
    result_u64(r, "pt_pages", t.pt_pages);
    if (t.identity)
        result_u64(r, "identity_map", 1);
    if (t.ver) /* the unit responded */
        report_faults(r);
}

const struct iommu_driver vtd_driver = {
    .name = "vt-d",
    .present = vtd_present,
    .attach = vtd_attach,
    .map = vtd_map,
    .unmap_sync = vtd_unmap_sync,
    .unmap_deferred = vtd_unmap_deferred,
    .flush = vtd_flush,
    .report = vtd_report,
};
