/*
 * DMA address layer between drivers and the (optional) vIOMMU, shaped like Linux's DMA API.
 *
 * Every buffer a device reads or writes goes through dma_map() before it is handed to the device
 * and dma_unmap() after the device is done with it; rings are mapped once at set-up. The modes
 * (iovmm.iommu=):
 *   off          no vIOMMU programming; device address = guest physical address.
 *   passthrough  the device's domain is identity/bypass; dma_map returns the physical address.
 *   strict       map per buffer, unmap + synchronous invalidation per buffer.
 *   lazy         map per buffer; unmaps remove the mapping at once but the invalidation is batched
 *                (iovmm.lazy_batch unmaps, or dma_flush) and the IOVAs are reused only after it.
 * The vIOMMU (iovmm.viommu=auto|virtio|vtd) is driven by viommu.c (virtio-iommu) or vtd.c (VT-d)
 * through struct iommu_driver. ATS on the DMA device (iovmm.ats=auto|on|off) is VT-d only.
 */
#ifndef IOVMM_GUEST_DMA_H
#define IOVMM_GUEST_DMA_H

#include "env.h"
#include "iova.h"
#include "pci.h"

enum iommu_mode { IOMMU_OFF, IOMMU_PASSTHROUGH, IOMMU_STRICT, IOMMU_LAZY };
enum dma_dir { DMA_TO_DEVICE, DMA_FROM_DEVICE, DMA_BIDIRECTIONAL };
enum viommu_kind { VIOMMU_AUTO, VIOMMU_VIRTIO, VIOMMU_VTD };
enum ats_mode { ATS_AUTO, ATS_ON, ATS_OFF };
/* How a lazy flush invalidates on VT-d: one domain-selective flush (Linux) or one PSI per unmap. */
enum lazy_flush { LAZY_FLUSH_DOMAIN, LAZY_FLUSH_PAGES };

#define DMA_MAPPING_ERROR (~0ULL)
/* Device access rights of a mapping (same bits as virtio-iommu MAP flags and VT-d PTE R/W). */
#define IOMMU_PROT_READ 1u  /* the device may read (DMA_TO_DEVICE) */
#define IOMMU_PROT_WRITE 2u /* the device may write (DMA_FROM_DEVICE) */
#define LAZY_BATCH_MAX 4096

struct dma_range {
    u64 iova, size;
};

struct dma_ctx;

/* One vIOMMU driver. Functions return NULL on success, else a message for the result line. */
struct iommu_driver {
    const char *name; /* "virtio-iommu" or "vt-d" */
    /* Finds the unit (false: not present). */
    bool (*present)(void);
    /* Brings the unit up and attaches ctx->pci in ctx->mode: sets ctx->iova (translated modes). */
    const char *(*attach)(struct dma_ctx *ctx);
    const char *(*map)(struct dma_ctx *ctx, u64 iova, u64 pa, u64 size, u32 prot);
    /* Strict: removes the mapping and completes its invalidation before returning. */
    const char *(*unmap_sync)(struct dma_ctx *ctx, u64 iova, u64 size);
    /* Lazy: removes the mapping (may stay cached in the IOTLB until flush). */
    const char *(*unmap_deferred)(struct dma_ctx *ctx, u64 iova, u64 size);
    /* Lazy: completes the invalidation of these deferred unmaps. */
    const char *(*flush)(struct dma_ctx *ctx, const struct dma_range *r, u64 n);
    /* Adds the unit's own fields (faults, capabilities) to the result line. */
    void (*report)(struct dma_ctx *ctx, struct result *r);
    /* map and unmap_sync take iommu_lock themselves, only around their queue accesses, so
     * several vCPUs can have a request in flight; the other calls run under it (dma.c). */
    bool concurrent_sync;
};

/* Serialises vIOMMU driver state between vCPUs (see dma_split). */
extern struct spinlock iommu_lock;

struct dma_ctx {
    enum iommu_mode mode;      /* effective mode (VT-d caching mode turns lazy into strict) */
    enum iommu_mode requested;
    const struct pci_dev *pci;
    const struct iommu_driver *drv;
    struct iova_space *iova;   /* translated modes */
    u64 gran;                  /* IOMMU page size */
    enum ats_mode ats_mode;
    enum lazy_flush lazy_flush;
    u16 ats_pos;               /* offset of the device's ATS capability, 0 if none */
    bool ats_enabled;
    const char *ats_note;      /* why ATS stayed off although the device has it */
    u64 lazy_batch;
    struct dma_range *pending; /* deferred unmaps (lazy) */
    u64 npending;
    const char *error;         /* first failure; the scenario reports it and exits EXIT_FAILED */
    bool unsupported;          /* dma_init failed because something is absent (EXIT_UNSUPPORTED) */
    bool usage;                /* dma_init failed on a malformed iovmm.* parameter (EXIT_USAGE) */
    /* Counters for the result line. */
    u64 maps, unmaps, flushes; /* flushes: lazy batches */
    u64 iommu_reqs;            /* virtio-iommu requests / VT-d queued descriptors (waits included) */
    u64 iommu_syncs;           /* synchronous round trips: request kicks waited for / wait descriptors */
    u64 map_cycles, unmap_cycles, flush_cycles;
    u64 lock_wait_cycles;      /* waiting for another vCPU's vIOMMU request (included above) */
};

bool iommu_mode_parse(const char *s, enum iommu_mode *out);
const char *iommu_mode_name(enum iommu_mode mode);
/* Reads iovmm.iommu into *out (`dflt` when absent): NULL, or why the value is malformed. */
const char *iommu_mode_param(enum iommu_mode dflt, enum iommu_mode *out);

/* Prepares DMA for one device (reads iovmm.viommu, iovmm.ats, iovmm.lazy_batch, iovmm.lazy_flush).
 * NULL on success, else why; ctx->unsupported / ctx->usage tell "absent" and "bad parameter" from
 * "failed". dma_exit_status() maps that to the result status and exit code. */
const char *dma_init(struct dma_ctx *ctx, const struct pci_dev *pci, enum iommu_mode mode);
/* Device address for [va, va + len), or DMA_MAPPING_ERROR (ctx->error says why). */
u64 dma_map(struct dma_ctx *ctx, const void *va, u64 len, enum dma_dir dir);
void dma_unmap(struct dma_ctx *ctx, u64 dma_addr, u64 len, enum dma_dir dir);
/* Strict virtio-iommu only: one UNMAP [iova, u64 max] where iova is dma_addr's page, which removes
 * every mapping fully inside it (the spec allows it), then frees the buffer's IOVAs. Returns
 * ctx->error (NULL on success). */
const char *dma_unmap_to_end(struct dma_ctx *ctx, u64 dma_addr, u64 len);
/* An IOVA range of `size` bytes taken from the allocator and never mapped (strict/lazy only, else
 * DMA_MAPPING_ERROR): device access there must fault. */
u64 dma_guard_iova(struct dma_ctx *ctx, u64 size);
/* Completes deferred unmaps (lazy mode); a no-op in the other modes. */
void dma_flush(struct dma_ctx *ctx);
/* Records the first error (later ones are dropped); returns false for convenience. */
bool dma_fail(struct dma_ctx *ctx, const char *why);
/* Result status and exit code of a dma_init failure. */
const char *dma_exit_status(const struct dma_ctx *ctx, int *code);
/*
 * Several vCPUs: every vIOMMU request (drivers keep one request queue / invalidation queue and one
 * page-table tree) runs under one lock, like Linux's request_lock / qi->q_lock; each vCPU maps
 * through its own context with its own IOVA range, so IOVA allocation needs no lock.
 *
 * dma_split() makes `child` a copy of the attached `parent` with `iova_bytes` of the parent's
 * IOVA space (translated modes), its own lazy batch and zeroed counters; call it before the
 * vCPUs start. dma_merge() adds the child's counters and first error to the parent and gives
 * its IOVA range back when nothing in it is still mapped. */
const char *dma_split(struct dma_ctx *parent, struct dma_ctx *child, u64 iova_bytes);
void dma_merge(struct dma_ctx *parent, const struct dma_ctx *child);
/* Adds the DMA/vIOMMU fields to a result line. */
void dma_report(struct dma_ctx *ctx, struct result *r);

/* The result line of a scenario that ended before its run (with the DMA fields once dma_init
 * ran, `dma` set): "error" with EXIT_USAGE, "unsupported" with EXIT_UNSUPPORTED, ... Returns
 * `code`. */
int report_early_exit(const char *test, const char *status, const char *why, int code, struct dma_ctx *dma);
/* report_early_exit() of a device set-up failure, with the status and code of dma_exit_status(). */
int report_dma_setup_error(const char *test, const char *why, struct dma_ctx *dma);
/* Starts the result line of a scenario's run: "ok", or "failed" with "error": why; and the
 * requested "iommu" mode. */
void result_begin_run(struct result *r, const char *test, const char *why, enum iommu_mode iommu);

extern const struct iommu_driver virtio_iommu_driver;
extern const struct iommu_driver vtd_driver;

#endif
