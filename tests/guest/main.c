/*
 * Ring-3 entry of the iovmm fast test guest: reads the scenario from the kernel command line
 * (iovmm.test=NAME plus iovmm.* parameters), runs it, prints one IOVMM-RESULT line and exits
 * through the exit port with EXIT_* (abi.h).
 */
#include "blk.h"
#include "dmatest.h"
#include "env.h"
#include "exitbench.h"
#include "net.h"
#include "netmq.h"
#include "pci.h"
#include "smp.h"

/* TSC at the first ring-0 instruction (boot.S) and at ring-3 entry. */
extern u64 boot_tsc;
static u64 user_tsc;

static struct pci_dev pci_devs[PCI_MAX_DEVICES];
static size_t pci_count;

static int run_hello(void)
{
    printf("IOVMM-TEST hello ok\n");
    struct result r;
    result_begin(&r, "hello", "ok");
    result_u64(&r, "ring0_cycles", user_tsc - boot_tsc);
    result_u64(&r, "ram_bytes", mem_total_ram());
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    result_emit(&r);
    return EXIT_OK;
}

static int run_fault(void)
{
    /* PML4 entry 1 (512 GiB and up) is never mapped: a user-mode write page fault (vector 14). */
    volatile u32 *unmapped = (volatile u32 *)0x8000000000ULL;
    printf("IOVMM-TEST fault: writing to %p\n", (void *)unmapped);
    *unmapped = 0x1234;
    struct result r;
    result_begin(&r, "fault", "failed");
    result_str(&r, "error", "the write to an unmapped address did not fault");
    result_emit(&r);
    return EXIT_FAILED;
}

/* The IDT (boot.S); ring 3 can write it: every page has the U/S bit. */
extern u8 idt[], idt_end[];

static int run_triple_fault(void)
{
    /*
     * With every gate not present, #UD raises #NP, which raises #DF, whose gate is not present
     * either: the CPU shuts down (KVM_EXIT_SHUTDOWN). Nothing runs in ring 0.
     */
    u64 ud2_rip;
    __asm__ volatile("lea triple_fault_ud2(%%rip), %0" : "=r"(ud2_rip));
    printf("IOVMM-TEST triple-fault: clearing the IDT, ud2 at %p\n", (void *)ud2_rip);
    memset(idt, 0, (size_t)(idt_end - idt));
    __asm__ volatile("triple_fault_ud2: ud2" ::: "memory");
    struct result r;
    result_begin(&r, "triple-fault", "failed");
    result_str(&r, "error", "ud2 with an empty IDT did not shut the CPU down");
    result_emit(&r);
    return EXIT_FAILED;
}

/* iovmm.iterations reads of a port no device claims: each one is a full exit to the VMM. */
static int run_pio_exits(void)
{
    u64 iterations;
    if (cmdline_u64("iovmm.iterations", 100000, &iterations))
        return -EXIT_USAGE;
    u64 t0 = rdtsc();
    for (u64 i = 0; i < iterations; i++)
        (void)inb(0x80);
    u64 cycles = rdtsc() - t0;
    struct result r;
    result_begin(&r, "pio-exits", "ok");
    result_u64(&r, "iterations", iterations);
    result_u64(&r, "cycles", cycles);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    result_emit(&r);
    return EXIT_OK;
}

static int run_tsc(void)
{
    u64 iterations;
    if (cmdline_u64("iovmm.iterations", 10000000, &iterations))
        return -EXIT_USAGE;
    u64 t0 = rdtsc();
    for (u64 i = 0; i < iterations; i++)
        __asm__ volatile("" : "+r"(i)); /* keeps the loop */
    u64 cycles = rdtsc() - t0;
    struct result r;
    result_begin(&r, "tsc", "ok");
    result_u64(&r, "iterations", iterations);
    result_u64(&r, "cycles", cycles);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    result_emit(&r);
    return EXIT_OK;
}

static const char *bar_kind_name(enum pci_bar_kind k)
{
    return k == PCI_BAR_IO ? "io" : k == PCI_BAR_MEM32 ? "mem32" : "mem64";
}

static void print_bars(const struct pci_dev *d)
{
    for (int i = 0; i < 6; i++) {
        struct pci_bar b = pci_bar(d, i);
        if (b.kind == PCI_BAR_NONE)
            continue;
        u64 size = pci_bar_size(d, i);
        if (size == 0)
            continue;
        printf("  bar%d %s 0x%llx size 0x%llx%s\n", i, bar_kind_name(b.kind), (unsigned long long)b.addr,
               (unsigned long long)size, b.prefetchable ? " prefetchable" : "");
    }
}

static int run_pci_scan(void)
{
    char ids[512] = "";
    size_t len = 0;
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    for (size_t i = 0; i < pci_count; i++) {
        const struct pci_dev *d = &pci_devs[i];
        printf("pci %02x:%02x.%x %04x:%04x class %06x\n", d->bus, d->dev, d->fn, d->vendor, d->device,
               d->class_code);
        if ((d->header_type & 0x7f) == 0)
            print_bars(d);
        int n = snprintf(ids + len, sizeof(ids) - len, "%s%02x:%02x.%x=%04x:%04x:%06x", i ? "," : "", d->bus,
                         d->dev, d->fn, d->vendor, d->device, d->class_code);
        if (n > 0 && len + (size_t)n < sizeof(ids))
            len += (size_t)n;
        else
            ids[len] = '\0'; /* list truncated at a whole entry */
    }
    struct result r;
    result_begin(&r, "pci-scan", "ok");
    result_u64(&r, "devices", pci_count);
    result_str(&r, "ids", ids);
    result_emit(&r);
    return EXIT_OK;
}

/* Work of the smp scenario on each AP: its APIC id, and a ring-3 loop to show it runs natively. */
struct smp_probe {
    u32 apic_id;
    u64 loop_cycles;
};

static void smp_probe_fn(void *arg)
{
    struct smp_probe *p = arg;
    p->apic_id = smp_cpu_id();
    u64 t0 = rdtsc();
    for (u64 i = 0; i < 1000000; i++)
        __asm__ volatile("" : "+r"(i));
    p->loop_cycles = rdtsc() - t0;
}

/* Starts iovmm.cpus CPUs and runs a probe on each AP. */
static int run_smp(void)
{
    u64 cpus;
    if (cmdline_u64("iovmm.cpus", 2, &cpus))
        return -EXIT_USAGE;
    u64 t0 = rdtsc();
    const char *err = smp_start((u32)cpus, 5000);
    u64 start_cycles = rdtsc() - t0;
    static struct smp_probe probes[SMP_MAX_CPUS];
    for (u32 c = 1; !err && c < smp_cpus(); c++)
        smp_call(c, smp_probe_fn, &probes[c]);
    for (u32 c = 1; !err && c < smp_cpus(); c++)
        if (!smp_wait(c, 5000))
            err = "an AP did not finish its probe";
    struct result r;
    result_begin(&r, "smp", err ? "failed" : "ok");
    if (err)
        result_str(&r, "error", err);
    result_u64(&r, "cpus", smp_cpus());
    result_u64(&r, "bsp_apic_id", smp_cpu_id());
    for (u32 c = 1; c < smp_cpus(); c++) {
        char key[24];
        snprintf(key, sizeof(key), "apic_id%u", c);
        result_u64(&r, key, probes[c].apic_id);
        snprintf(key, sizeof(key), "loop_cycles%u", c);
        result_u64(&r, key, probes[c].loop_cycles);
    }
    result_u64(&r, "start_cycles", start_cycles);
    result_u64(&r, "tsc_khz", tsc_rate_khz());
    result_emit(&r);
    return err ? EXIT_FAILED : EXIT_OK;
}

struct scenario {
    const char *name;
    int (*run)(void);
};

static int run_net_tx_scenario(void)
{
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    return run_net_tx(pci_devs, pci_count);
}

static int run_dma_map_scenario(void)
{
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    return run_dma_map(pci_devs, pci_count);
}

static int run_net_rx_scenario(void)
{
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    return run_net_rx(pci_devs, pci_count);
}

static int run_net_stale_scenario(void)
{
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    return run_net_stale(pci_devs, pci_count);
}

static int run_blk_scenario(void)
{
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    return run_blk(pci_devs, pci_count);
}

static int run_blk_stale_scenario(void)
{
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    return run_blk_stale(pci_devs, pci_count);
}

static int run_net_mq_scenario(void)
{
    pci_count = pci_scan(pci_devs, PCI_MAX_DEVICES);
    return run_net_mq(pci_devs, pci_count);
}

static const struct scenario scenarios[] = {
    {"blk", run_blk_scenario}, {"blk-stale", run_blk_stale_scenario},
    {"net-rx", run_net_rx_scenario}, {"net-stale", run_net_stale_scenario},
    {"hello", run_hello},       {"fault", run_fault},
    {"triple-fault", run_triple_fault}, {"pio-exits", run_pio_exits},
    {"tsc", run_tsc},           {"pci-scan", run_pci_scan},
    {"net-tx", run_net_tx_scenario}, {"dma-map", run_dma_map_scenario},
    {"exit-bench", run_exit_bench}, {"net-mq", run_net_mq_scenario},
    {"smp", run_smp},
};

static int fail(const char *test, int code, const char *status, const char *why)
{
    struct result r;
    result_begin(&r, test, status);
    result_str(&r, "error", why);
    result_str(&r, "cmdline", cmdline_raw());
    result_emit(&r);
    return code;
}

static bool valid_name(const char *s)
{
    for (; *s; s++) {
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '-' || *s == '_'))
            return false;
    }
    return true;
}

int guest_main(void);

int guest_main(void)
{
    user_tsc = rdtsc();
    cmdline_init();
    static char test[32];
    if (!cmdline_get("iovmm.test", test, sizeof(test)) || !valid_name(test) || !test[0])
        return fail("none", EXIT_USAGE, "error", "iovmm.test=NAME is missing or malformed on the command line");
    current_test = test;
    if (!mem_init())
        return fail(test, EXIT_FAILED, "error", "no free RAM after the image in the e820 map");
    for (size_t i = 0; i < ARRAY_SIZE(scenarios); i++) {
        if (strcmp(test, scenarios[i].name) == 0) {
            int code = scenarios[i].run();
            if (code < 0) /* a parameter error the scenario did not report itself */
                return fail(test, -code, "error", "a numeric iovmm.* parameter is malformed");
            return code;
        }
    }
    return fail(test, EXIT_USAGE, "error", "unknown iovmm.test (hello, fault, triple-fault, pio-exits, tsc, pci-scan, net-tx, net-rx, net-stale, net-mq, dma-map, blk, blk-stale, exit-bench, smp)");
}
