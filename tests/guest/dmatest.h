/* The dma-map scenario: vIOMMU map/unmap cycles for one endpoint, without device DMA. */
#ifndef IOVMM_GUEST_DMATEST_H
#define IOVMM_GUEST_DMATEST_H

#include "pci.h"

int run_dma_map(const struct pci_dev *devs, size_t ndevs);

#endif
