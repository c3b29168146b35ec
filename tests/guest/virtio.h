/* virtio-pci modern transport and split virtqueues, polled (no interrupts). */
#ifndef IOVMM_GUEST_VIRTIO_H
#define IOVMM_GUEST_VIRTIO_H

#include "dma.h"

#define VIRTIO_VENDOR 0x1af4
/* Device types (PCI device id 0x1040 + type, transitional 0x0fff + type). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_FAILED 0x80

/* Transport feature bits. */
#define VIRTIO_F_VERSION_1 (1ULL << 32)
#define VIRTIO_F_ACCESS_PLATFORM (1ULL << 33)

/* Split virtqueue layout (virtio 1.x, little-endian). */
struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_avail {
    u16 flags;
    u16 idx;
    u16 ring[];
};

struct vring_used_elem {
    u32 id;
    u32 len;
};

struct vring_used {
    u16 flags;
    u16 idx;
    struct vring_used_elem ring[];
};
#define VRING_USED_F_NO_NOTIFY 1

struct virtio_dev;

struct virtq {
    struct virtio_dev *vdev;
    u16 index;
    u16 size;               /* power of two */
    struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    u64 notify_addr;
    u16 avail_idx;          /* next avail->idx to publish */
    u16 last_used;
    u16 free_head;
    u16 num_free;
    u64 ring_dma[3];        /* device addresses of desc, avail, used */
    u64 kicks;
};

struct virtio_dev {
    const struct pci_dev *pci;
    struct dma_ctx *dma;
    u64 common, notify, isr, device_cfg; /* MMIO addresses of the capability windows */
    u32 notify_multiplier;
    u64 offered, features;
};

/* One element of a descriptor chain. */
struct vq_buf {
    u64 addr;     /* device (DMA) address */
    u32 len;
    bool device_writes;
};

/* The first virtio device of `type` (VIRTIO_ID_*) on PCI bus 0. When there is none: NULL, after
 * the result line of `test`, "unsupported" with "no `what` device on PCI bus 0". */
const struct pci_dev *virtio_find(const char *test, const struct pci_dev *devs, size_t ndevs, u16 type,
                                  const char *what);
/* Finds the virtio capabilities and enables memory decoding and bus mastering. */
const char *virtio_pci_init(struct virtio_dev *vd, const struct pci_dev *pci, struct dma_ctx *dma);
/* Reset, ACKNOWLEDGE, DRIVER, features (offered & wanted, must include `required`), FEATURES_OK. */
const char *virtio_negotiate(struct virtio_dev *vd, u64 wanted, u64 required);
/* DMA for `iommu`, the virtio-pci transport and the features (`wanted` plus ACCESS_PLATFORM,
 * VERSION_1 required). A vIOMMU mode on a device without ACCESS_PLATFORM fails as unsupported:
 * Linux would bypass the DMA API for it, and a test that asked for a vIOMMU mode wants to know.
 * `what` names the device in that message ("virtio-net"). */
const char *virtio_dma_open(struct virtio_dev *vd, struct dma_ctx *dma, const struct pci_dev *pci,
                            enum iommu_mode iommu, u64 wanted, const char *what);
/* Sets up and enables queue `index` with at most `max_size` entries (rings DMA-mapped once). */
const char *virtio_setup_queue(struct virtio_dev *vd, struct virtq *vq, u16 index, u16 max_size);
void virtio_driver_ok(struct virtio_dev *vd);
/* Writes 0 to device_status and waits for the device to finish the reset. */
bool virtio_reset(struct virtio_dev *vd);
/* The end of a scenario's run: resets the device when `reset` (iovmm.reset); returns `why` (the
 * run's failure), or, when the run went well, the reset's. */
const char *virtio_reset_after_run(struct virtio_dev *vd, bool reset, const char *why);
u8 virtio_cfg_read8(const struct virtio_dev *vd, u32 off);
u32 virtio_cfg_read32(const struct virtio_dev *vd, u32 off);
/* Two 32-bit reads, low half first (like Linux's virtio_cread for 64-bit fields). */
u64 virtio_cfg_read64(const struct virtio_dev *vd, u32 off);

/* Adds a chain (not yet visible to the device); returns its head id, or -1 when the ring is full. */
int virtq_add(struct virtq *vq, const struct vq_buf *bufs, u16 n);
/* Makes added chains visible, then notifies the device unless it asked not to be notified. */
void virtq_kick(struct virtq *vq);
/* The two halves of virtq_kick: publish with the ring's lock held, notify after dropping it
 * (the notification is a VM exit; another vCPU's publish in between is covered by it). */
void virtq_publish(struct virtq *vq);
void virtq_notify(struct virtq *vq);
/* Pops one used element (frees its chain); false when none is pending. */
bool virtq_get_used(struct virtq *vq, u32 *id, u32 *len);
/* Pops one used element but leaves its chain allocated (virtq_free_chain returns it later);
 * false when none is pending (an element with a bad id is dropped). */
bool virtq_pop_used(struct virtq *vq, u32 *id, u32 *len);
void virtq_free_chain(struct virtq *vq, u16 head);

#endif
