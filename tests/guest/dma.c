/* DMA address layer: only the no-vIOMMU path so far (see dma.h). */
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

const char *dma_init(struct dma_ctx *ctx, const struct pci_dev *pci, enum iommu_mode mode)
{
    *ctx = (struct dma_ctx){.mode = mode, .pci = pci};
    if (mode != IOMMU_OFF)
        return "this iommu mode needs a vIOMMU driver, which the test guest does not have yet";
    return NULL;
}

u64 dma_map(struct dma_ctx *ctx, const void *va, u64 len, enum dma_dir dir)
{
    (void)dir;
    u64 pa = (u64)(uintptr_t)va; /* identity-mapped guest */
    if (len == 0 || pa + len < pa)
        return DMA_MAPPING_ERROR;
    ctx->maps++;
    return pa;
}

void dma_unmap(struct dma_ctx *ctx, u64 dma_addr, u64 len, enum dma_dir dir)
{
    (void)dma_addr;
    (void)len;
    (void)dir;
    ctx->unmaps++;
}

void dma_flush(struct dma_ctx *ctx) { ctx->flushes++; }
