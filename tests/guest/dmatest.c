/*
 * dma-map: drives the DMA layer (and so the vIOMMU driver) for one PCI function without any device
 * DMA: `iterations` rounds of mapping `inflight` buffers of `size` bytes, then unmapping them, then
 * dma_flush. It checks the driver paths against the VMM's vIOMMU model and measures the guest-side
 * cost per map/unmap.
 *
 * Parameters: iovmm.iommu (strict), iovmm.iterations (1000), iovmm.size (bytes, 1..1M, 4096),
 * iovmm.inflight (1..256, 1), iovmm.bdf (BB:DD.F hex; default the first function that is neither
 * a host bridge nor the virtio-iommu, else 00:00.0), plus dma.h's iovmm.viommu/ats/lazy_*.
 */
#include "dmatest.h"
#include "dma.h"

#define MAX_INFLIGHT 256
#define MAX_SIZE (1ULL << 20)

struct dma_params {
    u64 iterations, size, inflight;
    enum iommu_mode mode;
};

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* "BB:DD.F" (hex) -> requester ID, or -1. */
static int parse_bdf(const char *s)
{
    if (strlen(s) != 7 || s[2] != ':' || s[5] != '.')
        return -1;
    int b1 = hexval(s[0]), b0 = hexval(s[1]), d1 = hexval(s[3]), d0 = hexval(s[4]), f = hexval(s[6]);
    int dev = d1 * 16 + d0;
    if (b1 < 0 || b0 < 0 || d1 < 0 || d0 < 0 || f < 0 || f > 7 || dev > 31)
        return -1;
    return (b1 * 16 + b0) << 8 | dev << 3 | f;
}

static const struct pci_dev *pick_endpoint(const struct pci_dev *devs, size_t n, const char **err)
{
    char bdf[16];
    if (cmdline_get("iovmm.bdf", bdf, sizeof(bdf))) {
        int sid = parse_bdf(bdf);
        for (size_t i = 0; sid >= 0 && i < n; i++) {
            if (pci_sid(&devs[i]) == sid)
                return &devs[i];
        }
        *err = sid < 0 ? "iovmm.bdf must be BB:DD.F (hex)" : "no PCI function at iovmm.bdf";
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        bool bridge = (devs[i].class_code >> 8) == 0x0600, viommu = devs[i].vendor == 0x1af4 && devs[i].device == 0x1057;
        if (!bridge && !viommu)
            return &devs[i];
    }
    if (n)
        return &devs[0];
    *err = "no PCI function on bus 0";
    return NULL;
}

static const char *read_params(struct dma_params *p)
{
    if (cmdline_u64("iovmm.iterations", 1000, &p->iterations) || cmdline_u64("iovmm.size", 4096, &p->size) ||
        cmdline_u64("iovmm.inflight", 1, &p->inflight))
        return "a numeric iovmm.* parameter is malformed";
    if (p->size == 0 || p->size > MAX_SIZE || p->inflight == 0 || p->inflight > MAX_INFLIGHT)
        return "iovmm.size must be 1..1M and iovmm.inflight 1..256";
    return iommu_mode_param(IOMMU_STRICT, &p->mode);
}

static void report(struct dma_ctx *dma, const struct dma_params *p, const struct pci_dev *ep, const char *status,
                   const char *why, u64 cycles)
{
    struct result r;
    result_begin(&r, "dma-map", status);
    if (why)
        result_str(&r, "error", why);
    if (ep) {
        char bdf[16];
        snprintf(bdf, sizeof(bdf), "%02x:%02x.%x", ep->bus, ep->dev, ep->fn);
        result_str(&r, "bdf", bdf);
    }
    result_u64(&r, "iterations", p->iterations);
    result_u64(&r, "size", p->size);
    result_u64(&r, "inflight", p->inflight);
    result_u64(&r, "cycles", cycles);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    if (dma)
        dma_report(dma, &r);
    result_emit(&r);
}

/* One round: map every buffer (alternating directions), then unmap them in order. */
static bool round_trip(struct dma_ctx *dma, u8 *bufs, u64 *addrs, const struct dma_params *p)
{
    for (u64 j = 0; j < p->inflight; j++) {
        enum dma_dir dir = (enum dma_dir)(j % 3);
        addrs[j] = dma_map(dma, bufs + j * ALIGN_UP(p->size, 64), p->size, dir);
        if (addrs[j] == DMA_MAPPING_ERROR)
            return dma_fail(dma, "dma_map failed");
    }
    for (u64 j = 0; j < p->inflight; j++)
        dma_unmap(dma, addrs[j], p->size, (enum dma_dir)(j % 3));
    return !dma->error;
}

int run_dma_map(const struct pci_dev *devs, size_t ndevs)
{
    static struct dma_ctx dma;
    static u64 addrs[MAX_INFLIGHT];
    struct dma_params p;
    const char *err = read_params(&p);
    const struct pci_dev *ep = err ? NULL : pick_endpoint(devs, ndevs, &err);
    if (err) {
        report(NULL, &p, NULL, "error", err, 0);
        return EXIT_USAGE;
    }
    /* Buffers start 64 bytes into a page so that sizes near a page straddle two. */
    u8 *bufs = mem_alloc(p.inflight * ALIGN_UP(p.size, 64) + 4096, 4096);
    err = bufs ? dma_init(&dma, ep, p.mode) : "out of guest memory for the buffers";
    if (err) {
        int code = EXIT_FAILED;
        const char *status = bufs ? dma_exit_status(&dma, &code) : "failed";
        report(&dma, &p, ep, status, err, 0);
        return code;
    }
    u64 t0 = rdtsc();
    for (u64 i = 0; i < p.iterations && round_trip(&dma, bufs + 64, addrs, &p); i++)
        ;
    dma_flush(&dma);
    u64 cycles = rdtsc() - t0;
    report(&dma, &p, ep, dma.error ? "failed" : "ok", dma.error, cycles);
    return dma.error ? EXIT_FAILED : EXIT_OK;
}
