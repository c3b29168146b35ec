/* Freestanding helpers of the ring-3 workload: port and MMIO access, console, strings, time. */
#ifndef IOVMM_GUEST_LIB_H
#define IOVMM_GUEST_LIB_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "abi.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define NORETURN __attribute__((noreturn))

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* MMIO: one access of exactly the given width (the VMM sees the same width). */
static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
/* One 64-bit access (VT-d registers accept them; virtio-pci uses the split form below). */
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }
/* 64-bit registers are written low half first, as two 32-bit accesses (like Linux's virtio-pci). */
static inline void mmio_write64_split(u64 a, u64 v)
{
    mmio_write32(a, (u32)v);
    mmio_write32(a + 4, (u32)(v >> 32));
}

static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline void mb(void) { __asm__ volatile("mfence" : : : "memory"); }
/* Writes a cache line back to memory (for a non-coherent IOMMU page walker). */
static inline void clflush(const volatile void *p) { __asm__ volatile("clflush (%0)" : : "r"(p) : "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }

/* A ring-3 spinlock for data shared between vCPUs (smp.c). */
struct spinlock {
    volatile u32 held;
};
static inline void spin_lock(struct spinlock *l)
{
    while (__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&l->held, __ATOMIC_RELAXED))
            cpu_relax();
}
static inline bool spin_trylock(struct spinlock *l) { return !__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE); }
static inline void spin_unlock(struct spinlock *l) { __atomic_store_n(&l->held, 0, __ATOMIC_RELEASE); }

/* Serialised TSC read (lfence keeps earlier instructions from drifting past it). */
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* Strings and memory (ring 3: rep movs/stos run natively). */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
/* Parses a decimal or 0x-prefixed hex number with an optional K/M/G suffix; false if malformed. */
bool parse_u64(const char *s, u64 *out);

/* Console on the 16550 at SERIAL_PORT. Output is buffered per line. */
void console_putc(char c);
void console_write(const char *s, size_t n);
void console_flush(void);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
/* Bounded formatting into buf (always NUL-terminated); returns the untruncated length. */
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* Flushes the console and exits the VM with code (via EXIT_PORT). */
NORETURN void guest_exit(u32 code);

/* TSC frequency in kHz from CPUID leaves 0x15/0x16, 0 when the CPU does not say. */
u64 tsc_khz(void);

#endif
