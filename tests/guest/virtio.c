/* virtio-pci modern transport (virtio 1.x section 4.1) and split virtqueues (section 2.7). */
#include "virtio.h"
#include "env.h"

/* Capability types (virtio_pci_cap.cfg_type). */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4

/* Common configuration registers. */
#define CC_DEVICE_FEATURE_SELECT 0x00
#define CC_DEVICE_FEATURE 0x04
#define CC_DRIVER_FEATURE_SELECT 0x08
#define CC_DRIVER_FEATURE 0x0c
#define CC_NUM_QUEUES 0x12
#define CC_DEVICE_STATUS 0x14
#define CC_QUEUE_SELECT 0x16
#define CC_QUEUE_SIZE 0x18
#define CC_QUEUE_MSIX_VECTOR 0x1a
#define CC_QUEUE_ENABLE 0x1c
#define CC_QUEUE_NOTIFY_OFF 0x1e
#define CC_QUEUE_DESC 0x20
#define CC_QUEUE_DRIVER 0x28
#define CC_QUEUE_DEVICE 0x30

#define VIRTIO_NO_VECTOR 0xffff

static const char *map_cap(const struct pci_dev *pci, u8 pos, u64 *out)
{
    u8 bar = pci_read8(pci, (u16)(pos + 4));
    u32 offset = pci_read32(pci, (u16)(pos + 8));
    u32 length = pci_read32(pci, (u16)(pos + 12));
    struct pci_bar b = pci_bar(pci, bar);
    if (b.kind != PCI_BAR_MEM32 && b.kind != PCI_BAR_MEM64)
        return "a virtio capability points at a BAR that is not a memory BAR";
    if (b.addr == 0 || length == 0 || b.addr + offset < b.addr)
        return "a virtio capability points at an unassigned BAR or is empty";
    *out = b.addr + offset;
    return NULL;
}

const char *virtio_pci_init(struct virtio_dev *vd, const struct pci_dev *pci, struct dma_ctx *dma)
{
    *vd = (struct virtio_dev){.pci = pci, .dma = dma};
    for (u8 pos = pci_find_cap(pci, PCI_CAP_ID_VNDR, 0); pos; pos = pci_find_cap(pci, PCI_CAP_ID_VNDR, pos)) {
        u8 type = pci_read8(pci, (u16)(pos + 3));
        u64 *slot = type == CAP_COMMON ? &vd->common
                    : type == CAP_NOTIFY ? &vd->notify
                    : type == CAP_ISR ? &vd->isr
                    : type == CAP_DEVICE ? &vd->device_cfg
                                         : NULL;
        if (!slot || *slot)
            continue; /* unknown type, or not the first of its type */
        const char *err = map_cap(pci, pos, slot);
        if (err)
            return err;
        if (type == CAP_NOTIFY)
            vd->notify_multiplier = pci_read32(pci, (u16)(pos + 16));
    }
    if (!vd->common || !vd->notify)
        return "no virtio common or notify capability (not a modern virtio-pci device)";
    pci_enable(pci, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    return NULL;
}

static u8 get_status(const struct virtio_dev *vd) { return mmio_read8(vd->common + CC_DEVICE_STATUS); }

static void add_status(struct virtio_dev *vd, u8 bits)
{
    mmio_write8(vd->common + CC_DEVICE_STATUS, get_status(vd) | bits);
}

bool virtio_reset(struct virtio_dev *vd)
{
    mmio_write8(vd->common + CC_DEVICE_STATUS, 0);
    u64 deadline = rdtsc() + ms_to_cycles(1000);
    while (get_status(vd) != 0) {
        if (rdtsc() > deadline)
            return false;
        cpu_relax();
    }
    return true;
}

const char *virtio_reset_after_run(struct virtio_dev *vd, bool reset, const char *why)
{
    if (reset && !virtio_reset(vd) && !why)
        return "the device did not finish its reset after the run";
    return why;
}

static u64 read_features(struct virtio_dev *vd)
{
    u64 f = 0;
    for (u32 sel = 0; sel < 2; sel++) {
        mmio_write32(vd->common + CC_DEVICE_FEATURE_SELECT, sel);
        f |= (u64)mmio_read32(vd->common + CC_DEVICE_FEATURE) << (32 * sel);
    }
    return f;
}

const char *virtio_negotiate(struct virtio_dev *vd, u64 wanted, u64 required)
{
    if (!virtio_reset(vd))
        return "the device did not finish its reset within 1 s";
    add_status(vd, VIRTIO_STATUS_ACKNOWLEDGE);
    add_status(vd, VIRTIO_STATUS_DRIVER);
    vd->offered = read_features(vd);
    if ((vd->offered & required) != required) {
        add_status(vd, VIRTIO_STATUS_FAILED);
        return "the device does not offer a required feature (VIRTIO_F_VERSION_1?)";
    }
    vd->features = vd->offered & (wanted | required);
    for (u32 sel = 0; sel < 2; sel++) {
        mmio_write32(vd->common + CC_DRIVER_FEATURE_SELECT, sel);
        mmio_write32(vd->common + CC_DRIVER_FEATURE, (u32)(vd->features >> (32 * sel)));
    }
    add_status(vd, VIRTIO_STATUS_FEATURES_OK);
    if (!(get_status(vd) & VIRTIO_STATUS_FEATURES_OK)) {
        add_status(vd, VIRTIO_STATUS_FAILED);
        return "the device refused FEATURES_OK for the accepted feature set";
    }
    return NULL;
}

void virtio_driver_ok(struct virtio_dev *vd) { add_status(vd, VIRTIO_STATUS_DRIVER_OK); }

u8 virtio_cfg_read8(const struct virtio_dev *vd, u32 off) { return mmio_read8(vd->device_cfg + off); }
u32 virtio_cfg_read32(const struct virtio_dev *vd, u32 off) { return mmio_read32(vd->device_cfg + off); }

u64 virtio_cfg_read64(const struct virtio_dev *vd, u32 off)
{
    u64 lo = virtio_cfg_read32(vd, off);
    return lo | (u64)virtio_cfg_read32(vd, off + 4) << 32;
}

static u16 pow2_floor(u16 v)
{
    u16 p = 1;
    while ((u32)p * 2 <= v)
        p = (u16)(p * 2);
    return p;
}

static const char *alloc_rings(struct virtq *vq)
{
    u16 n = vq->size;
    u64 sizes[3] = {16ULL * n, 6 + 2ULL * n, 6 + 8ULL * n};
    void *rings[3];
    for (int i = 0; i < 3; i++) {
        rings[i] = mem_alloc(ALIGN_UP(sizes[i], 4096), 4096);
        if (!rings[i])
            return "out of guest memory for virtqueue rings";
        vq->ring_dma[i] = dma_map(vq->vdev->dma, rings[i], sizes[i], DMA_BIDIRECTIONAL);
        if (vq->ring_dma[i] == DMA_MAPPING_ERROR)
            return "dma_map failed for a virtqueue ring";
    }
    vq->desc = rings[0];
    vq->avail = rings[1];
    vq->used = rings[2];
    /* Free list threaded through desc.next. */
    for (u16 i = 0; i < n; i++)
        vq->desc[i].next = (u16)(i + 1);
    vq->free_head = 0;
    vq->num_free = n;
    return NULL;
}

const char *virtio_setup_queue(struct virtio_dev *vd, struct virtq *vq, u16 index, u16 max_size)
{
    u64 cc = vd->common;
    if (index >= mmio_read16(cc + CC_NUM_QUEUES))
        return "the device has fewer queues than the driver needs";
    mmio_write16(cc + CC_QUEUE_SELECT, index);
    u16 dev_size = mmio_read16(cc + CC_QUEUE_SIZE);
    if (dev_size == 0)
        return "the device reports queue size 0 for a queue the driver needs";
    *vq = (struct virtq){.vdev = vd, .index = index};
    vq->size = pow2_floor(dev_size < max_size ? dev_size : max_size);
    const char *err = alloc_rings(vq);
    if (err)
        return err;
    mmio_write16(cc + CC_QUEUE_SIZE, vq->size);
    mmio_write16(cc + CC_QUEUE_MSIX_VECTOR, VIRTIO_NO_VECTOR);
    mmio_write64_split(cc + CC_QUEUE_DESC, vq->ring_dma[0]);
    mmio_write64_split(cc + CC_QUEUE_DRIVER, vq->ring_dma[1]);
    mmio_write64_split(cc + CC_QUEUE_DEVICE, vq->ring_dma[2]);
    vq->notify_addr = vd->notify + (u64)mmio_read16(cc + CC_QUEUE_NOTIFY_OFF) * vd->notify_multiplier;
    mmio_write16(cc + CC_QUEUE_ENABLE, 1);
    return NULL;
}

int virtq_add(struct virtq *vq, const struct vq_buf *bufs, u16 n)
{
    if (n == 0 || n > vq->num_free)
        return -1;
    u16 head = vq->free_head, id = head, last = head;
    for (u16 i = 0; i < n; i++) {
        struct vring_desc *d = &vq->desc[id];
        d->addr = bufs[i].addr;
        d->len = bufs[i].len;
        d->flags = (u16)((bufs[i].device_writes ? VRING_DESC_F_WRITE : 0) | (i + 1 < n ? VRING_DESC_F_NEXT : 0));
        last = id;
        id = d->next;
    }
    vq->free_head = vq->desc[last].next;
    vq->num_free = (u16)(vq->num_free - n);
    vq->avail->ring[vq->avail_idx & (vq->size - 1)] = head;
    vq->avail_idx++;
    return head;
}

void virtq_publish(struct virtq *vq)
{
    barrier(); /* descriptors and ring entries before the index (x86: stores stay ordered) */
    vq->avail->idx = vq->avail_idx;
}

void virtq_notify(struct virtq *vq)
{
    mb(); /* the index store before reading the device's flags */
    if (!(vq->used->flags & VRING_USED_F_NO_NOTIFY)) {
        mmio_write16(vq->notify_addr, vq->index);
        __atomic_add_fetch(&vq->kicks, 1, __ATOMIC_RELAXED);
    }
}

void virtq_kick(struct virtq *vq)
{
    virtq_publish(vq);
    virtq_notify(vq);
}

bool virtq_pop_used(struct virtq *vq, u32 *id, u32 *len)
{
    if (vq->used->idx == vq->last_used)
        return false;
    barrier(); /* the index before the element it covers */
    struct vring_used_elem e = vq->used->ring[vq->last_used & (vq->size - 1)];
    vq->last_used++;
    if (e.id >= vq->size)
        return false; /* a bad id from the device: drop it rather than corrupt the free list */
    *id = e.id;
    *len = e.len;
    return true;
}

void virtq_free_chain(struct virtq *vq, u16 head)
{
    u16 last = head, count = 1;
    while ((vq->desc[last].flags & VRING_DESC_F_NEXT) && count < vq->size) {
        last = vq->desc[last].next;
        count++;
    }
    vq->desc[last].next = vq->free_head;
    vq->free_head = head;
    vq->num_free = (u16)(vq->num_free + count);
}

bool virtq_get_used(struct virtq *vq, u32 *id, u32 *len)
{
    if (!virtq_pop_used(vq, id, len))
        return false;
    virtq_free_chain(vq, (u16)*id);
    return true;
}

const struct pci_dev *virtio_find(const char *test, const struct pci_dev *devs, size_t ndevs, u16 type,
                                  const char *what)
{
    const u16 ids[] = {(u16)(0x1040 + type), (u16)(0x0fff + type), 0};
    const struct pci_dev *pci = pci_find(devs, ndevs, VIRTIO_VENDOR, ids);
    if (!pci) {
        char why[64];
        snprintf(why, sizeof(why), "no %s device on PCI bus 0", what);
        report_early_exit(test, "unsupported", why, EXIT_UNSUPPORTED, NULL);
    }
    return pci;
}

const char *virtio_dma_open(struct virtio_dev *vd, struct dma_ctx *dma, const struct pci_dev *pci,
                            enum iommu_mode iommu, u64 wanted, const char *what)
{
    static char msg[160];
    const char *err = dma_init(dma, pci, iommu);
    if (!err)
        err = virtio_pci_init(vd, pci, dma);
    if (!err)
        err = virtio_negotiate(vd, VIRTIO_F_ACCESS_PLATFORM | wanted, VIRTIO_F_VERSION_1);
    if (!err && iommu != IOMMU_OFF && !(vd->features & VIRTIO_F_ACCESS_PLATFORM)) {
        dma->unsupported = true;
        snprintf(msg, sizeof(msg),
                 "the %s device does not offer VIRTIO_F_ACCESS_PLATFORM, so the vIOMMU does not apply to it", what);
        err = msg;
    }
    return err;
}
