/*
 * IOVA allocator for the vIOMMU drivers: first-fit over a sorted array of free ranges, bounded
 * (IOVA_MAX_RANGES), granule-aligned sizes. The aperture is set once, reserved regions (MSI window,
 * PROBE RESV_MEM, page 0) are carved out, then alloc/free run in ring 3 at native speed.
 */
#ifndef IOVMM_GUEST_IOVA_H
#define IOVMM_GUEST_IOVA_H

#include "lib.h"

#define IOVA_MAX_RANGES 1024
#define IOVA_NONE (~0ULL)

struct iova_range {
    u64 first, last; /* inclusive */
};

struct iova_space {
    u64 gran;        /* power of two */
    u32 n;
    u64 in_use;      /* bytes handed out */
    struct iova_range r[IOVA_MAX_RANGES];
};

/* The aperture [first, last], shrunk to whole granules. */
void iova_init(struct iova_space *s, u64 first, u64 last, u64 gran);
/* Removes [first, last] (grown to whole granules) from the free ranges. */
void iova_reserve(struct iova_space *s, u64 first, u64 last);
/* Lowest free IOVA for `size` bytes (rounded up to the granule), or IOVA_NONE. */
u64 iova_alloc(struct iova_space *s, u64 size);
/* Returns [iova, iova + size) to the free ranges; false if it overlaps a free range or the
 * range array is full (the space then stays leaked, never corrupted). */
bool iova_free(struct iova_space *s, u64 iova, u64 size);

#endif
