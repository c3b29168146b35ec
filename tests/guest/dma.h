/*
 * DMA address layer between drivers and the (optional) vIOMMU, shaped like Linux's DMA API.
 *
 * Every buffer a device reads or writes goes through dma_map() before it is handed to the device
 * and dma_unmap() after the device is done with it; rings are mapped once at set-up. The modes:
 *   off          no vIOMMU programming; device address = guest physical address.
 *   passthrough  the device's domain is identity/bypass (not implemented yet).
 *   strict       map per buffer, unmap + synchronous invalidation per buffer (not implemented yet).
 *   lazy         map per buffer, unmaps batched and flushed by dma_flush() (not implemented yet).
 * A vIOMMU driver (virtio-iommu or VT-d) plugs in behind dma_init/dma_map/dma_unmap/dma_flush.
 */
#ifndef IOVMM_GUEST_DMA_H
#define IOVMM_GUEST_DMA_H

#include "pci.h"

enum iommu_mode { IOMMU_OFF, IOMMU_PASSTHROUGH, IOMMU_STRICT, IOMMU_LAZY };
enum dma_dir { DMA_TO_DEVICE, DMA_FROM_DEVICE, DMA_BIDIRECTIONAL };

#define DMA_MAPPING_ERROR (~0ULL)

struct dma_ctx {
    enum iommu_mode mode;
    const struct pci_dev *pci;
    u64 maps, unmaps, flushes;
};

bool iommu_mode_parse(const char *s, enum iommu_mode *out);
const char *iommu_mode_name(enum iommu_mode mode);

/* Prepares DMA for one device. NULL on success, else why the mode cannot be used. */
const char *dma_init(struct dma_ctx *ctx, const struct pci_dev *pci, enum iommu_mode mode);
/* Device address for [va, va + len), or DMA_MAPPING_ERROR. */
u64 dma_map(struct dma_ctx *ctx, const void *va, u64 len, enum dma_dir dir);
void dma_unmap(struct dma_ctx *ctx, u64 dma_addr, u64 len, enum dma_dir dir);
/* Completes deferred unmaps (lazy mode); a no-op in the other modes. */
void dma_flush(struct dma_ctx *ctx);

#endif
