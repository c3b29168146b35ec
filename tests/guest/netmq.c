/*
 * net-mq: multiqueue transmit (vhost-user net with queues=N). Negotiates VIRTIO_NET_F_MQ and
 * VIRTIO_NET_F_CTRL_VQ, sets up every queue the device has (max_virtqueue_pairs pairs and the
 * control queue), sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET(iovmm.queues) on the control queue (its
 * buffers DMA-mapped like any other: IOVAs behind a vIOMMU), then transmits iovmm.frames frames
 * round-robin on the first iovmm.queues transmit queues (frame i on transmitq i % queues).
 * With iovmm.cpus=N (1..4, at most iovmm.queues) the guest starts N - 1 more vCPUs (smp.c) and
 * vCPU c drives the queues q with q % N == c concurrently with the others, each through its
 * own DMA context and IOVA range but the same vIOMMU (dma.h: dma_split). iovmm.start_cpus=M
 * (iovmm.cpus..4, default iovmm.cpus) starts M vCPUs of which only the first iovmm.cpus drive
 * queues: the others spin idle, as a waiting vCPU does (the benchmark's control row).
 *
 * Frames and "checksum" as net-tx's (net.c): frame i = broadcast dst, src = device MAC,
 * ethertype 0x88b5, byte j >= 14 = (u8)(i * 31 + j); the checksum is the wrapping sum of every
 * frame byte. Result keys: frames, size, queues, max_pairs, ctrl_status (0 = VIRTIO_NET_OK),
 * completed, checksum, tx0..tx<queues-1> (frames completed per queue pair), cpus, cycles (set-up
 * included), run_cycles (the transmit phase alone), plus the DMA counters. Parameters:
 * iovmm.frames (1000), iovmm.size (60..4000, 1514), iovmm.queues (2, 1..16), iovmm.queue
 * (transmit queue size, 64), iovmm.timeout_ms (10000), iovmm.reset (1), iovmm.cpus (1),
 * iovmm.iommu and the DMA layer's options (dma.h).
 */
#include "netmq.h"
#include "env.h"
#include "smp.h"
#include "virtio.h"

#define MQ_F_MAC (1ULL << 5)
#define MQ_F_CTRL_VQ (1ULL << 17)
#define MQ_F_MQ (1ULL << 22)
#define MQ_HDR_LEN 12
#define MQ_MAX_PAIRS 16
#define MQ_CTRL_MQ 4
#define MQ_CTRL_MQ_VQ_PAIRS_SET 0
#define MQ_IOVA_PER_CPU (1ULL << 30)

struct mq_params {
    u64 frames, size, queues, queue, timeout_ms, reset, cpus, start_cpus;
    enum iommu_mode iommu;
};

struct mq_tx {
    struct virtio_dev vd;
    struct dma_ctx dma;
    struct virtq rxq[MQ_MAX_PAIRS], txq[MQ_MAX_PAIRS], ctrlq;
    u64 max_pairs;
    u8 mac[6];
    u8 *bufs[MQ_MAX_PAIRS];     /* txq.size slots of `stride` bytes per queue */
    u64 *slot_dma[MQ_MAX_PAIRS];
    u64 stride, sent, completed, checksum;
    u64 per_queue[MQ_MAX_PAIRS]; /* completed per queue pair */
    u64 sent_q[MQ_MAX_PAIRS];
    u64 ctrl_status;
    u64 run_cycles;
};

static const char *mq_params(struct mq_params *p)
{
    if (cmdline_u64("iovmm.frames", 1000, &p->frames) || cmdline_u64("iovmm.size", 1514, &p->size) ||
        cmdline_u64("iovmm.queues", 2, &p->queues) || cmdline_u64("iovmm.queue", 64, &p->queue) ||
        cmdline_u64("iovmm.timeout_ms", 10000, &p->timeout_ms) || cmdline_u64("iovmm.reset", 1, &p->reset) ||
        cmdline_u64("iovmm.cpus", 1, &p->cpus))
        return "a numeric iovmm.* parameter is malformed";
    if (cmdline_u64("iovmm.start_cpus", p->cpus, &p->start_cpus))
        return "a numeric iovmm.* parameter is malformed";
    if (p->size < 60 || p->size > 4000)
        return "iovmm.size must be 60..4000 bytes";
    if (p->queues < 1 || p->queues > MQ_MAX_PAIRS)
        return "iovmm.queues must be 1..16";
    if (p->queue < 2 || p->queue > 1024)
        return "iovmm.queue must be 2..1024";
    if (p->cpus < 1 || p->cpus > SMP_MAX_CPUS || p->cpus > p->queues)
        return "iovmm.cpus must be 1..4 and at most iovmm.queues";
    if (p->start_cpus < p->cpus || p->start_cpus > SMP_MAX_CPUS)
        return "iovmm.start_cpus must be iovmm.cpus..4";
    return iommu_mode_param(IOMMU_OFF, &p->iommu);
}

static const char *mq_setup(struct mq_tx *n, const struct pci_dev *pci, const struct mq_params *p)
{
    const char *err = virtio_dma_open(&n->vd, &n->dma, pci, p->iommu, MQ_F_MAC | MQ_F_MQ | MQ_F_CTRL_VQ,
                                      "virtio-net");
    if (err)
        return err;
    bool mq = (n->vd.features & (MQ_F_MQ | MQ_F_CTRL_VQ)) == (MQ_F_MQ | MQ_F_CTRL_VQ);
    n->max_pairs = 1;
    if (mq && n->vd.device_cfg)
        n->max_pairs = (u64)virtio_cfg_read8(&n->vd, 8) | (u64)virtio_cfg_read8(&n->vd, 9) << 8;
    if (p->queues > 1 && !mq)
        return "the device does not offer VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ";
    if (n->max_pairs < p->queues || n->max_pairs > MQ_MAX_PAIRS)
        return "max_virtqueue_pairs is below iovmm.queues (or above 16)";
    for (u64 q = 0; q < n->max_pairs && !err; q++) {
        err = virtio_setup_queue(&n->vd, &n->rxq[q], (u16)(2 * q), 64);
        if (!err)
            err = virtio_setup_queue(&n->vd, &n->txq[q], (u16)(2 * q + 1), (u16)p->queue);
    }
    if (!err && mq)
        err = virtio_setup_queue(&n->vd, &n->ctrlq, (u16)(2 * n->max_pairs), 64);
    if (err)
        return err;
    static const u8 default_mac[6] = {0x52, 0x54, 0x00, 0x00, 0x00, 0x01};
    memcpy(n->mac, default_mac, 6);
    for (u32 i = 0; (n->vd.features & MQ_F_MAC) && n->vd.device_cfg && i < 6; i++)
        n->mac[i] = virtio_cfg_read8(&n->vd, i);
    n->stride = ALIGN_UP(MQ_HDR_LEN + p->size, 64);
    for (u64 q = 0; q < p->queues; q++) {
        n->bufs[q] = mem_alloc(n->stride * n->txq[q].size, 4096);
        n->slot_dma[q] = mem_alloc(sizeof(u64) * n->txq[q].size, 64);
        if (!n->bufs[q] || !n->slot_dma[q])
            return "out of guest memory for transmit buffers (raise --memory or lower iovmm.size)";
    }
    virtio_driver_ok(&n->vd);
    return NULL;
}

/* VQ_PAIRS_SET(queues) on the control queue; its status in n->ctrl_status. */
static const char *mq_set_pairs(struct mq_tx *n, const struct mq_params *p)
{
    u8 *cmd = mem_alloc(64, 64);
    if (!cmd)
        return "out of guest memory for the control command";
    cmd[0] = MQ_CTRL_MQ;
    cmd[1] = MQ_CTRL_MQ_VQ_PAIRS_SET;
    cmd[2] = (u8)p->queues;
    cmd[3] = (u8)(p->queues >> 8);
    volatile u8 *status = cmd + 32;
    *status = 0xff;
    u64 cmd_dma = dma_map(&n->dma, cmd, 4, DMA_TO_DEVICE);
    u64 status_dma = dma_map(&n->dma, cmd + 32, 1, DMA_FROM_DEVICE);
    if (cmd_dma == DMA_MAPPING_ERROR || status_dma == DMA_MAPPING_ERROR)
        return n->dma.error ? n->dma.error : "dma_map failed";
    struct vq_buf bufs[2] = {{cmd_dma, 4, false}, {status_dma, 1, true}};
    if (virtq_add(&n->ctrlq, bufs, 2) < 0)
        return "the control queue is full";
    virtq_kick(&n->ctrlq);
    u64 t0 = rdtsc(), timeout = ms_to_cycles(p->timeout_ms);
    u32 id, len;
    while (!virtq_get_used(&n->ctrlq, &id, &len)) {
        if (rdtsc() - t0 > timeout)
            return "no control queue completion within iovmm.timeout_ms";
        cpu_relax();
    }
    dma_unmap(&n->dma, cmd_dma, 4, DMA_TO_DEVICE);
    dma_unmap(&n->dma, status_dma, 1, DMA_FROM_DEVICE);
    n->ctrl_status = *status;
    if (len != 1)
        return "the control command came back without a status byte";
    return *status == 0 ? NULL : "the device answered VQ_PAIRS_SET with VIRTIO_NET_ERR";
}

/* One vCPU's share of the run: the queues q with q % cpus == cpu, its own DMA context. */
struct mq_worker {
    struct mq_tx *n;
    const struct mq_params *p;
    struct dma_ctx dma;
    u32 cpu;
    u64 sent, completed, checksum;
    const char *err;
};

/* Frames the run puts on queue q: frame i goes on transmitq i % queues. */
static u64 mq_frames_for(const struct mq_params *p, u64 q) { return p->frames / p->queues + (q < p->frames % p->queues); }

static u64 mq_reap(struct mq_worker *w, u64 q)
{
    struct mq_tx *n = w->n;
    u64 got = 0;
    u32 id, len;
    while (virtq_get_used(&n->txq[q], &id, &len)) {
        if (id >= n->txq[q].size)
            continue;
        dma_unmap(&w->dma, n->slot_dma[q][id], MQ_HDR_LEN + w->p->size, DMA_TO_DEVICE);
        n->per_queue[q]++;
        got++;
    }
    w->completed += got;
    return got;
}

/* Adds queue q's next frame (global index sent_q * queues + q) if the queue has room; false on
 * a mapping failure. */
static bool mq_submit(struct mq_worker *w, u64 q, bool *added)
{
    struct mq_tx *n = w->n;
    const struct mq_params *p = w->p;
    *added = false;
    struct virtq *vq = &n->txq[q];
    if (vq->num_free == 0 || n->sent_q[q] == mq_frames_for(p, q))
        return true;
    u64 frame = n->sent_q[q] * p->queues + q;
    u16 slot = vq->free_head;
    u8 *buf = n->bufs[q] + (u64)slot * n->stride;
    memset(buf, 0, MQ_HDR_LEN);
    u8 *f = buf + MQ_HDR_LEN;
    memset(f, 0xff, 6);
    memcpy(f + 6, n->mac, 6);
    f[12] = 0x88;
    f[13] = 0xb5;
    for (u64 j = 14; j < p->size; j++)
        f[j] = (u8)(frame * 31 + j);
    for (u64 j = 0; j < p->size; j++)
        w->checksum += f[j];
    u64 addr = dma_map(&w->dma, buf, MQ_HDR_LEN + p->size, DMA_TO_DEVICE);
    if (addr == DMA_MAPPING_ERROR)
        return dma_fail(&w->dma, "dma_map failed");
    struct vq_buf b = {addr, (u32)(MQ_HDR_LEN + p->size), false};
    int id = virtq_add(vq, &b, 1);
    if (id < 0)
        return dma_fail(&w->dma, "virtq_add failed with free descriptors");
    n->slot_dma[q][id] = addr;
    virtq_kick(vq);
    n->sent_q[q]++;
    w->sent++;
    *added = true;
    return true;
}

/* Frames this worker must complete. */
static u64 mq_worker_frames(const struct mq_worker *w, u32 cpus)
{
    u64 total = 0;
    for (u64 q = w->cpu; q < w->p->queues; q += cpus)
        total += mq_frames_for(w->p, q);
    return total;
}

static const char *mq_transmit(struct mq_worker *w, u32 cpus)
{
    const struct mq_params *p = w->p;
    u64 timeout = ms_to_cycles(p->timeout_ms), last = rdtsc(), target = mq_worker_frames(w, cpus);
    while (w->completed < target) {
        bool progress = false;
        for (u64 q = w->cpu; q < p->queues; q += cpus) {
            bool added = false;
            if (!mq_submit(w, q, &added))
                return w->dma.error ? w->dma.error : "dma_map failed";
            progress |= added | (mq_reap(w, q) != 0);
            if (w->dma.error)
                return w->dma.error;
        }
        if (progress)
            last = rdtsc();
        else if (rdtsc() - last > timeout)
            return "no transmit completion within iovmm.timeout_ms";
        else
            cpu_relax();
    }
    dma_flush(&w->dma);
    return w->dma.error;
}

static u32 mq_cpus; /* vCPUs driving queues (iovmm.cpus) */

static void mq_worker_run(void *arg)
{
    struct mq_worker *w = arg;
    w->err = mq_transmit(w, mq_cpus);
}

/* Runs one worker per vCPU (the BSP is worker 0) and folds their results into n. */
static const char *mq_run(struct mq_tx *n, const struct mq_params *p)
{
    static struct mq_worker workers[SMP_MAX_CPUS];
    mq_cpus = (u32)p->cpus;
    for (u32 c = 0; c < mq_cpus; c++) {
        workers[c] = (struct mq_worker){.n = n, .p = p, .cpu = c};
        const char *err = dma_split(&n->dma, &workers[c].dma, MQ_IOVA_PER_CPU);
        if (err)
            return err;
    }
    for (u32 c = 1; c < mq_cpus; c++)
        smp_call(c, mq_worker_run, &workers[c]);
    mq_worker_run(&workers[0]);
    const char *err = workers[0].err;
    for (u32 c = 1; c < mq_cpus; c++) {
        if (!smp_wait(c, p->timeout_ms + 1000) && !err)
            err = "a vCPU did not finish its queues";
        if (!err)
            err = workers[c].err;
    }
    for (u32 c = 0; c < mq_cpus; c++) {
        n->sent += workers[c].sent;
        n->completed += workers[c].completed;
        n->checksum += workers[c].checksum;
        dma_merge(&n->dma, &workers[c].dma);
    }
    return err;
}

static int mq_report(struct mq_tx *n, const struct mq_params *p, const char *why, u64 cycles)
{
    int code = why ? EXIT_FAILED : EXIT_OK;
    const char *status = why ? "failed" : "ok";
    if (why && n->dma.error)
        status = dma_exit_status(&n->dma, &code);
    struct result r;
    result_begin(&r, "net-mq", status);
    if (why)
        result_str(&r, "error", why);
    result_str(&r, "iommu", iommu_mode_name(p->iommu));
    result_u64(&r, "frames", p->frames);
    result_u64(&r, "size", p->size);
    result_u64(&r, "queues", p->queues);
    result_u64(&r, "cpus", smp_cpus());
    result_u64(&r, "driving_cpus", p->cpus);
    result_u64(&r, "max_pairs", n->max_pairs);
    result_u64(&r, "ctrl_status", n->ctrl_status);
    result_u64(&r, "sent", n->sent);
    result_u64(&r, "completed", n->completed);
    result_u64(&r, "checksum", n->checksum);
    static const char *const keys[MQ_MAX_PAIRS] = {"tx0",  "tx1",  "tx2",  "tx3",  "tx4",  "tx5",
                                                   "tx6",  "tx7",  "tx8",  "tx9",  "tx10", "tx11",
                                                   "tx12", "tx13", "tx14", "tx15"};
    for (u64 q = 0; q < p->queues; q++)
        result_u64(&r, keys[q], n->per_queue[q]);
    result_u64(&r, "cycles", cycles);
    result_u64(&r, "run_cycles", n->run_cycles);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    dma_report(&n->dma, &r);
    result_emit(&r);
    return code;
}

int run_net_mq(const struct pci_dev *devs, size_t ndevs)
{
    static struct mq_tx n; /* zeroed .bss */
    struct mq_params p;
    const char *err = mq_params(&p);
    if (err) {
        struct result r;
        result_begin(&r, "net-mq", "error");
        result_str(&r, "error", err);
        result_emit(&r);
        return EXIT_USAGE;
    }
    static const u16 net_ids[] = {0x1041, 0x1000, 0};
    const struct pci_dev *pci = pci_find(devs, ndevs, VIRTIO_VENDOR, net_ids);
    if (!pci) {
        struct result r;
        result_begin(&r, "net-mq", "unsupported");
        result_str(&r, "error", "no virtio-net device on PCI bus 0");
        result_emit(&r);
        return EXIT_UNSUPPORTED;
    }
    err = smp_start((u32)p.start_cpus, 5000);
    if (err) {
        struct result r;
        result_begin(&r, "net-mq", "failed");
        result_str(&r, "error", err);
        result_emit(&r);
        return EXIT_FAILED;
    }
    u64 t0 = rdtsc();
    err = mq_setup(&n, pci, &p);
    if (!err && (n.vd.features & MQ_F_MQ))
        err = mq_set_pairs(&n, &p);
    if (!err) {
        printf("IOVMM-TEST net-mq: %02x:%02x.%x %llu of %llu pairs, %llu frames of %llu bytes\n", pci->bus,
               pci->dev, pci->fn, (unsigned long long)p.queues, (unsigned long long)n.max_pairs,
               (unsigned long long)p.frames, (unsigned long long)p.size);
        u64 r0 = rdtsc();
        err = mq_run(&n, &p);
        n.run_cycles = rdtsc() - r0;
    }
    if (p.reset && !virtio_reset(&n.vd) && !err)
        err = "the device did not finish its reset after the run";
    return mq_report(&n, &p, err, rdtsc() - t0);
}
