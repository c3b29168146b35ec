/*
 * virtio-net receive scenarios.
 *
 * net-rx: posts RX buffers mapped device-writable (DMA_FROM_DEVICE: VT-d PTE W only, virtio-iommu
 * MAP flag WRITE only; iovmm.rx_dir=rw maps them DMA_BIDIRECTIONAL, which DPDK's enqueue needs: it
 * translates RX buffers with VHOST_ACCESS_RW), verifies every received frame, unmaps and re-posts
 * it. With iovmm.loopback=1 the guest also transmits the frames (credit-limited to the posted RX
 * buffers, so a loop-back never finds the RX ring empty) and expects them back.
 *
 * Frame `seq` of `size` bytes (the "sequence frame", shared with the test back end's generator):
 * dst ff:ff:ff:ff:ff:ff, src = the device MAC, ethertype 0x88b5, bytes 14..21 = seq (LE),
 * byte j >= 22 = (u8)(seq * 31 + j). The MACs are not checked (a loop-back may swap them).
 * Every frame must arrive in order (seq = number received before it), with used length 12 + size.
 * "rx_checksum" is the wrapping u64 sum of the bytes from offset 12 (ethertype) of every frame.
 *
 * Parameters: iovmm.frames (1000), iovmm.size (60..9000, 1000), iovmm.queue (RX/TX queue size,
 * 256), iovmm.iommu, iovmm.timeout_ms (10000), iovmm.reset (1), iovmm.loopback (0),
 * iovmm.rx_dir (w | rw), and the DMA layer's parameters (dma.h).
 *
 * iovmm.lossy=1 (frames from another VM through a switch, which drops what it cannot deliver):
 * a frame may be missing but never out of order, duplicated or damaged; each received frame is
 * checked against its own sequence number, gaps are counted in "lost" (with the frames after
 * the last one received), and a silence of iovmm.timeout_ms after the first frame ends the run
 * without failing it. Result fields "lost" and "last_seq". With iovmm.loopback the run also waits
 * for every TX completion, and a frame the loop-back dropped (testpmd, once its TX retries ran out)
 * is a gap like any other.
 *
 * net-stale (strict only): the use-after-unmap probe of the security invariant. Sends frame 0
 * normally, unmaps it (the strict unmap waits for the invalidation), writes the marker frame
 * (ethertype 0x88b6, payload "IOVMM-STALE-MARKER" repeated) into the same buffer and posts a TX
 * descriptor at the old IOVA without mapping it. The device must not transfer it: it faults (the
 * vIOMMU reports the IOVA) and, with a back end that completes faulted chains, the descriptor
 * completes and iovmm.after more frames go out normally. iovmm.expect_stall=1 (DPDK: a refused miss
 * leaves its pending entry forever, so the queue stops) accepts a stale descriptor that never
 * completes within iovmm.stale_wait_ms (2000) and then sends nothing more. iovmm.unmap_to_end=1
 * (virtio-iommu) unmaps frame 0 with one UNMAP [its IOVA, u64 max] instead of its exact range.
 */
#include "net.h"
#include "env.h"
#include "virtio.h"

#define SEQ_OFF 14
#define PATTERN_OFF 22
#define SUM_OFF 12

struct rx_params {
    u64 frames, size, queue, timeout_ms, reset, loopback, after, stale_wait_ms, expect_stall, unmap_to_end, lossy;
    enum iommu_mode iommu;
    enum dma_dir rx_dir;
};

struct rx_dev {
    struct net_dev net;
    u64 stride;
    u8 *rx_bufs, *tx_bufs;
    u64 *rx_dma, *tx_dma; /* device address per descriptor id */
    u64 received, bad_frames, bad_len, first_bad, rx_checksum;
    u64 next_seq, lost; /* iovmm.lossy */
    u64 sent, completed;
};

static const char *read_rx_params(struct rx_params *p)
{
    char s[16];
    const char *err;
    if (cmdline_u64("iovmm.frames", 1000, &p->frames) || cmdline_u64("iovmm.size", 1000, &p->size) ||
        cmdline_u64("iovmm.queue", 256, &p->queue) || cmdline_u64("iovmm.timeout_ms", 10000, &p->timeout_ms) ||
        cmdline_u64("iovmm.reset", 1, &p->reset) || cmdline_u64("iovmm.loopback", 0, &p->loopback) ||
        cmdline_u64("iovmm.after", 4, &p->after) || cmdline_u64("iovmm.stale_wait_ms", 2000, &p->stale_wait_ms) ||
        cmdline_u64("iovmm.expect_stall", 0, &p->expect_stall) ||
        cmdline_u64("iovmm.unmap_to_end", 0, &p->unmap_to_end) || cmdline_u64("iovmm.lossy", 0, &p->lossy))
        return "a numeric iovmm.* parameter is malformed";
    if (p->size < 60 || p->size > 9000)
        return "iovmm.size must be 60..9000 bytes";
    if (p->queue < 2 || p->queue > 32768)
        return "iovmm.queue must be 2..32768";
    if ((err = iommu_mode_param(IOMMU_OFF, &p->iommu)))
        return err;
    p->rx_dir = DMA_FROM_DEVICE;
    if (cmdline_get("iovmm.rx_dir", s, sizeof(s))) {
        if (strcmp(s, "rw") == 0)
            p->rx_dir = DMA_BIDIRECTIONAL;
        else if (strcmp(s, "w") != 0)
            return "iovmm.rx_dir must be w or rw";
    }
    return NULL;
}

static const char *alloc_bufs(struct rx_dev *n, const struct rx_params *p)
{
    n->stride = ALIGN_UP(NET_HDR_LEN + p->size, 64);
    n->rx_bufs = mem_alloc(n->stride * n->net.rxq.size, 4096);
    n->tx_bufs = mem_alloc(n->stride * n->net.txq.size, 4096);
    n->rx_dma = mem_alloc(sizeof(u64) * n->net.rxq.size, 64);
    n->tx_dma = mem_alloc(sizeof(u64) * n->net.txq.size, 64);
    if (!n->rx_bufs || !n->tx_bufs || !n->rx_dma || !n->tx_dma)
        return "out of guest memory for buffers (raise --memory or lower iovmm.size/queue)";
    return NULL;
}

static const char *rx_setup(struct rx_dev *n, const struct pci_dev *pci, const struct rx_params *p)
{
    const char *err = net_open(&n->net, pci, p->iommu, (u16)p->queue, (u16)p->queue);
    if (!err)
        err = alloc_bufs(n, p);
    if (err)
        return err;
    virtio_driver_ok(&n->net.vd);
    return NULL;
}

/* Checks frame `seq`; returns its checksum contribution or records why it is bad. */
static bool check_seq_frame(struct rx_dev *n, const u8 *f, u64 seq, u64 size)
{
    u64 got = 0, sum = 0;
    for (u32 i = 0; i < 8; i++)
        got |= (u64)f[SEQ_OFF + i] << (8 * i);
    bool ok = f[12] == (ETH_P_SEQ >> 8) && f[13] == (ETH_P_SEQ & 0xff) && got == seq;
    for (u64 j = PATTERN_OFF; ok && j < size; j++)
        ok = f[j] == (u8)(seq * 31 + j);
    for (u64 j = SUM_OFF; j < size; j++)
        sum += f[j];
    n->rx_checksum += sum;
    if (!ok && n->bad_frames++ == 0)
        n->first_bad = seq;
    return ok;
}

static bool post_rx(struct rx_dev *n, const struct rx_params *p)
{
    u16 slot = n->net.rxq.free_head;
    u8 *buf = n->rx_bufs + (u64)slot * n->stride;
    memset(buf, 0, NET_HDR_LEN + p->size);
    u64 addr = dma_map(&n->net.dma, buf, NET_HDR_LEN + p->size, p->rx_dir);
    if (addr == DMA_MAPPING_ERROR)
        return dma_fail(&n->net.dma, "dma_map of an RX buffer failed");
    n->rx_dma[slot] = addr;
    struct vq_buf b = {.addr = addr, .len = (u32)(NET_HDR_LEN + p->size), .device_writes = true};
    return virtq_add(&n->net.rxq, &b, 1) >= 0 || dma_fail(&n->net.dma, "RX ring full");
}

static bool fill_rx_ring(struct rx_dev *n, const struct rx_params *p)
{
    bool ok = true;
    while (ok && n->net.rxq.num_free > 0)
        ok = post_rx(n, p);
    virtq_kick(&n->net.rxq);
    return ok;
}

/* Reaps received frames: verify, unmap, re-post. Returns how many arrived. */
static u64 reap_rx(struct rx_dev *n, const struct rx_params *p)
{
    u32 id, len;
    u64 got = 0;
    while (virtq_get_used(&n->net.rxq, &id, &len)) {
        dma_unmap(&n->net.dma, n->rx_dma[id], NET_HDR_LEN + p->size, p->rx_dir);
        if (len != NET_HDR_LEN + p->size) {
            if (n->bad_len++ == 0 && n->bad_frames == 0)
                n->first_bad = n->received;
        } else {
            const u8 *f = n->rx_bufs + (u64)id * n->stride + NET_HDR_LEN;
            u64 seq = n->received;
            if (p->lossy) {
                seq = 0;
                for (u32 i = 0; i < 8; i++)
                    seq |= (u64)f[SEQ_OFF + i] << (8 * i);
                if (seq < n->next_seq || seq >= p->frames)
                    seq = n->next_seq; /* out of order or bogus: fails the check below */
                n->lost += seq - n->next_seq;
                n->next_seq = seq + 1;
            }
            check_seq_frame(n, f, seq, p->size);
        }
        n->received++;
        got++;
        if (!post_rx(n, p))
            return got;
    }
    if (got)
        virtq_kick(&n->net.rxq);
    return got;
}

/*
 * Loop-back: transmit while a posted RX buffer is free for the frame to come back into. A frame
 * the back end dropped takes no RX buffer; with iovmm.lossy the gaps seen so far (next_seq counts
 * them with the frames received) give their credit back, so drops do not shrink the window.
 */
static bool submit_tx(struct rx_dev *n, const struct rx_params *p)
{
    u64 added = 0, back = p->lossy ? n->next_seq : n->received;
    while (n->sent < p->frames && n->net.txq.num_free > 0 && n->sent - back < n->net.rxq.size) {
        u16 slot = n->net.txq.free_head;
        u8 *buf = n->tx_bufs + (u64)slot * n->stride;
        net_fill_frame(buf, n->net.mac, n->sent, p->size, true);
        u64 addr = dma_map(&n->net.dma, buf, NET_HDR_LEN + p->size, DMA_TO_DEVICE);
        if (addr == DMA_MAPPING_ERROR)
            return dma_fail(&n->net.dma, "dma_map of a TX buffer failed");
        n->tx_dma[slot] = addr;
        struct vq_buf b = {.addr = addr, .len = (u32)(NET_HDR_LEN + p->size), .device_writes = false};
        virtq_add(&n->net.txq, &b, 1);
        n->sent++;
        added++;
    }
    if (added)
        virtq_kick(&n->net.txq);
    return true;
}

static u64 reap_tx(struct rx_dev *n, const struct rx_params *p)
{
    u32 id, len;
    u64 got = 0;
    while (virtq_get_used(&n->net.txq, &id, &len)) {
        if (n->tx_dma[id] != DMA_MAPPING_ERROR) /* net-stale's descriptor was never mapped */
            dma_unmap(&n->net.dma, n->tx_dma[id], NET_HDR_LEN + p->size, DMA_TO_DEVICE);
        n->completed++;
        got++;
    }
    return got;
}

static bool rx_done(const struct rx_dev *n, const struct rx_params *p)
{
    bool tx_done = !p->loopback || n->completed >= p->frames;
    if (p->lossy)
        return n->next_seq >= p->frames && tx_done;
    return n->received >= p->frames && tx_done;
}

/* Receives (and with iovmm.loopback, transmits) every frame; returns NULL, or why it failed. */
static const char *receive(struct rx_dev *n, const struct rx_params *p)
{
    u64 timeout = ms_to_cycles(p->timeout_ms), last = rdtsc();
    if (!fill_rx_ring(n, p))
        return n->net.dma.error;
    /* A harness that starts the sender only now cannot lose the first frames. */
    printf("IOVMM-TEST net-rx: ready, %u RX buffers posted\n", n->net.rxq.size - n->net.rxq.num_free);
    while (!rx_done(n, p)) {
        if (p->loopback && !submit_tx(n, p))
            break;
        u64 got = reap_rx(n, p) + (p->loopback ? reap_tx(n, p) : 0);
        if (n->net.dma.error)
            break;
        if (!poll_progress(got, &last, timeout)) {
            if (p->lossy && n->received)
                break; /* the rest was lost */
            return "no frame received within iovmm.timeout_ms";
        }
    }
    dma_flush(&n->net.dma);
    return n->net.dma.error ? n->net.dma.error : (n->bad_frames || n->bad_len) ? "a received frame is wrong" : NULL;
}

static void rx_report(struct rx_dev *n, const struct rx_params *p, const char *why, u64 cycles)
{
    struct result r;
    result_begin_run(&r, "net-rx", why, p->iommu);
    result_str(&r, "rx_dir", p->rx_dir == DMA_BIDIRECTIONAL ? "rw" : "w");
    result_u64(&r, "frames", p->frames);
    result_u64(&r, "size", p->size);
    result_u64(&r, "loopback", p->loopback);
    result_u64(&r, "received", n->received);
    result_u64(&r, "bad_frames", n->bad_frames);
    result_u64(&r, "bad_len", n->bad_len);
    if (n->bad_frames || n->bad_len)
        result_u64(&r, "first_bad", n->first_bad);
    result_u64(&r, "rx_checksum", n->rx_checksum);
    if (p->lossy) {
        result_u64(&r, "lost", n->lost + (p->frames - n->next_seq));
        result_u64(&r, "last_seq", n->next_seq ? n->next_seq - 1 : 0);
    }
    result_u64(&r, "sent", n->sent);
    result_u64(&r, "completed", n->completed);
    result_u64(&r, "queue_size", n->net.rxq.size);
    result_u64(&r, "cycles", cycles);
    result_u64(&r, "cycles_per_frame", p->frames ? cycles / p->frames : 0);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    dma_report(&n->net.dma, &r);
    result_emit(&r);
}

/* Reads parameters, finds and sets up the device; returns -1 when ready, else the exit code. */
static int rx_prepare(struct rx_dev *n, struct rx_params *p, const char *test, const struct pci_dev *devs,
                      size_t ndevs)
{
    const char *err = read_rx_params(p);
    if (err)
        return report_early_exit(test, "error", err, EXIT_USAGE, NULL);
    const struct pci_dev *pci = virtio_find(test, devs, ndevs, VIRTIO_ID_NET, "virtio-net");
    if (!pci)
        return EXIT_UNSUPPORTED;
    err = rx_setup(n, pci, p);
    return err ? report_dma_setup_error(test, err, &n->net.dma) : -1;
}

int run_net_rx(const struct pci_dev *devs, size_t ndevs)
{
    static struct rx_dev n;
    struct rx_params p;
    int code = rx_prepare(&n, &p, "net-rx", devs, ndevs);
    if (code >= 0)
        return code;
    printf("IOVMM-TEST net-rx: queue %u, %llu frames of %llu bytes%s\n", n.net.rxq.size, (unsigned long long)p.frames,
           (unsigned long long)p.size, p.loopback ? " (loop-back)" : "");
    u64 t0 = rdtsc();
    const char *why = receive(&n, &p);
    u64 cycles = rdtsc() - t0;
    why = virtio_reset_after_run(&n.net.vd, p.reset, why);
    rx_report(&n, &p, why, cycles);
    return why ? EXIT_FAILED : EXIT_OK;
}

/* ------------------------------------------------------------------ net-stale */

static void fill_marker(u8 *buf, const u8 *mac, u64 size)
{
    static const char marker[] = "IOVMM-STALE-MARKER";
    u8 *f = net_frame_start(buf, mac, ETH_P_MARKER);
    for (u64 j = 14; j < size; j++)
        f[j] = (u8)marker[(j - 14) % (sizeof(marker) - 1)];
}

/* Waits up to `ms` for `count` TX completions; returns false on timeout. */
static bool wait_tx(struct rx_dev *n, const struct rx_params *p, u64 count, u64 ms)
{
    u64 t0 = rdtsc(), limit = ms_to_cycles(ms);
    while (n->completed < count) {
        if (!reap_tx(n, p)) {
            if (rdtsc() - t0 > limit)
                return false;
            cpu_relax();
        }
    }
    return true;
}

/* Posts one TX descriptor at `addr` (mapped, or stale: then reaping does not unmap it). */
static void post_tx_at(struct rx_dev *n, const struct rx_params *p, u64 addr, bool mapped)
{
    n->tx_dma[n->net.txq.free_head] = mapped ? addr : DMA_MAPPING_ERROR;
    struct vq_buf b = {.addr = addr, .len = (u32)(NET_HDR_LEN + p->size), .device_writes = false};
    virtq_add(&n->net.txq, &b, 1);
    n->sent++;
    virtq_kick(&n->net.txq);
}

/* Frame 0 normally, then the marker at its unmapped IOVA; returns the stale IOVA or an error. */
static const char *post_stale(struct rx_dev *n, const struct rx_params *p, u64 *stale)
{
    u8 *buf = n->tx_bufs;
    net_fill_frame(buf, n->net.mac, 0, p->size, true);
    u64 addr = dma_map(&n->net.dma, buf, NET_HDR_LEN + p->size, DMA_TO_DEVICE);
    if (addr == DMA_MAPPING_ERROR)
        return n->net.dma.error;
    post_tx_at(n, p, addr, true);
    u64 t0 = rdtsc(), limit = ms_to_cycles(p->timeout_ms);
    u32 id, len;
    while (!virtq_get_used(&n->net.txq, &id, &len)) {
        if (rdtsc() - t0 > limit)
            return "frame 0 was not transmitted";
        cpu_relax();
    }
    n->completed++;
    if (p->unmap_to_end)
        dma_unmap_to_end(&n->net.dma, addr, NET_HDR_LEN + p->size);
    else
        dma_unmap(&n->net.dma, addr, NET_HDR_LEN + p->size, DMA_TO_DEVICE); /* strict: invalidation done */
    if (n->net.dma.error)
        return n->net.dma.error;
    fill_marker(buf, n->net.mac, p->size);
    *stale = addr;
    post_tx_at(n, p, addr, false); /* use after unmap: the device must not read it */
    return NULL;
}

static const char *stale_run(struct rx_dev *n, const struct rx_params *p, u64 *stale, bool *stale_done)
{
    const char *err = post_stale(n, p, stale);
    if (err)
        return err;
    *stale_done = wait_tx(n, p, 2, p->stale_wait_ms);
    if (!*stale_done)
        return p->expect_stall ? NULL : "the device hung on the stale descriptor";
    /* The device is not hung: more frames go out normally (IOVAs may be reused now). */
    u64 target = n->completed + p->after;
    while (n->sent < 2 + p->after && n->net.txq.num_free > 0) {
        u8 *buf = n->tx_bufs + (u64)n->net.txq.free_head * n->stride;
        net_fill_frame(buf, n->net.mac, n->sent, p->size, true);
        u64 addr = dma_map(&n->net.dma, buf, NET_HDR_LEN + p->size, DMA_TO_DEVICE);
        if (addr == DMA_MAPPING_ERROR)
            return n->net.dma.error;
        post_tx_at(n, p, addr, true);
    }
    return wait_tx(n, p, target, p->timeout_ms) ? n->net.dma.error : "frames after the stale descriptor were not sent";
}

static void stale_report(struct rx_dev *n, const struct rx_params *p, const char *why, u64 stale, bool done)
{
    struct result r;
    result_begin_run(&r, "net-stale", why, p->iommu);
    result_hex(&r, "stale_iova", stale);
    result_u64(&r, "stale_completed", done);
    result_u64(&r, "unmap_to_end", p->unmap_to_end);
    result_u64(&r, "sent", n->sent);
    result_u64(&r, "completed", n->completed);
    result_u64(&r, "size", p->size);
    dma_report(&n->net.dma, &r);
    result_emit(&r);
}

int run_net_stale(const struct pci_dev *devs, size_t ndevs)
{
    static struct rx_dev n;
    struct rx_params p;
    int code = rx_prepare(&n, &p, "net-stale", devs, ndevs);
    if (code >= 0)
        return code;
    if (n.net.dma.mode != IOMMU_STRICT)
        return report_early_exit("net-stale", "error", "net-stale needs iovmm.iommu=strict", EXIT_USAGE, &n.net.dma);
    /* The RX ring is posted so that a back end that starts only with both queues runs. */
    fill_rx_ring(&n, &p);
    u64 stale = 0;
    bool done = false;
    const char *why = stale_run(&n, &p, &stale, &done);
    /* A descriptor still queued (the device stalled on it) would make the reset wait for it. */
    why = virtio_reset_after_run(&n.net.vd, p.reset && (done || !p.expect_stall), why);
    stale_report(&n, &p, why, stale, done);
    return why ? EXIT_FAILED : EXIT_OK;
}
