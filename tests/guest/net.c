/*
 * virtio-net scenarios. net-tx: transmit N frames of S bytes on queue 1 (each one descriptor:
 * the 12-byte virtio_net_hdr followed by the frame), poll the used ring for completions, report
 * a checksum of the frame bytes and TSC cycles per frame.
 *
 * Parameters: iovmm.frames (1000), iovmm.size (frame bytes without the header, 60..65000, 1514),
 * iovmm.batch (frames added per kick, 1), iovmm.queue (max queue size, 256), iovmm.iommu (off),
 * iovmm.timeout_ms (10000), iovmm.reset (1: reset the device at the end), iovmm.bad_frame (frame
 * number queued at a guard IOVA that is never mapped, strict/lazy only: the device's read must
 * fault, so the run ends failed with the vIOMMU's fault fields; result "bad_iova"), and the DMA layer's
 * iovmm.viommu, iovmm.ats, iovmm.lazy_batch, iovmm.lazy_flush (dma.h). The result line carries the
 * DMA counters of dma_report (maps, unmaps, flushes, iommu_reqs, iommu_syncs, *_cycles, ats, ...).
 *
 * Frame i: dst ff:ff:ff:ff:ff:ff, src = the device MAC (52:54:00:00:00:01 without VIRTIO_NET_F_MAC),
 * ethertype 0x88b5, then byte j (j >= 14) = (u8)(i * 31 + j). "checksum" is the wrapping u64 sum of
 * every frame byte of every frame (Ethernet header included, virtio_net_hdr excluded), which a
 * backend can recompute from what it received.
 *
 * iovmm.seq=1 sends net-rx's "sequence frames" instead (bytes 14..21 = i little-endian, byte
 * j >= 22 = (u8)(i * 31 + j), see rx.c), so that another VM's net-rx can verify them through a
 * switch; iovmm.gap_us (0) spaces the frames by at least that many microseconds (a receiver
 * behind a switch drops what finds its RX ring full).
 */
#include "net.h"
#include "env.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1ULL << 5)

/* ------------------------------------------------ shared by the virtio-net scenarios (net.h) */

const char *net_open(struct net_dev *n, const struct pci_dev *pci, enum iommu_mode iommu, u16 rx_size,
                     u16 tx_size)
{
    const char *err = virtio_dma_open(&n->vd, &n->dma, pci, iommu, VIRTIO_NET_F_MAC, "virtio-net");
    if (!err)
        err = virtio_setup_queue(&n->vd, &n->rxq, RX_QUEUE, rx_size);
    if (!err)
        err = virtio_setup_queue(&n->vd, &n->txq, TX_QUEUE, tx_size);
    if (err)
        return err;
    static const u8 default_mac[6] = {0x52, 0x54, 0x00, 0x00, 0x00, 0x01};
    memcpy(n->mac, default_mac, 6);
    if ((n->vd.features & VIRTIO_NET_F_MAC) && n->vd.device_cfg) {
        for (u32 i = 0; i < 6; i++)
            n->mac[i] = virtio_cfg_read8(&n->vd, i);
    }
    return NULL;
}

u8 *net_frame_start(u8 *buf, const u8 *mac, u16 ethertype)
{
    memset(buf, 0, NET_HDR_LEN);
    u8 *f = buf + NET_HDR_LEN;
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    f[12] = (u8)(ethertype >> 8);
    f[13] = (u8)ethertype;
    return f;
}

u8 *net_fill_frame(u8 *buf, const u8 *mac, u64 seq, u64 size, bool seq_layout)
{
    u8 *f = net_frame_start(buf, mac, ETH_P_SEQ);
    for (u64 j = 14; j < size; j++)
        f[j] = (u8)(seq * 31 + j);
    for (u32 i = 0; seq_layout && i < 8; i++)
        f[14 + i] = (u8)(seq >> (8 * i));
    return f;
}

/* ------------------------------------------------------------------ net-tx */

struct net_params {
    u64 frames, size, batch, queue, timeout_ms, reset, bad_frame, seq, gap_us, gap_cycles;
    enum iommu_mode iommu;
};

struct net_tx {
    struct net_dev net;
    u8 *bufs;          /* txq.size slots of `stride` bytes */
    u64 stride;
    u64 *slot_dma;     /* device address of each in-flight slot, by descriptor id */
    u64 sent, completed, checksum, bytes;
    u64 bad_iova;      /* the guard IOVA of iovmm.bad_frame, 0 if none */
    u64 next_tx;       /* iovmm.gap_us: TSC before which no frame is added */
};

static const char *read_params(struct net_params *p)
{
    const char *err;
    if (cmdline_u64("iovmm.frames", 1000, &p->frames) || cmdline_u64("iovmm.size", 1514, &p->size) ||
        cmdline_u64("iovmm.batch", 1, &p->batch) || cmdline_u64("iovmm.queue", 256, &p->queue) ||
        cmdline_u64("iovmm.timeout_ms", 10000, &p->timeout_ms) || cmdline_u64("iovmm.reset", 1, &p->reset) ||
        cmdline_u64("iovmm.bad_frame", ~0ULL, &p->bad_frame) || cmdline_u64("iovmm.seq", 0, &p->seq) ||
        cmdline_u64("iovmm.gap_us", 0, &p->gap_us))
        return "a numeric iovmm.* parameter is malformed";
    if (p->seq > 1 || p->gap_us > 1000000)
        return "iovmm.seq must be 0 or 1 and iovmm.gap_us at most 1000000";
    p->gap_cycles = p->gap_us * ms_to_cycles(1) / 1000;
    if (p->size < 60 || p->size > 65000)
        return "iovmm.size must be 60..65000 bytes";
    if (p->batch == 0 || p->queue < 2 || p->queue > 32768)
        return "iovmm.batch must be >= 1 and iovmm.queue 2..32768";
    if ((err = iommu_mode_param(IOMMU_OFF, &p->iommu)))
        return err;
    if (p->bad_frame != ~0ULL && p->iommu != IOMMU_STRICT && p->iommu != IOMMU_LAZY)
        return "iovmm.bad_frame needs iovmm.iommu=strict or lazy";
    return NULL;
}

static const char *net_setup(struct net_tx *n, const struct pci_dev *pci, const struct net_params *p)
{
    /* The RX queue stays empty. */
    const char *err = net_open(&n->net, pci, p->iommu, 64, (u16)p->queue);
    if (err)
        return err;
    n->stride = ALIGN_UP(NET_HDR_LEN + p->size, 64);
    n->bufs = mem_alloc(n->stride * n->net.txq.size, 4096);
    n->slot_dma = mem_alloc(sizeof(u64) * n->net.txq.size, 64);
    if (!n->bufs || !n->slot_dma)
        return "out of guest memory for transmit buffers (raise --memory or lower iovmm.size)";
    virtio_driver_ok(&n->net.vd);
    return NULL;
}

/* Writes frame `seq` (net_fill_frame); returns the sum of its bytes. */
static u64 fill_frame(u8 *buf, const u8 *mac, u64 seq, u64 size, bool seq_layout)
{
    const u8 *f = net_fill_frame(buf, mac, seq, size, seq_layout);
    u64 sum = 0;
    for (u64 j = 0; j < size; j++)
        sum += f[j];
    return sum;
}

/* Adds up to `batch` frames; returns false on a DMA mapping failure. */
static bool submit_batch(struct net_tx *n, const struct net_params *p)
{
    u64 added = 0;
    while (added < p->batch && n->sent < p->frames && n->net.txq.num_free > 0 &&
           (!p->gap_cycles || rdtsc() >= n->next_tx)) {
        n->next_tx = rdtsc() + p->gap_cycles;
        u16 slot = n->net.txq.free_head; /* the descriptor id virtq_add will use */
        u8 *buf = n->bufs + (u64)slot * n->stride;
        n->checksum += fill_frame(buf, n->net.mac, n->sent, p->size, p->seq);
        u64 len = NET_HDR_LEN + p->size;
        u64 addr = dma_map(&n->net.dma, buf, len, DMA_TO_DEVICE);
        if (addr == DMA_MAPPING_ERROR)
            return dma_fail(&n->net.dma, "dma_map failed");
        n->slot_dma[slot] = addr;
        if (n->sent == p->bad_frame) { /* the mapping stays valid: reap unmaps it as usual */
            n->bad_iova = dma_guard_iova(&n->net.dma, len);
            if (n->bad_iova == DMA_MAPPING_ERROR)
                return dma_fail(&n->net.dma, "no guard IOVA for iovmm.bad_frame");
            addr = n->bad_iova;
        }
        struct vq_buf b = {.addr = addr, .len = (u32)len, .device_writes = false};
        virtq_add(&n->net.txq, &b, 1);
        n->sent++;
        n->bytes += p->size;
        added++;
    }
    if (added)
        virtq_kick(&n->net.txq);
    return true;
}

static u64 reap(struct net_tx *n, const struct net_params *p)
{
    u32 id, len;
    u64 got = 0;
    while (virtq_get_used(&n->net.txq, &id, &len)) {
        dma_unmap(&n->net.dma, n->slot_dma[id], NET_HDR_LEN + p->size, DMA_TO_DEVICE);
        n->completed++;
        got++;
    }
    return got;
}

/* Runs the transmit loop; returns NULL, or why it failed (timeout, a DMA/vIOMMU failure). */
static const char *transmit(struct net_tx *n, const struct net_params *p)
{
    u64 timeout = ms_to_cycles(p->timeout_ms), last_progress = rdtsc();
    while (n->completed < p->frames) {
        bool submitted = submit_batch(n, p);
        u64 got = reap(n, p);
        if (!submitted || n->net.dma.error)
            return n->net.dma.error ? n->net.dma.error : "dma_map failed";
        if (!poll_progress(got, &last_progress, timeout))
            return "no transmit completion within iovmm.timeout_ms";
    }
    dma_flush(&n->net.dma);
    return n->net.dma.error;
}

static void report(struct net_tx *n, const struct net_params *p, const char *why, u64 cycles)
{
    struct result r;
    result_begin_run(&r, "net-tx", why, p->iommu);
    result_u64(&r, "frames", p->frames);
    result_u64(&r, "size", p->size);
    result_u64(&r, "sent", n->sent);
    result_u64(&r, "completed", n->completed);
    result_u64(&r, "bytes", n->bytes);
    result_u64(&r, "checksum", n->checksum);
    result_u64(&r, "queue_size", n->net.txq.size);
    result_u64(&r, "kicks", n->net.txq.kicks);
    result_hex(&r, "features", n->net.vd.features);
    if (n->bad_iova)
        result_hex(&r, "bad_iova", n->bad_iova);
    result_u64(&r, "cycles", cycles);
    result_u64(&r, "cycles_per_frame", p->frames ? cycles / p->frames : 0);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    dma_report(&n->net.dma, &r);
    result_emit(&r);
}

int run_net_tx(const struct pci_dev *devs, size_t ndevs)
{
    static struct net_tx n; /* zeroed .bss; large enough to keep off the stack */
    struct net_params p;
    const char *err = read_params(&p);
    if (err)
        return report_early_exit("net-tx", "error", err, EXIT_USAGE, NULL);
    const struct pci_dev *pci = virtio_find("net-tx", devs, ndevs, VIRTIO_ID_NET, "virtio-net");
    if (!pci)
        return EXIT_UNSUPPORTED;
    err = net_setup(&n, pci, &p);
    if (err)
        return report_dma_setup_error("net-tx", err, &n.net.dma);
    printf("IOVMM-TEST net-tx: %02x:%02x.%x queue %u, %llu frames of %llu bytes\n", pci->bus, pci->dev,
           pci->fn, n.net.txq.size, (unsigned long long)p.frames, (unsigned long long)p.size);
    u64 t0 = rdtsc();
    const char *why = transmit(&n, &p);
    u64 cycles = rdtsc() - t0;
    why = virtio_reset_after_run(&n.net.vd, p.reset, why);
    report(&n, &p, why, cycles);
    return why ? EXIT_FAILED : EXIT_OK;
}
