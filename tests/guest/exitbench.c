/*
 * exit-bench: the floor of a vIOMMU request, a guest exit that the VMM answers without any device
 * work. Ring 3 times each access with RDTSC (lfence; rdtsc on both sides):
 *   - `out` to iovmm.port (default 0x80: no device claims it, the PIO bus lookup finds nothing);
 *   - `in` from the same port (answered with 0xff);
 *   - a 32-bit MMIO write to iovmm.mmio when given (a guest-physical address outside RAM with no
 *     device behind it: the exit a VT-d queued-invalidation tail write takes, without the device);
 *   - CPUID leaf 0: an exit KVM handles in the kernel without returning to the VMM (as it handles
 *     an MMIO write to a virtio notify address with an ioeventfd);
 *   - two back-to-back TSC reads (what the timing itself adds to every sample).
 * Each kind runs iovmm.iterations (default 20000, 1..1M) times after 100 untimed warm-up accesses.
 * The result has, per kind K in {out, in, mmio, cpuid, rdtsc}: K_p50, K_p99, K_min (cycles of one access)
 * and K_cycles (the sum), plus iterations and tsc_khz.
 */
#include "exitbench.h"
#include "env.h"

#define MAX_ITERATIONS (1ULL << 20)
#define WARMUP 100

enum exit_kind { KIND_OUT, KIND_IN, KIND_MMIO, KIND_CPUID, KIND_RDTSC };

static u32 one_access(enum exit_kind kind, u16 port, u64 mmio, u32 i)
{
    u64 t0 = rdtsc();
    switch (kind) {
    case KIND_OUT:
        outb(port, (u8)i);
        break;
    case KIND_IN:
        (void)inb(port);
        break;
    case KIND_MMIO:
        mmio_write32(mmio, i);
        break;
    case KIND_CPUID: {
        u32 a, b, c, d;
        cpuid(0, 0, &a, &b, &c, &d);
        break;
    }
    case KIND_RDTSC:
        break;
    }
    u64 d = rdtsc() - t0;
    return d > 0xffffffffULL ? 0xffffffffU : (u32)d;
}

static void sift_down(u32 *v, u64 root, u64 n)
{
    for (;;) {
        u64 child = 2 * root + 1;
        if (child >= n)
            return;
        if (child + 1 < n && v[child + 1] > v[child])
            child++;
        if (v[root] >= v[child])
            return;
        u32 t = v[root];
        v[root] = v[child];
        v[child] = t;
        root = child;
    }
}

/* Heapsort: in place, no recursion, O(n log n). */
static void sort_u32(u32 *v, u64 n)
{
    for (u64 i = n / 2; i-- > 0;)
        sift_down(v, i, n);
    for (u64 end = n; end-- > 1;) {
        u32 t = v[0];
        v[0] = v[end];
        v[end] = t;
        sift_down(v, 0, end);
    }
}

/* Times `n` accesses of one kind into `samples` and adds K_p50/K_p99/K_min/K_cycles to `r`. */
static void measure(struct result *r, const char *name, enum exit_kind kind, u16 port, u64 mmio, u32 *samples,
                    u64 n)
{
    for (u32 i = 0; i < WARMUP; i++)
        (void)one_access(kind, port, mmio, i);
    u64 total = 0;
    for (u64 i = 0; i < n; i++) {
        samples[i] = one_access(kind, port, mmio, (u32)i);
        total += samples[i];
    }
    sort_u32(samples, n);
    char key[32];
    snprintf(key, sizeof(key), "%s_p50", name);
    result_u64(r, key, samples[(n - 1) * 50 / 100]);
    snprintf(key, sizeof(key), "%s_p99", name);
    result_u64(r, key, samples[(n - 1) * 99 / 100]);
    snprintf(key, sizeof(key), "%s_min", name);
    result_u64(r, key, samples[0]);
    snprintf(key, sizeof(key), "%s_cycles", name);
    result_u64(r, key, total);
}

static int usage(const char *why)
{
    struct result r;
    result_begin(&r, "exit-bench", "error");
    result_str(&r, "error", why);
    result_emit(&r);
    return EXIT_USAGE;
}

int run_exit_bench(void)
{
    u64 n, port, mmio;
    if (cmdline_u64("iovmm.iterations", 20000, &n) || n == 0 || n > MAX_ITERATIONS)
        return usage("iovmm.iterations must be 1..1M");
    if (cmdline_u64("iovmm.port", 0x80, &port) || port > 0xffff)
        return usage("iovmm.port must be a port number (0..0xffff)");
    if (cmdline_u64("iovmm.mmio", 0, &mmio) || (mmio & 3) || mmio >= (4ULL << 30))
        return usage("iovmm.mmio must be a 4-byte aligned address below 4 GiB (the identity map)");
    u32 *samples = mem_alloc(n * sizeof(u32), 64);
    if (!samples) {
        struct result r;
        result_begin(&r, "exit-bench", "failed");
        result_str(&r, "error", "no RAM for the samples");
        result_emit(&r);
        return EXIT_FAILED;
    }
    struct result r;
    result_begin(&r, "exit-bench", "ok");
    result_u64(&r, "iterations", n);
    result_hex(&r, "port", port);
    measure(&r, "rdtsc", KIND_RDTSC, (u16)port, mmio, samples, n);
    measure(&r, "out", KIND_OUT, (u16)port, mmio, samples, n);
    measure(&r, "in", KIND_IN, (u16)port, mmio, samples, n);
    if (mmio) {
        result_hex(&r, "mmio", mmio);
        measure(&r, "mmio", KIND_MMIO, (u16)port, mmio, samples, n);
    }
    measure(&r, "cpuid", KIND_CPUID, (u16)port, mmio, samples, n);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    result_emit(&r);
    return EXIT_OK;
}
