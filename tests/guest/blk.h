/* virtio-blk scenario. */
#ifndef IOVMM_GUEST_BLK_H
#define IOVMM_GUEST_BLK_H

#include "pci.h"

/* The blk scenario; returns the exit code (see blk.c for parameters and the result line). */
int run_blk(const struct pci_dev *devs, size_t ndevs);
/* The blk-stale scenario (use after unmap, strict mode; see blk.c). */
int run_blk_stale(const struct pci_dev *devs, size_t ndevs);

#endif
