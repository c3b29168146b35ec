/*
 * virtio-blk scenario "blk": reads the device id (GET_ID), writes a pattern across the disk with
 * several requests in flight, flushes, reads everything back and verifies it word by word.
 *
 * Every request is a 3-descriptor chain like Linux's: the 16-byte header mapped DMA_TO_DEVICE
 * (read-only for the device), the data buffer mapped DMA_TO_DEVICE for writes and
 * DMA_FROM_DEVICE (device-writable only) for reads, and the status byte mapped DMA_FROM_DEVICE.
 * Buffers are mapped before they are queued and unmapped when the request completes.
 *
 * Parameters: iovmm.size (bytes per request, a multiple of 512, 512..1M; 4096), iovmm.inflight
 * (requests in flight, 1..64; 8), iovmm.requests (per phase; default: the whole disk, capacity /
 * size; more wrap around), iovmm.seed (pattern seed; 1), iovmm.iommu (off), iovmm.timeout_ms
 * (10000), iovmm.reset (1), iovmm.bad_sector (1: one extra read starting at the first sector past
 * the end, which must complete with VIRTIO_BLK_S_IOERR), iovmm.ro_read (1, strict/lazy only: one
 * read whose data buffer is mapped read-only but queued device-writable; the device's write must
 * be refused, so it must complete with IOERR and leave the buffer untouched), and the DMA layer's iovmm.viommu,
 * iovmm.ats, iovmm.lazy_batch, iovmm.lazy_flush.
 *
 * The result line has write_cycles and read_cycles (TSC cycles of each phase) and
 * flush_wait_cycles (the FLUSH alone) for the benchmark's IOPS and MB/s.
 *
 * Disk byte offset o (8-aligned) holds the u64 (o + 1) * 0x9e3779b97f4a7c15 ^ seed, so a host
 * can check the image. Read buffers are poisoned (0xa5) before each read.
 *
 * Scenario "blk-stale" (use after unmap, strict only) is described in its section below.
 */
#include "blk.h"
#include "env.h"
#include "virtio.h"

#define VIRTIO_BLK_F_BLK_SIZE (1ULL << 6)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define SECTOR 512ULL
#define MAX_INFLIGHT 64
#define ID_LEN 20
#define STATUS_PENDING 0xff

struct blk_params {
    u64 size, inflight, requests, seed, timeout_ms, reset, bad_sector, ro_read;
    enum iommu_mode iommu;
};

struct blk_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

/* One request in flight: its buffers and their device addresses. */
struct slot {
    struct blk_hdr *hdr;
    u8 *status;
    u8 *data;
    u64 hdr_dma, data_dma, status_dma, data_len;
    u64 index; /* request number within the phase */
    bool write, busy;
    bool ro_map; /* iovmm.ro_read: data mapped read-only although the device must write it */
};

struct blk {
    struct virtio_dev vd;
    struct dma_ctx dma;
    struct virtq q;
    struct slot slots[MAX_INFLIGHT];
    u16 slot_of_head[256];
    u64 capacity; /* sectors */
    u64 blk_size;
    u64 done, errors, mismatches, flushed, bad_status, ro_status, ro_intact;
    u64 write_cycles, read_cycles, flush_wait_cycles;
    char serial[ID_LEN + 1];
};

static const char *read_params(struct blk_params *p)
{
    const char *err;
    if (cmdline_u64("iovmm.size", 4096, &p->size) || cmdline_u64("iovmm.inflight", 8, &p->inflight) ||
        cmdline_u64("iovmm.requests", 0, &p->requests) || cmdline_u64("iovmm.seed", 1, &p->seed) ||
        cmdline_u64("iovmm.timeout_ms", 10000, &p->timeout_ms) || cmdline_u64("iovmm.reset", 1, &p->reset) ||
        cmdline_u64("iovmm.bad_sector", 0, &p->bad_sector) || cmdline_u64("iovmm.ro_read", 0, &p->ro_read))
        return "a numeric iovmm.* parameter is malformed";
    if (p->size < SECTOR || p->size > (1 << 20) || p->size % SECTOR)
        return "iovmm.size must be a multiple of 512 in 512..1M";
    if (p->inflight == 0 || p->inflight > MAX_INFLIGHT)
        return "iovmm.inflight must be 1..64";
    if ((err = iommu_mode_param(IOMMU_OFF, &p->iommu)))
        return err;
    if (p->ro_read && p->iommu != IOMMU_STRICT && p->iommu != IOMMU_LAZY)
        return "iovmm.ro_read needs iovmm.iommu=strict or lazy";
    return NULL;
}

static u16 queue_size_for(u64 inflight)
{
    u16 n = 4;
    while (n < 3 * inflight + 2 && n < 256)
        n = (u16)(n * 2);
    return n;
}

static const char *alloc_slots(struct blk *b, const struct blk_params *p)
{
    for (u64 i = 0; i < p->inflight; i++) {
        struct slot *s = &b->slots[i];
        s->hdr = mem_alloc(sizeof(struct blk_hdr), 64);
        s->status = mem_alloc(64, 64);
        s->data = mem_alloc(p->size, 4096);
        if (!s->hdr || !s->status || !s->data)
            return "out of guest memory for request buffers (raise --memory or lower iovmm.size)";
    }
    return NULL;
}

static const char *blk_setup(struct blk *b, const struct pci_dev *pci, const struct blk_params *p)
{
    const char *err = virtio_dma_open(&b->vd, &b->dma, pci, p->iommu, VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_BLK_SIZE,
                                      "virtio-blk");
    if (!err && !b->vd.device_cfg)
        err = "the virtio-blk device has no device configuration window";
    if (!err)
        err = virtio_setup_queue(&b->vd, &b->q, 0, queue_size_for(p->inflight));
    if (!err)
        err = alloc_slots(b, p);
    if (err)
        return err;
    b->capacity = virtio_cfg_read64(&b->vd, 0);
    b->blk_size = (b->vd.features & VIRTIO_BLK_F_BLK_SIZE) ? virtio_cfg_read32(&b->vd, 20) : SECTOR;
    if (b->capacity < p->size / SECTOR)
        return "the disk is smaller than one request (iovmm.size)";
    virtio_driver_ok(&b->vd);
    return NULL;
}

static u64 pattern(u64 off, u64 seed) { return (off + 1) * 0x9e3779b97f4a7c15ULL ^ seed; }

static void fill(u64 *w, u64 disk_off, u64 len, u64 seed)
{
    for (u64 i = 0; i < len / 8; i++)
        w[i] = pattern(disk_off + 8 * i, seed);
}

static bool verify(const u64 *w, u64 disk_off, u64 len, u64 seed)
{
    for (u64 i = 0; i < len / 8; i++) {
        if (w[i] != pattern(disk_off + 8 * i, seed))
            return false;
    }
    return true;
}

/* Queues a slot's chain: its mapped header and status, the data at device address `data_addr`
 * (data_len 0: no data descriptor). */
static bool queue_chain(struct blk *b, struct slot *s, u64 data_addr)
{
    struct vq_buf bufs[3] = {{.addr = s->hdr_dma, .len = sizeof(*s->hdr), .device_writes = false}};
    u16 n = 1;
    if (s->data_len)
        bufs[n++] = (struct vq_buf){.addr = data_addr, .len = (u32)s->data_len, .device_writes = !s->write};
    bufs[n++] = (struct vq_buf){.addr = s->status_dma, .len = 1, .device_writes = true};
    int head = virtq_add(&b->q, bufs, n);
    if (head < 0)
        return dma_fail(&b->dma, "the virtqueue is full");
    b->slot_of_head[head] = (u16)(s - b->slots);
    s->busy = true;
    return true;
}

/* Maps a slot's buffers and queues its chain (data_len 0: header and status only). */
static bool submit(struct blk *b, struct slot *s, u32 type, u64 sector)
{
    struct dma_ctx *d = &b->dma;
    *s->hdr = (struct blk_hdr){.type = type, .sector = sector};
    *s->status = STATUS_PENDING;
    enum dma_dir data_dir = s->write || s->ro_map ? DMA_TO_DEVICE : DMA_FROM_DEVICE;
    s->hdr_dma = dma_map(d, s->hdr, sizeof(*s->hdr), DMA_TO_DEVICE);
    s->data_dma = s->data_len ? dma_map(d, s->data, s->data_len, data_dir) : 0;
    s->status_dma = dma_map(d, s->status, 1, DMA_FROM_DEVICE);
    if (s->hdr_dma == DMA_MAPPING_ERROR || s->data_dma == DMA_MAPPING_ERROR || s->status_dma == DMA_MAPPING_ERROR)
        return dma_fail(d, "dma_map failed");
    return queue_chain(b, s, s->data_dma);
}

static void release(struct blk *b, struct slot *s)
{
    enum dma_dir data_dir = s->write || s->ro_map ? DMA_TO_DEVICE : DMA_FROM_DEVICE;
    dma_unmap(&b->dma, s->hdr_dma, sizeof(*s->hdr), DMA_TO_DEVICE);
    if (s->data_len)
        dma_unmap(&b->dma, s->data_dma, s->data_len, data_dir);
    dma_unmap(&b->dma, s->status_dma, 1, DMA_FROM_DEVICE);
    s->busy = false;
}

/* Pops one completion without unmapping its buffers; returns its slot or NULL. */
static struct slot *pop_used(struct blk *b)
{
    u32 id, len;
    if (!virtq_get_used(&b->q, &id, &len) || id >= b->q.size)
        return NULL;
    struct slot *s = &b->slots[b->slot_of_head[id]];
    s->busy = false;
    return s;
}

/* Pops one completion and unmaps its buffers; returns its slot or NULL. */
static struct slot *reap_one(struct blk *b)
{
    struct slot *s = pop_used(b);
    if (s)
        release(b, s);
    return s;
}

/* Kicks and waits for the single outstanding request; `unmap`: release its buffers. */
static bool wait_single(struct blk *b, const struct blk_params *p, bool unmap)
{
    u64 t0 = rdtsc(), timeout = ms_to_cycles(p->timeout_ms);
    virtq_kick(&b->q);
    while (!(unmap ? reap_one(b) : pop_used(b))) {
        if (b->dma.error || rdtsc() - t0 > timeout)
            return false;
        cpu_relax();
    }
    return true;
}

/* Waits for the single outstanding request of `s` (GET_ID, FLUSH, the bad read). */
static bool wait_one(struct blk *b, const struct blk_params *p) { return wait_single(b, p, true); }

struct phase {
    bool write;
    u64 per_disk, next, done;
};

static void start_request(struct blk *b, const struct blk_params *p, struct phase *ph, struct slot *s)
{
    u64 sector = (ph->next % ph->per_disk) * (p->size / SECTOR);
    s->write = ph->write;
    s->data_len = p->size;
    s->index = ph->next++;
    if (ph->write)
        fill((u64 *)s->data, sector * SECTOR, p->size, p->seed);
    else
        memset(s->data, 0xa5, p->size);
    submit(b, s, ph->write ? T_OUT : T_IN, sector);
}

static void finish_request(struct blk *b, const struct blk_params *p, struct phase *ph, struct slot *s)
{
    if (*s->status != S_OK)
        b->errors++;
    else if (!ph->write && !verify((u64 *)s->data, s->hdr->sector * SECTOR, p->size, p->seed))
        b->mismatches++;
    ph->done++;
}

/* Runs one phase (all writes or all reads) with up to iovmm.inflight requests in flight. */
static bool run_phase(struct blk *b, const struct blk_params *p, u64 n, bool write, const char **why)
{
    struct phase ph = {.write = write, .per_disk = b->capacity / (p->size / SECTOR)};
    u64 timeout = ms_to_cycles(p->timeout_ms), last = rdtsc();
    while (ph.done < n) {
        bool added = false;
        for (u64 i = 0; i < p->inflight && ph.next < n && !b->dma.error; i++) {
            if (!b->slots[i].busy) {
                start_request(b, p, &ph, &b->slots[i]);
                added = true;
            }
        }
        if (added)
            virtq_kick(&b->q);
        struct slot *s;
        bool progress = false;
        while ((s = reap_one(b))) {
            finish_request(b, p, &ph, s);
            progress = true;
        }
        if (b->dma.error) {
            *why = b->dma.error;
            return false;
        }
        if (!poll_progress(progress, &last, timeout)) {
            *why = "no request completion within iovmm.timeout_ms";
            return false;
        }
    }
    b->done += ph.done;
    return true;
}

static bool get_id(struct blk *b, const struct blk_params *p)
{
    struct slot *s = &b->slots[0];
    s->write = false;
    s->data_len = ID_LEN;
    memset(s->data, 0, ID_LEN);
    if (!submit(b, s, T_GET_ID, 0) || !wait_one(b, p))
        return false;
    for (u32 i = 0; i < ID_LEN; i++) {
        char c = (char)s->data[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
        b->serial[i] = ok ? c : '\0';
        if (!ok)
            break;
    }
    return *s->status == S_OK;
}

/* A request with data_len 0 (FLUSH), or one sector starting at `sector` (the bad read). */
static bool single(struct blk *b, const struct blk_params *p, u32 type, u64 sector, u8 *status)
{
    struct slot *s = &b->slots[0];
    s->write = false;
    s->data_len = type == T_FLUSH ? 0 : SECTOR;
    if (!submit(b, s, type, sector) || !wait_one(b, p))
        return false;
    *status = *s->status;
    return true;
}

/*
 * iovmm.ro_read: a read whose data buffer is mapped read-only (DMA_TO_DEVICE) but queued as
 * device-writable. The backend's write must be refused by the vIOMMU: the request fails with
 * IOERR and the buffer keeps its marker.
 */
static const char *ro_read(struct blk *b, const struct blk_params *p)
{
    struct slot *s = &b->slots[0];
    s->write = false;
    s->ro_map = true;
    s->data_len = p->size;
    memset(s->data, 0x5c, p->size);
    bool done = submit(b, s, T_IN, 0) && wait_one(b, p);
    s->ro_map = false;
    if (!done)
        return "the read into a read-only mapping did not complete";
    b->ro_status = *s->status;
    b->ro_intact = 1;
    for (u64 i = 0; i < p->size; i++)
        b->ro_intact &= s->data[i] == 0x5c;
    if (b->ro_status != S_IOERR)
        return "a read into a read-only mapping did not fail with VIRTIO_BLK_S_IOERR";
    return b->ro_intact ? NULL : "the device wrote into a read-only mapping";
}

static const char *run_all(struct blk *b, const struct blk_params *p, u64 n)
{
    const char *why = NULL;
    if (!get_id(b, p))
        return b->dma.error ? b->dma.error : "GET_ID failed";
    u64 t0 = rdtsc();
    if (!run_phase(b, p, n, true, &why))
        return why;
    b->write_cycles = rdtsc() - t0;
    u8 st = STATUS_PENDING;
    t0 = rdtsc();
    if ((b->vd.features & VIRTIO_BLK_F_FLUSH)) {
        if (!single(b, p, T_FLUSH, 0, &st) || st != S_OK)
            return "FLUSH failed";
        b->flushed = 1;
    }
    b->flush_wait_cycles = rdtsc() - t0;
    t0 = rdtsc();
    if (!run_phase(b, p, n, false, &why))
        return why;
    b->read_cycles = rdtsc() - t0;
    if (p->bad_sector) {
        if (!single(b, p, T_IN, b->capacity, &st))
            return "the out-of-range read did not complete";
        b->bad_status = st;
        if (st != S_IOERR)
            return "a read past the end of the disk did not fail with VIRTIO_BLK_S_IOERR";
    }
    if (p->ro_read && (why = ro_read(b, p)))
        return why;
    dma_flush(&b->dma);
    if (b->errors)
        return "a request completed with an error status";
    if (b->mismatches)
        return "data read back differs from the pattern written";
    return b->dma.error;
}

static void report(struct blk *b, const struct blk_params *p, u64 n, const char *why)
{
    struct result r;
    result_begin_run(&r, "blk", why, p->iommu);
    result_u64(&r, "size", p->size);
    result_u64(&r, "inflight", p->inflight);
    result_u64(&r, "requests", n);
    result_u64(&r, "completed", b->done);
    result_u64(&r, "capacity", b->capacity);
    result_u64(&r, "blk_size", b->blk_size);
    result_u64(&r, "errors", b->errors);
    result_u64(&r, "mismatches", b->mismatches);
    result_u64(&r, "flushed", b->flushed);
    if (p->bad_sector)
        result_u64(&r, "bad_sector_status", b->bad_status);
    if (p->ro_read) {
        result_u64(&r, "ro_read_status", b->ro_status);
        result_u64(&r, "ro_read_intact", b->ro_intact);
    }
    result_str(&r, "serial", b->serial);
    result_u64(&r, "write_cycles", b->write_cycles);
    result_u64(&r, "read_cycles", b->read_cycles);
    result_u64(&r, "flush_wait_cycles", b->flush_wait_cycles);
    result_u64(&r, "queue_size", b->q.size);
    result_u64(&r, "kicks", b->q.kicks);
    result_hex(&r, "features", b->vd.features);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    dma_report(&b->dma, &r);
    result_emit(&r);
}

int run_blk(const struct pci_dev *devs, size_t ndevs)
{
    static struct blk b; /* zeroed .bss */
    struct blk_params p;
    const char *err = read_params(&p);
    if (err)
        return report_early_exit("blk", "error", err, EXIT_USAGE, NULL);
    const struct pci_dev *pci = virtio_find("blk", devs, ndevs, VIRTIO_ID_BLOCK, "virtio-blk");
    if (!pci)
        return EXIT_UNSUPPORTED;
    err = blk_setup(&b, pci, &p);
    if (err)
        return report_dma_setup_error("blk", err, &b.dma);
    u64 n = p.requests ? p.requests : b.capacity / (p.size / SECTOR);
    printf("IOVMM-TEST blk: %02x:%02x.%x queue %u, %llu sectors, %llu requests of %llu bytes, %llu in flight\n",
           pci->bus, pci->dev, pci->fn, b.q.size, (unsigned long long)b.capacity, (unsigned long long)n,
           (unsigned long long)p.size, (unsigned long long)p.inflight);
    const char *why = run_all(&b, &p, n);
    why = virtio_reset_after_run(&b.vd, p.reset, why);
    report(&b, &p, n, why);
    return why ? EXIT_FAILED : EXIT_OK;
}

/* ------------------------------------------------------------------ blk-stale */

/*
 * blk-stale (strict only): the use-after-unmap probe of the security invariant for virtio-blk.
 * Disk regions of iovmm.size bytes: 0 "normal", 1 "stale_out", 2 "stale_marker", 3 "after".
 *
 *  1. Maps the headers and status bytes of the three stale requests first, and a marker buffer
 *     (stale_marker_buf, filled with the marker) read-only, never queued: first-fit IOVA
 *     allocation then cannot hand the stale IOVAs to anything mapped after the unmaps in 3.
 *  2. A normal OUT of the pattern to region 0 and a normal IN of region 0 (verified), both left
 *     mapped until both completed: the device held translations for both data buffers.
 *  3. Unmaps both requests' buffers and the marker buffer; strict: each unmap returns after its
 *     invalidation completed. The buffers stay allocated.
 *  4. Fills the OUT data buffer with the marker, poisons the IN data buffer (STALE_POISON), and
 *     posts, one at a time, with their mapped headers and status bytes:
 *       stale_out     OUT to region 1 from the OUT buffer's old IOVA,
 *       stale_marker  OUT to region 2 from the marker buffer's old IOVA,
 *       stale_in      IN of region 0 (the pattern) into the IN buffer's old IOVA.
 *     Each must complete with VIRTIO_BLK_S_IOERR (the device's access faults) and the IN buffer
 *     must keep its poison. A request not completed within iovmm.timeout_ms is reported
 *     (stale_completed) and ends the run.
 *  5. The device is not hung: an OUT of the pattern to region 3 and its read back, then reads of
 *     regions 1 and 2, which must not hold the marker (marker_on_disk).
 */
#define STALE_SLOTS 5    /* the normal OUT and IN, three stale requests */
#define STALE_POISON 0x3c
enum { ST_OUT, ST_MARKER, ST_IN, ST_N };
static const char stale_marker[] = "IOVMM-BLK-STALE-MARKER";
static const char *const stale_names[ST_N] = {"stale_out", "stale_marker", "stale_in"};

struct stale {
    u64 iova[ST_N], sector[ST_N];
    u8 status[ST_N];
    u64 completed, normal_sector, after_sector;
    bool normal_ok, in_intact, marker_on_disk, after_ok;
    u8 *marker_buf;
};

static void fill_marker(u8 *buf, u64 len)
{
    for (u64 i = 0; i < len; i++)
        buf[i] = (u8)stale_marker[i % (sizeof(stale_marker) - 1)];
}

static bool has_marker(const u8 *buf, u64 len)
{
    u64 m = sizeof(stale_marker) - 1;
    for (u64 i = 0; i + m <= len; i++) {
        if (memcmp(buf + i, stale_marker, m) == 0)
            return true;
    }
    return false;
}

/* Maps a slot's header and status byte only (its data address is chosen at queue time). */
static bool map_meta(struct blk *b, struct slot *s)
{
    s->hdr_dma = dma_map(&b->dma, s->hdr, sizeof(*s->hdr), DMA_TO_DEVICE);
    s->status_dma = dma_map(&b->dma, s->status, 1, DMA_FROM_DEVICE);
    return s->hdr_dma != DMA_MAPPING_ERROR && s->status_dma != DMA_MAPPING_ERROR;
}

static void unmap_meta(struct blk *b, struct slot *s)
{
    dma_unmap(&b->dma, s->hdr_dma, sizeof(*s->hdr), DMA_TO_DEVICE);
    dma_unmap(&b->dma, s->status_dma, 1, DMA_FROM_DEVICE);
}

/* One request with its buffers mapped by submit(), waited for; `unmap`: released after. */
static bool normal_request(struct blk *b, const struct blk_params *p, struct slot *s, bool write, u64 sector,
                           bool unmap)
{
    s->write = write;
    s->data_len = p->size;
    if (write)
        fill((u64 *)s->data, sector * SECTOR, p->size, p->seed);
    else
        memset(s->data, 0xa5, p->size);
    return submit(b, s, write ? T_OUT : T_IN, sector) && wait_single(b, p, unmap) && *s->status == S_OK &&
           (write || verify((u64 *)s->data, sector * SECTOR, p->size, p->seed));
}

/* Steps 1-3: returns NULL with st->iova[] set to unmapped IOVAs, or why not. */
static const char *stale_prepare(struct blk *b, const struct blk_params *p, struct stale *st)
{
    struct slot *w = &b->slots[0], *r = &b->slots[1], *x = &b->slots[2];
    for (int i = 0; i < ST_N; i++) {
        if (!map_meta(b, &x[i]))
            return b->dma.error ? b->dma.error : "dma_map failed";
    }
    fill_marker(st->marker_buf, p->size);
    u64 m = dma_map(&b->dma, st->marker_buf, p->size, DMA_TO_DEVICE);
    if (m == DMA_MAPPING_ERROR)
        return b->dma.error;
    bool ok = normal_request(b, p, w, true, st->normal_sector, false);
    if (!w->busy && !b->dma.error)
        ok = normal_request(b, p, r, false, st->normal_sector, false) && ok;
    if (w->busy || r->busy)
        return "a normal request before the stale ones did not complete";
    if (b->dma.error)
        return b->dma.error;
    st->normal_ok = ok;
    st->iova[ST_OUT] = w->data_dma;
    st->iova[ST_MARKER] = m;
    st->iova[ST_IN] = r->data_dma;
    release(b, w); /* strict: each unmap returns after its invalidation completed */
    release(b, r);
    dma_unmap(&b->dma, m, p->size, DMA_TO_DEVICE);
    if (b->dma.error)
        return b->dma.error;
    return ok ? NULL : "the normal write or read before the stale requests failed";
}

/* Step 4. */
static const char *stale_requests(struct blk *b, const struct blk_params *p, struct stale *st)
{
    struct slot *r = &b->slots[1], *x = &b->slots[2];
    fill_marker(b->slots[0].data, p->size);
    memset(r->data, STALE_POISON, p->size);
    static const u32 types[ST_N] = {T_OUT, T_OUT, T_IN};
    for (int i = 0; i < ST_N; i++) {
        struct slot *s = &x[i];
        s->write = types[i] == T_OUT;
        s->data_len = p->size;
        *s->hdr = (struct blk_hdr){.type = types[i], .sector = st->sector[i]};
        *s->status = STATUS_PENDING;
        /* Use after unmap: the data descriptor points at an IOVA nothing maps any more. */
        if (!queue_chain(b, s, st->iova[i]) || !wait_single(b, p, false))
            return b->dma.error ? b->dma.error : "the device did not complete a request at a stale IOVA";
        st->completed++;
        st->status[i] = *s->status;
    }
    st->in_intact = true;
    for (u64 i = 0; i < p->size; i++)
        st->in_intact &= r->data[i] == STALE_POISON;
    for (int i = 0; i < ST_N; i++)
        unmap_meta(b, &x[i]);
    if (b->dma.error)
        return b->dma.error;
    for (int i = 0; i < ST_N; i++) {
        if (st->status[i] != S_IOERR)
            return "a request at a stale IOVA did not fail with VIRTIO_BLK_S_IOERR";
    }
    return st->in_intact ? NULL : "the device wrote into a buffer at a stale IOVA";
}

/* Step 5. */
static const char *stale_after(struct blk *b, const struct blk_params *p, struct stale *st)
{
    struct slot *w = &b->slots[0], *r = &b->slots[1];
    st->after_ok = normal_request(b, p, w, true, st->after_sector, true) &&
                   normal_request(b, p, r, false, st->after_sector, true);
    if (!st->after_ok)
        return b->dma.error ? b->dma.error : "a normal request after the stale ones failed";
    for (int i = ST_OUT; i <= ST_MARKER; i++) {
        r->write = false;
        r->data_len = p->size;
        memset(r->data, 0, p->size);
        if (!submit(b, r, T_IN, st->sector[i]) || !wait_one(b, p) || *r->status != S_OK)
            return "reading back a stale request's region failed";
        st->marker_on_disk |= has_marker(r->data, p->size);
    }
    dma_flush(&b->dma);
    if (b->dma.error)
        return b->dma.error;
    return st->marker_on_disk ? "the marker of a stale request reached the disk" : NULL;
}

static void stale_report(struct blk *b, const struct blk_params *p, const struct stale *st, const char *why)
{
    struct result r;
    result_begin_run(&r, "blk-stale", why, p->iommu);
    result_u64(&r, "size", p->size);
    result_u64(&r, "capacity", b->capacity);
    result_str(&r, "marker", stale_marker);
    result_u64(&r, "normal_sector", st->normal_sector);
    result_u64(&r, "after_sector", st->after_sector);
    for (int i = 0; i < ST_N; i++) {
        char key[32];
        snprintf(key, sizeof(key), "%s_iova", stale_names[i]);
        result_hex(&r, key, st->iova[i]);
        snprintf(key, sizeof(key), "%s_sector", stale_names[i]);
        result_u64(&r, key, st->sector[i]);
        if ((u64)i < st->completed) {
            snprintf(key, sizeof(key), "%s_status", stale_names[i]);
            result_u64(&r, key, st->status[i]);
        }
    }
    result_u64(&r, "normal_ok", st->normal_ok);
    result_u64(&r, "stale_completed", st->completed);
    result_u64(&r, "stale_in_intact", st->in_intact);
    result_u64(&r, "marker_on_disk", st->marker_on_disk);
    result_u64(&r, "after_ok", st->after_ok);
    dma_report(&b->dma, &r);
    result_emit(&r);
}

int run_blk_stale(const struct pci_dev *devs, size_t ndevs)
{
    static struct blk b;
    static struct stale st;
    struct blk_params p;
    const char *err = read_params(&p);
    if (!err && p.iommu != IOMMU_STRICT)
        err = "blk-stale needs iovmm.iommu=strict";
    if (!err && p.inflight < STALE_SLOTS)
        err = "blk-stale needs iovmm.inflight >= 5";
    if (err)
        return report_early_exit("blk-stale", "error", err, EXIT_USAGE, NULL);
    const struct pci_dev *pci = virtio_find("blk-stale", devs, ndevs, VIRTIO_ID_BLOCK, "virtio-blk");
    if (!pci)
        return EXIT_UNSUPPORTED;
    err = blk_setup(&b, pci, &p);
    u64 per = p.size / SECTOR;
    if (!err && b.dma.mode != IOMMU_STRICT)
        err = "blk-stale needs strict mode (the vIOMMU downgraded it)";
    if (!err && b.capacity / 4 < per)
        err = "blk-stale needs a disk of at least 4 * iovmm.size bytes";
    if (!err && !(st.marker_buf = mem_alloc(p.size, 4096)))
        err = "out of guest memory for the marker buffer";
    if (err)
        return report_dma_setup_error("blk-stale", err, &b.dma);
    st.normal_sector = 0;
    st.sector[ST_OUT] = per;
    st.sector[ST_MARKER] = 2 * per;
    st.sector[ST_IN] = st.normal_sector;
    st.after_sector = 3 * per;
    printf("IOVMM-TEST blk-stale: %02x:%02x.%x, %llu-byte requests\n", pci->bus, pci->dev, pci->fn,
           (unsigned long long)p.size);
    const char *why = stale_prepare(&b, &p, &st);
    if (!why)
        why = stale_requests(&b, &p, &st);
    if (!why)
        why = stale_after(&b, &p, &st);
    /* A request still queued (the device hung on it) would make the reset wait for it. */
    why = virtio_reset_after_run(&b.vd, p.reset && st.completed == ST_N, why);
    stale_report(&b, &p, &st, why);
    return why ? EXIT_FAILED : EXIT_OK;
}
