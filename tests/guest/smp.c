/*
 * AP start-up (boot.S has the real-mode trampoline and the ring-0 entry) and the AP work loop.
 * Everything here runs in ring 3 at native speed; each AP's ring-0 path is ~40 emulated
 * instructions.
 */
#include "smp.h"
#include "env.h"

#define LAPIC_BASE 0xfee00000ULL
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_INIT 0x00004500u    /* INIT, level assert */
#define ICR_STARTUP 0x00004600u /* start-up IPI; vector = trampoline page number */
#define ICR_BUSY (1u << 12)

struct ap_slot {
    void (*volatile fn)(void *);
    void *volatile arg;
    volatile u32 online;
    volatile u32 calls, returns;
};

static struct ap_slot aps[SMP_MAX_CPUS];
static u32 cpus_running = 1;

extern u8 ap_trampoline[], ap_trampoline_end[], ap_tss[], tss_end[];
extern u64 gdt_ap_tss[];
extern volatile u32 ap_boot_cpu;

void ap_main(u32 cpu);

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

u32 smp_cpu_id(void) { return lapic_read(LAPIC_ID) >> 24; }
u32 smp_cpus(void) { return cpus_running; }

/* A 64-bit available TSS descriptor (16 bytes) for the AP TSS of `cpu`. */
static void patch_tss_descriptor(u32 cpu)
{
    u64 base = (u64)(ap_tss + (cpu - 1) * 128);
    u64 limit = (u64)(tss_end - (ap_tss + (cpu - 1) * 128)) - 1;
    u64 lo = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89ULL << 40 | ((limit >> 16) & 0xf) << 48 |
             ((base >> 24) & 0xff) << 56;
    gdt_ap_tss[2 * (cpu - 1)] = lo;
    gdt_ap_tss[2 * (cpu - 1) + 1] = base >> 32;
}

static void send_ipi(u32 apic_id, u32 icr)
{
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, icr);
    while (lapic_read(LAPIC_ICR_LO) & ICR_BUSY)
        cpu_relax();
}

static bool wait_online(u32 cpu, u64 cycles)
{
    u64 t0 = rdtsc();
    while (!aps[cpu].online) {
        if (rdtsc() - t0 > cycles)
            return false;
        cpu_relax();
    }
    return true;
}

const char *smp_start(u32 cpus, u64 timeout_ms)
{
    if (cpus < 1 || cpus > SMP_MAX_CPUS)
        return "iovmm.cpus must be 1..4";
    memcpy((void *)AP_TRAMPOLINE, ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
    lapic_write(LAPIC_SVR, 0x1ff); /* APIC software-enabled, spurious vector 0xff */
    for (u32 cpu = cpus_running; cpu < cpus; cpu++) {
        patch_tss_descriptor(cpu);
        ap_boot_cpu = cpu;
        mb();
        send_ipi(cpu, ICR_INIT);
        send_ipi(cpu, ICR_STARTUP | (AP_TRAMPOLINE >> 12));
        /* A second start-up IPI as the MP spec asks, only if the first one was not taken. */
        if (!wait_online(cpu, ms_to_cycles(10)))
            send_ipi(cpu, ICR_STARTUP | (AP_TRAMPOLINE >> 12));
        if (!wait_online(cpu, ms_to_cycles(timeout_ms)))
            return "an application processor did not reach ring 3 within the timeout";
        cpus_running = cpu + 1;
    }
    return NULL;
}

void smp_call(u32 cpu, void (*fn)(void *), void *arg)
{
    aps[cpu].arg = arg;
    __atomic_store_n(&aps[cpu].fn, fn, __ATOMIC_RELEASE);
    __atomic_add_fetch(&aps[cpu].calls, 1, __ATOMIC_RELEASE);
}

bool smp_wait(u32 cpu, u64 timeout_ms)
{
    u64 t0 = rdtsc(), cycles = ms_to_cycles(timeout_ms);
    while (__atomic_load_n(&aps[cpu].returns, __ATOMIC_ACQUIRE) != aps[cpu].calls) {
        if (rdtsc() - t0 > cycles)
            return false;
        cpu_relax();
    }
    return true;
}

/* Ring-3 entry of AP `cpu` (boot.S): reports in, then runs what smp_call() hands it. */
void ap_main(u32 cpu)
{
    __atomic_store_n(&aps[cpu].online, 1, __ATOMIC_RELEASE);
    u32 done = 0;
    for (;;) {
        while (__atomic_load_n(&aps[cpu].calls, __ATOMIC_ACQUIRE) == done)
            cpu_relax();
        void (*fn)(void *) = __atomic_load_n(&aps[cpu].fn, __ATOMIC_ACQUIRE);
        fn(aps[cpu].arg);
        done++;
        __atomic_store_n(&aps[cpu].returns, done, __ATOMIC_RELEASE);
    }
}
