/*
 * kvm-exit-floor: what a guest exit costs on this host without iovmm, for docs/benchmark.md
 * ("Floors"). A minimal VMM: one vCPU in 64-bit mode (identity-mapped 4 MiB, 2 MiB pages) runs
 * one of two loops, in ring 0 or ring 3 (IOPL=3):
 *   out:   `out 0x80, al; jmp` -- every KVM_RUN returns to this program with KVM_EXIT_IO;
 *   cpuid: 1000 x CPUID leaf 0 (handled by KVM in the kernel), then one `out` to come back.
 * It prints p50/p99/min per exit (for cpuid: per KVM_RUN / 1000, the `out` included).
 *
 *   gcc -O2 -o /tmp/kvm-exit-floor resources/kvm-exit-floor.c
 *   /tmp/kvm-exit-floor [ITERATIONS]
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

#define MEM (4u << 20)
#define CODE 0x10000
#define CPUID_PER_RUN 1000

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int die(const char *what)
{
    perror(what);
    return 1;
}

/* One VM running `code` in ring `ring`; prints the per-exit cost of `n` KVM_RUNs / `per_run`. */
static int measure(int kvm, const char *name, const uint8_t *code, size_t len, int ring, int n, int per_run)
{
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return die("KVM_CREATE_VM");
    uint8_t *mem = mmap(0, MEM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return die("mmap");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM, .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return die("KVM_SET_USER_MEMORY_REGION");
    uint64_t *pml4 = (uint64_t *)(mem + 0x2000), *pdpt = (uint64_t *)(mem + 0x3000), *pd = (uint64_t *)(mem + 0x4000);
    pml4[0] = 0x3000 | 7;
    pdpt[0] = 0x4000 | 7;
    pd[0] = 0x87; /* 2 MiB, present, writable, user */
    pd[1] = 0x200000 | 0x87;
    uint64_t dpl = (uint64_t)ring << 45;
    uint64_t *gdt = (uint64_t *)(mem + 0x1000);
    gdt[1] = 0x00209a0000000000ULL | dpl; /* 64-bit code */
    gdt[2] = 0x0000920000000000ULL | dpl; /* data */
    memcpy(mem + CODE, code, len);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        return die("KVM_CREATE_VCPU");
    struct {
        struct kvm_cpuid2 c;
        struct kvm_cpuid_entry2 e[100];
    } cpuid = {.c.nent = 100};
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0 || ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0)
        return die("CPUID");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        return die("mmap kvm_run");
    struct kvm_sregs s;
    if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0)
        return die("KVM_GET_SREGS");
    struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = (uint16_t)(8 | ring), .present = 1,
                             .type = 11, .dpl = (uint8_t)ring, .s = 1, .l = 1, .g = 1};
    struct kvm_segment ds = {.base = 0, .limit = 0xffffffff, .selector = (uint16_t)(16 | ring), .present = 1,
                             .type = 3, .dpl = (uint8_t)ring, .db = 1, .s = 1, .g = 1};
    s.cs = cs;
    s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.gdt.base = 0x1000;
    s.gdt.limit = 23;
    s.cr3 = 0x2000;
    s.cr4 = 0x20;         /* PAE */
    s.cr0 = 0x80000011;   /* PG, ET, PE */
    s.efer = 0x500;       /* LMA, LME */
    if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0)
        return die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = CODE, .rsp = 0x8000, .rflags = 0x3002 /* IOPL=3 */};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        return die("KVM_SET_REGS");

    double *v = malloc(sizeof(double) * (size_t)n);
    if (!v)
        return die("malloc");
    for (int i = 0; i < n + 20; i++) {
        double t = now_us();
        if (ioctl(vcpu, KVM_RUN, 0) < 0)
            return die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "%s ring %d: unexpected exit %u\n", name, ring, run->exit_reason);
            return 1;
        }
        if (i >= 20)
            v[i - 20] = (now_us() - t) / per_run;
    }
    qsort(v, (size_t)n, sizeof(double), cmp);
    printf("%-5s ring %d: p50 %7.2f us  p99 %7.2f us  min %7.2f us  (%d KVM_RUNs)\n", name, ring, v[n / 2],
           v[(size_t)n * 99 / 100], v[0], n);
    free(v);
    return 0;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 20000;
    if (n < 1)
        n = 1;
    int kvm = open("/dev/kvm", O_RDWR);
    if (kvm < 0)
        return die("/dev/kvm");
    static const uint8_t out[] = {0xe6, 0x80, 0xeb, 0xfc}; /* out 0x80, al; jmp .-2 */
    static const uint8_t cpuid[] = {
        0xbe, 0xe8, 0x03, 0x00, 0x00, /* mov esi, 1000 */
        0x31, 0xc0,                   /* 1: xor eax, eax */
        0x0f, 0xa2,                   /* cpuid */
        0xff, 0xce,                   /* dec esi */
        0x75, 0xf8,                   /* jnz 1b */
        0xe6, 0x80,                   /* out 0x80, al */
        0xeb, 0xef,                   /* jmp start */
    };
    int runs = n / 100 > 0 ? n / 100 : 1;
    for (int ring = 0; ring <= 3; ring += 3) {
        if (measure(kvm, "out", out, sizeof(out), ring, n, 1) ||
            measure(kvm, "cpuid", cpuid, sizeof(cpuid), ring, runs, CPUID_PER_RUN))
            return 1;
    }
    return 0;
}
