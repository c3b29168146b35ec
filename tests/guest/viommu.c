/*
 * virtio-iommu driver (device type 23, PCI 1af4:1057), polled, following what Linux's
 * drivers/iommu/virtio-iommu.c does: features VERSION_1 + MAP_UNMAP (required), INPUT_RANGE,
 * DOMAIN_RANGE, PROBE, BYPASS_CONFIG; PROBE the endpoint (endpoint ID = requester ID) for RESV_MEM
 * regions; ATTACH it to a domain (with BYPASS_CONFIG the first domain ID is the bypass domain and
 * DMA domains start one above). Passthrough = ATTACH with ATTACH_F_BYPASS, or without
 * BYPASS_CONFIG a domain holding 1:1 MAPs of every gap between reserved regions. Every request is
 * synchronous (kick, poll the used ring); lazy unmaps go out together at flush time.
 */
#include "acpi.h"
#include "dma.h"
#include "virtio.h"

#define VIRTIO_IOMMU_PCI_ID 0x1057
#define F_INPUT_RANGE (1ULL << 0)
#define F_DOMAIN_RANGE (1ULL << 1)
#define F_MAP_UNMAP (1ULL << 2)
#define F_PROBE (1ULL << 4)
#define F_BYPASS_CONFIG (1ULL << 6)

#define T_ATTACH 1
#define T_DETACH 2
#define T_MAP 3
#define T_UNMAP 4
#define T_PROBE 5
#define ATTACH_F_BYPASS 1u
#define PROBE_T_RESV_MEM 1
#define RESV_MEM_T_MSI 1

#define CFG_PAGE_SIZE_MASK 0x00
#define CFG_INPUT_START 0x08
#define CFG_INPUT_END 0x10
#define CFG_DOMAIN_START 0x18
#define CFG_DOMAIN_END 0x1c
#define CFG_PROBE_SIZE 0x20
#define CFG_BYPASS 0x24

#define REQ_QUEUE 0
#define EVENT_QUEUE 1
#define REQ_QUEUE_SIZE 256
#define STAGE_MAX (REQ_QUEUE_SIZE / 2) /* every request is a 2-descriptor chain */
#define REQ_BUF 64
#define EVENT_BUFS 8
#define EVENT_LEN 24
#define PROBE_HDR 72 /* head + endpoint + reserved[64] */
#define PROBE_SIZE_MAX 0x10000
#define TAIL_LEN 4
#define MAX_RESV 16
/* Linux's software MSI window when the device reports none (IOMMU_RESV_SW_MSI). */
#define SW_MSI_BASE 0x8000000ULL
#define SW_MSI_SIZE 0x100000ULL
#define REQ_TIMEOUT_MS 10000 /* a hang detector, generous for a loaded 2-core host */

struct req_attach {
    u8 type, reserved[3];
    u32 domain, endpoint, flags;
    u8 reserved2[4];
} __attribute__((packed));

struct req_map {
    u8 type, reserved[3];
    u32 domain;
    u64 virt_start, virt_end, phys_start;
    u32 flags;
} __attribute__((packed));

struct req_unmap {
    u8 type, reserved[3];
    u32 domain;
    u64 virt_start, virt_end;
    u8 reserved2[4];
} __attribute__((packed));

struct staged {
    u8 *buf;       /* readable part, then the writable part (ending with the 4-byte tail) */
    u32 rlen, wlen, used_len;
};

struct resv {
    u64 start, end;
    u8 subtype;
};

static struct {
    struct dma_ctx *ctx;
    const struct pci_dev *pci;
    struct virtio_dev vd;
    struct dma_ctx own_dma; /* the virtio-iommu itself is never translated: mode off */
    struct virtq reqq, evtq;
    u64 page_size_mask, in_start, in_end;
    u32 dom_start, dom_end, probe_size, endpoint, domain;
    u8 boot_bypass;
    bool viot;
    bool bypass_attached;
    u64 identity_maps;
    struct resv resv[MAX_RESV];
    u32 nresv;
    bool msi_reported;
    u64 events, events_ignored, last_addr;
    u32 last_flags, last_endpoint;
    u8 last_reason;
} v;

static struct staged stage[STAGE_MAX];
static u8 stage_mem[STAGE_MAX][REQ_BUF] __attribute__((aligned(64)));
static u32 nstaged;
static u16 head_to_stage[REQ_QUEUE_SIZE];
static u8 evbufs[EVENT_BUFS][64] __attribute__((aligned(64)));
static u8 ev_of_head[EVENT_BUFS];
static struct iova_space space;
static char errbuf[192];
/* Requests sent alone (strict MAP and UNMAP, from any vCPU): buffers by head, completion. */
static u8 lone_mem[REQ_QUEUE_SIZE][REQ_BUF] __attribute__((aligned(64)));
static volatile u32 lone_done[REQ_QUEUE_SIZE]; /* used length + 1 once the device returned it */
static bool lone[REQ_QUEUE_SIZE];
static struct pci_dev own_scan[PCI_MAX_DEVICES];

static u64 gpa(const void *p) { return (u64)(uintptr_t)p; } /* the guest is identity-mapped */

static u32 rd32(const u8 *p)
{
    u32 x;
    memcpy(&x, p, 4);
    return x;
}

static u64 rd64(const u8 *p)
{
    u64 x;
    memcpy(&x, p, 8);
    return x;
}

static const struct pci_dev *find_device(void)
{
    static const u16 ids[] = {VIRTIO_IOMMU_PCI_ID, 0};
    size_t n;
    const struct pci_dev *devs = pci_scanned(&n);
    if (!devs)
        devs = own_scan, n = pci_scan(own_scan, PCI_MAX_DEVICES);
    return pci_find(devs, n, VIRTIO_VENDOR, ids);
}

static bool viommu_present(void) { return find_device() != NULL; }

/* ------------------------------------------------------------------ event queue */

static void post_event_buf(u8 idx)
{
    memset(evbufs[idx], 0, sizeof(evbufs[idx]));
    struct vq_buf b = {.addr = gpa(evbufs[idx]), .len = EVENT_LEN, .device_writes = true};
    int head = virtq_add(&v.evtq, &b, 1);
    if (head >= 0 && head < EVENT_BUFS)
        ev_of_head[head] = idx;
}

static void record_event(const u8 *e, u32 len)
{
    /* Linux ignores reports with non-zero reserved bytes. */
    if (len < EVENT_LEN || e[1] || e[2] || e[3]) {
        v.events_ignored++;
        return;
    }
    v.events++;
    v.last_reason = e[0];
    v.last_flags = rd32(e + 4);
    v.last_endpoint = rd32(e + 8);
    v.last_addr = rd64(e + 16);
}

static void poll_events(void)
{
    u32 id, len;
    bool reposted = false;
    if (!v.evtq.used) /* set-up did not get that far */
        return;
    while (virtq_get_used(&v.evtq, &id, &len)) {
        if (id >= EVENT_BUFS)
            continue;
        u8 idx = ev_of_head[id];
        record_event(evbufs[idx], len);
        post_event_buf(idx);
        reposted = true;
    }
    if (reposted)
        virtq_kick(&v.evtq);
}

/* ------------------------------------------------------------------ request queue */

static const char *status_name(u8 s)
{
    static const char *const names[] = {"OK", "IOERR", "UNSUPP", "DEVERR", "INVAL", "RANGE", "NOENT", "FAULT", "NOMEM"};
    return s < ARRAY_SIZE(names) ? names[s] : "unknown";
}

static const char *type_name(u8 t)
{
    static const char *const names[] = {"?", "ATTACH", "DETACH", "MAP", "UNMAP", "PROBE"};
    return t < ARRAY_SIZE(names) ? names[t] : "?";
}

/*
 * Takes every used entry (iommu_lock held): a lone request is marked done and its sender frees
 * the chain; a staged one is recorded and freed. Returns the staged completions.
 */
static u32 drain_used(void)
{
    u32 staged = 0, id, len;
    while (virtq_pop_used(&v.reqq, &id, &len)) {
        if (id >= REQ_QUEUE_SIZE)
            continue;
        if (lone[id]) {
            lone_done[id] = len + 1;
            continue;
        }
        stage[head_to_stage[id]].used_len = len;
        virtq_free_chain(&v.reqq, (u16)id);
        staged++;
    }
    return staged;
}

static const char *wait_used(u32 *done, u32 target)
{
    u64 deadline = rdtsc() + ms_to_cycles(REQ_TIMEOUT_MS);
    while (*done < target) {
        u32 got = drain_used();
        if (got) {
            *done += got;
        } else if (rdtsc() > deadline) {
            return "virtio-iommu request timed out (no used-ring entry within 10 s)";
        } else {
            cpu_relax();
        }
    }
    return NULL;
}

static const char *check_statuses(void)
{
    for (u32 i = 0; i < nstaged; i++) {
        const struct staged *s = &stage[i];
        /* A request returned without a written tail counts as IOERR (like Linux). */
        u8 st = s->used_len == 0 ? 1 : s->buf[s->rlen + s->wlen - TAIL_LEN];
        if (st != 0) {
            snprintf(errbuf, sizeof(errbuf), "virtio-iommu %s request failed: status %u (%s)%s", type_name(s->buf[0]),
                     st, status_name(st), s->used_len == 0 ? ", used length 0" : "");
            return errbuf;
        }
    }
    return NULL;
}

/* Sends every staged request (as many per kick as the ring holds) and waits for all of them. */
static const char *sync_requests(void)
{
    u32 next = 0, done = 0;
    const char *err = NULL;
    while (done < nstaged && !err) {
        u32 added = 0;
        while (next < nstaged && v.reqq.num_free >= 2) {
            struct staged *s = &stage[next];
            s->used_len = 0;
            memset(s->buf + s->rlen + s->wlen - TAIL_LEN, 0xff, TAIL_LEN);
            struct vq_buf b[2] = {{gpa(s->buf), s->rlen, false}, {gpa(s->buf + s->rlen), s->wlen, true}};
            int head = virtq_add(&v.reqq, b, 2);
            if (head < 0)
                break;
            head_to_stage[head] = (u16)next++;
            added++;
        }
        virtq_kick(&v.reqq);
        v.ctx->iommu_reqs += added;
        v.ctx->iommu_syncs++;
        err = wait_used(&done, next);
    }
    if (!err)
        err = check_statuses();
    nstaged = 0;
    poll_events();
    return err;
}

/* Queues a request with a 4-byte tail (sends the queue first when it is full). */
static const char *stage_req(const void *req, u32 rlen)
{
    if (nstaged == STAGE_MAX) {
        const char *err = sync_requests();
        if (err)
            return err;
    }
    struct staged *s = &stage[nstaged++];
    s->buf = stage_mem[s - stage];
    memcpy(s->buf, req, rlen);
    s->rlen = rlen;
    s->wlen = TAIL_LEN;
    return NULL;
}

static const char *stage_unmap(u64 iova, u64 size)
{
    struct req_unmap u = {.type = T_UNMAP, .domain = v.domain, .virt_start = iova, .virt_end = iova + size - 1};
    return stage_req(&u, sizeof(u));
}

static const char *attach_req(u32 domain, u32 flags)
{
    struct req_attach a = {.type = T_ATTACH, .domain = domain, .endpoint = v.endpoint, .flags = flags};
    const char *err = stage_req(&a, sizeof(a));
    return err ? err : sync_requests();
}

/* ------------------------------------------------------------------ set-up */

static bool viot_node_is_us(const u8 *t, u32 len, u16 node)
{
    u16 bdf;
    if (node < 48 || (u32)node + 8 > len || t[node] != 3)
        return false;
    memcpy(&bdf, t + node + 6, 2);
    return bdf == pci_sid(v.pci);
}

/* Like Linux: the endpoint ID comes from the ACPI VIOT PCI range that covers the device and points
 * at this virtio-iommu; without a VIOT it is the requester ID. False: a VIOT that does not cover it. */
static bool viot_endpoint(u16 sid, u32 *ep)
{
    u32 len;
    const u8 *t = acpi_find_table("VIOT", &len);
    v.viot = t != NULL;
    *ep = sid;
    if (!t || len < 48)
        return !t;
    u16 count, off;
    memcpy(&count, t + 36, 2);
    memcpy(&off, t + 38, 2);
    for (u16 i = 0; i < count && (u32)off + 4 <= len; i++) {
        u16 nlen, seg_start, bdf_start, bdf_end, out;
        memcpy(&nlen, t + off + 2, 2);
        if (nlen < 4 || (u32)off + nlen > len)
            break;
        if (t[off] == 1 && nlen >= 24) {
            u32 start;
            memcpy(&start, t + off + 4, 4);
            memcpy(&seg_start, t + off + 8, 2);
            memcpy(&bdf_start, t + off + 12, 2);
            memcpy(&bdf_end, t + off + 14, 2);
            memcpy(&out, t + off + 16, 2);
            if (seg_start == 0 && sid >= bdf_start && sid <= bdf_end && viot_node_is_us(t, len, out)) {
                *ep = start + (u32)(sid - bdf_start);
                return true;
            }
        }
        off = (u16)(off + nlen);
    }
    return false;
}

static const char *read_config(void)
{
    if (!v.vd.device_cfg)
        return "the virtio-iommu has no device-specific configuration capability";
    u64 f = v.vd.features;
    v.page_size_mask = virtio_cfg_read64(&v.vd, CFG_PAGE_SIZE_MASK);
    if (v.page_size_mask == 0)
        return "the virtio-iommu reports page_size_mask 0";
    if ((v.page_size_mask & -v.page_size_mask) > 4096)
        return "the virtio-iommu granule is larger than 4 KiB (Linux refuses such a device too)";
    v.in_start = 0, v.in_end = ~0ULL;
    if (f & F_INPUT_RANGE) {
        v.in_start = virtio_cfg_read64(&v.vd, CFG_INPUT_START);
        v.in_end = virtio_cfg_read64(&v.vd, CFG_INPUT_END);
    }
    v.dom_start = 0, v.dom_end = ~0u;
    if (f & F_DOMAIN_RANGE) {
        v.dom_start = virtio_cfg_read32(&v.vd, CFG_DOMAIN_START);
        v.dom_end = virtio_cfg_read32(&v.vd, CFG_DOMAIN_END);
    }
    v.probe_size = (f & F_PROBE) ? virtio_cfg_read32(&v.vd, CFG_PROBE_SIZE) : 0;
    if (v.vd.offered & F_BYPASS_CONFIG)
        v.boot_bypass = virtio_cfg_read8(&v.vd, CFG_BYPASS);
    if (v.in_start > v.in_end || v.dom_start > v.dom_end)
        return "the virtio-iommu reports an empty input or domain range";
    if (v.probe_size > PROBE_SIZE_MAX)
        return "the virtio-iommu probe_size is larger than 64 KiB";
    return NULL;
}

static const char *init_device(void)
{
    /* iovmm.viommu_withhold: feature bits not to accept (e.g. 0x40 BYPASS_CONFIG, 0x10 PROBE), to
     * exercise the identity-domain and no-PROBE paths like an older driver would. */
    u64 withhold;
    if (cmdline_u64("iovmm.viommu_withhold", 0, &withhold))
        return "iovmm.viommu_withhold must be a number";
    u64 wanted = (F_INPUT_RANGE | F_DOMAIN_RANGE | F_PROBE | F_BYPASS_CONFIG) & ~withhold;
    const char *err = virtio_pci_init(&v.vd, v.pci, &v.own_dma);
    if (!err)
        err = virtio_negotiate(&v.vd, wanted, VIRTIO_F_VERSION_1 | F_MAP_UNMAP);
    if (!err)
        err = read_config();
    if (!err)
        err = virtio_setup_queue(&v.vd, &v.reqq, REQ_QUEUE, REQ_QUEUE_SIZE);
    if (!err)
        err = virtio_setup_queue(&v.vd, &v.evtq, EVENT_QUEUE, EVENT_BUFS);
    if (err)
        return err;
    virtio_driver_ok(&v.vd);
    for (u8 i = 0; i < v.evtq.size && i < EVENT_BUFS; i++)
        post_event_buf(i);
    virtq_kick(&v.evtq);
    return NULL;
}

static void parse_probe(const u8 *props)
{
    u32 off = 0;
    while (off + 4 <= v.probe_size) {
        u16 type, len;
        memcpy(&type, props + off, 2);
        memcpy(&len, props + off + 2, 2);
        type &= 0xfff;
        if (type == 0 || off + 4 + (u32)len > v.probe_size)
            break;
        if (type == PROBE_T_RESV_MEM && len >= 20 && v.nresv < MAX_RESV) {
            struct resv r = {.subtype = props[off + 4], .start = rd64(props + off + 8), .end = rd64(props + off + 16)};
            if (r.start <= r.end) {
                v.resv[v.nresv++] = r;
                v.msi_reported |= r.subtype == RESV_MEM_T_MSI;
            }
        }
        off += 4 + len;
    }
}

static const char *probe_endpoint(void)
{
    if (v.probe_size == 0)
        return NULL;
    u8 *buf = mem_alloc(PROBE_HDR + v.probe_size + TAIL_LEN, 64);
    if (!buf)
        return "out of guest memory for the virtio-iommu PROBE buffer";
    buf[0] = T_PROBE;
    memcpy(buf + 4, &v.endpoint, 4);
    stage[0] = (struct staged){.buf = buf, .rlen = PROBE_HDR, .wlen = v.probe_size + TAIL_LEN};
    nstaged = 1;
    const char *err = sync_requests();
    if (!err)
        parse_probe(buf + PROBE_HDR);
    return err;
}

/* The input range minus the reserved regions (and, for DMA domains, page 0 and Linux's SW MSI window). */
static void build_space(bool dma_domain)
{
    iova_init(&space, v.in_start, v.in_end, 4096);
    for (u32 i = 0; i < v.nresv; i++)
        iova_reserve(&space, v.resv[i].start, v.resv[i].end);
    if (!dma_domain)
        return;
    iova_reserve(&space, 0, 0);
    if (!v.msi_reported)
        iova_reserve(&space, SW_MSI_BASE, SW_MSI_BASE + SW_MSI_SIZE - 1);
}

static const char *attach_identity(void)
{
    const char *err = attach_req(v.domain, 0);
    build_space(false);
    for (u32 i = 0; !err && i < space.n; i++) {
        const struct iova_range *r = &space.r[i];
        struct req_map m = {.type = T_MAP, .domain = v.domain, .virt_start = r->first, .virt_end = r->last,
                            .phys_start = r->first, .flags = IOMMU_PROT_READ | IOMMU_PROT_WRITE};
        err = stage_req(&m, sizeof(m));
        v.identity_maps++;
    }
    return err ? err : sync_requests();
}

static const char *viommu_attach(struct dma_ctx *ctx)
{
    v = (typeof(v)){.ctx = ctx, .pci = find_device(), .endpoint = pci_sid(ctx->pci)};
    nstaged = 0;
    if (!v.pci)
        return "no virtio-iommu on PCI bus 0";
    if (ctx->ats_mode == ATS_ON) {
        ctx->unsupported = true;
        return "iovmm.ats=on needs VT-d: virtio-iommu has no device-TLB invalidation";
    }
    ctx->ats_note = "virtio-iommu: ATS not used (like Linux)";
    if (!viot_endpoint(pci_sid(ctx->pci), &v.endpoint)) {
        ctx->unsupported = true;
        return "the ACPI VIOT does not put the device behind this virtio-iommu (Linux would not translate it)";
    }
    const char *err = init_device();
    if (!err)
        err = probe_endpoint();
    if (err)
        return err;
    bool bypass_cfg = v.vd.features & F_BYPASS_CONFIG;
    /* With BYPASS_CONFIG, Linux keeps the first domain ID for the global bypass domain. */
    if (bypass_cfg && v.dom_start == v.dom_end)
        return "the virtio-iommu domain range has one ID, reserved for bypass";
    v.domain = v.dom_start + (bypass_cfg ? 1 : 0);
    if (ctx->mode == IOMMU_PASSTHROUGH && bypass_cfg) {
        v.domain = v.dom_start;
        v.bypass_attached = true;
        return attach_req(v.domain, ATTACH_F_BYPASS);
    }
    if (ctx->mode == IOMMU_PASSTHROUGH)
        return attach_identity();
    err = attach_req(v.domain, 0);
    build_space(true);
    ctx->iova = &space;
    return err;
}

/* iommu_lock, counting the wait in ctx->lock_wait_cycles. */
static void lone_lock(struct dma_ctx *ctx)
{
    u64 t0 = rdtsc();
    spin_lock(&iommu_lock);
    ctx->lock_wait_cycles += rdtsc() - t0;
}

/* Waits (without iommu_lock) for lone request `head`; any vCPU drains the used ring. */
static const char *lone_wait(u16 head)
{
    u64 deadline = rdtsc() + ms_to_cycles(REQ_TIMEOUT_MS);
    while (!lone_done[head]) {
        if (spin_trylock(&iommu_lock)) {
            drain_used();
            spin_unlock(&iommu_lock);
        }
        if (lone_done[head])
            break;
        if (rdtsc() > deadline)
            return "virtio-iommu request timed out (no used-ring entry within 10 s)";
        cpu_relax();
    }
    return NULL;
}

/*
 * One request with its own buffer and head, in flight concurrently with other vCPUs' (Linux
 * holds its request lock until the reply; here the lock covers only the queue accesses).
 */
static const char *lone_request(struct dma_ctx *ctx, const void *req, u32 rlen)
{
    lone_lock(ctx);
    if (v.reqq.num_free < 2) {
        spin_unlock(&iommu_lock);
        return "the virtio-iommu request queue is full";
    }
    u16 head = v.reqq.free_head;
    u8 *buf = lone_mem[head];
    memcpy(buf, req, rlen);
    memset(buf + rlen, 0xff, TAIL_LEN);
    struct vq_buf b[2] = {{gpa(buf), rlen, false}, {gpa(buf + rlen), TAIL_LEN, true}};
    lone_done[head] = 0;
    lone[head] = true;
    (void)virtq_add(&v.reqq, b, 2);
    virtq_publish(&v.reqq);
    v.ctx->iommu_reqs++;
    v.ctx->iommu_syncs++;
    spin_unlock(&iommu_lock);
    virtq_notify(&v.reqq);
    const char *err = lone_wait(head);
    if (err)
        return err; /* the chain stays allocated: the run ends on this error */
    u32 used_len = lone_done[head] - 1;
    /* A request returned without a written tail counts as IOERR (like Linux). */
    u8 st = used_len == 0 ? 1 : buf[rlen];
    u8 type = buf[0];
    lone_lock(ctx);
    lone[head] = false;
    virtq_free_chain(&v.reqq, head);
    poll_events();
    spin_unlock(&iommu_lock);
    if (st != 0) {
        snprintf(errbuf, sizeof(errbuf), "virtio-iommu %s request failed: status %u (%s)%s", type_name(type), st,
                 status_name(st), used_len == 0 ? ", used length 0" : "");
        return errbuf;
    }
    return NULL;
}

static const char *viommu_map(struct dma_ctx *ctx, u64 iova, u64 pa, u64 size, u32 prot)
{
    struct req_map m = {.type = T_MAP, .domain = v.domain, .virt_start = iova, .virt_end = iova + size - 1,
                        .phys_start = pa, .flags = prot};
    return lone_request(ctx, &m, sizeof(m));
}

static const char *viommu_unmap_sync(struct dma_ctx *ctx, u64 iova, u64 size)
{
    struct req_unmap u = {.type = T_UNMAP, .domain = v.domain, .virt_start = iova, .virt_end = iova + size - 1};
    return lone_request(ctx, &u, sizeof(u));
}

static const char *viommu_unmap_deferred(struct dma_ctx *ctx, u64 iova, u64 size)
{
    (void)ctx, (void)iova, (void)size;
    return NULL; /* the UNMAP request goes out with the batch */
}

static const char *viommu_flush(struct dma_ctx *ctx, const struct dma_range *r, u64 n)
{
    (void)ctx;
    for (u64 i = 0; i < n; i++) {
        const char *err = stage_unmap(r[i].iova, r[i].size);
        if (err)
            return err;
    }
    return sync_requests();
}

static void viommu_report(struct dma_ctx *ctx, struct result *r)
{
    (void)ctx;
    poll_events();
    result_hex(r, "viommu_features", v.vd.features);
    result_hex(r, "page_size_mask", v.page_size_mask);
    result_u64(r, "endpoint", v.endpoint);
    result_u64(r, "viot", v.viot);
    result_u64(r, "domain", v.domain);
    result_u64(r, "boot_bypass", v.boot_bypass);
    result_u64(r, "bypass_attached", v.bypass_attached);
    if (v.identity_maps)
        result_u64(r, "identity_maps", v.identity_maps);
    result_u64(r, "resv_regions", v.nresv);
    result_u64(r, "fault_events", v.events);
    if (v.events_ignored)
        result_u64(r, "fault_events_ignored", v.events_ignored);
    if (v.events) {
        result_u64(r, "fault_reason", v.last_reason);
        result_hex(r, "fault_flags", v.last_flags);
        result_u64(r, "fault_endpoint", v.last_endpoint);
        result_hex(r, "fault_addr", v.last_addr);
    }
}

const struct iommu_driver virtio_iommu_driver = {
    .name = "virtio-iommu",
    .present = viommu_present,
    .attach = viommu_attach,
    .map = viommu_map,
    .unmap_sync = viommu_unmap_sync,
    .unmap_deferred = viommu_unmap_deferred,
    .flush = viommu_flush,
    .report = viommu_report,
    .concurrent_sync = true,
};
