/*
 * Ring-0 exception reporter. Runs emulated (slow) but only once, at the end of a guest's life:
 * prints the vector, error code and registers plus an IOVMM-RESULT line, then exits with
 * EXIT_EXCEPTION_BASE + vector. Uses nothing but port writes (no console buffer, no printf).
 */
#include "lib.h"

/* The name of the running scenario, set by ring 3 so the result line can carry it. */
const char *current_test = "boot";

struct exception_frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

static void k_puts(const char *s)
{
    while (*s)
        outb(SERIAL_PORT, (u8)*s++);
}

static void k_hex(u64 v)
{
    char buf[19];
    int n = 18;
    buf[n] = '\0';
    do {
        buf[--n] = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    } while (v);
    buf[--n] = 'x';
    buf[--n] = '0';
    k_puts(buf + n);
}

static void k_dec(u64 v)
{
    char buf[21];
    int n = 20;
    buf[n] = '\0';
    do {
        buf[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    k_puts(buf + n);
}

static void k_json_hex(const char *key, u64 v)
{
    k_puts(",\"");
    k_puts(key);
    k_puts("\":\"");
    k_hex(v);
    k_puts("\"");
}

NORETURN void exception_report(const struct exception_frame *f);

NORETURN void exception_report(const struct exception_frame *f)
{
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    console_flush(); /* whatever ring 3 had not printed yet */
    k_puts("\nIOVMM-EXCEPTION vector=");
    k_dec(f->vector);
    k_puts(" error=");
    k_hex(f->error);
    k_puts(" rip=");
    k_hex(f->rip);
    k_puts(" cr2=");
    k_hex(cr2);
    k_puts(" rsp=");
    k_hex(f->rsp);
    k_puts(" cs=");
    k_hex(f->cs);
    k_puts(" rflags=");
    k_hex(f->rflags);
    k_puts("\nIOVMM-RESULT {\"test\":\"");
    k_puts(current_test);
    k_puts("\",\"status\":\"exception\",\"vector\":");
    k_dec(f->vector);
    k_puts(",\"error\":");
    k_dec(f->error);
    k_json_hex("rip", f->rip);
    k_json_hex("cr2", cr2);
    k_puts("}\n");
    outl(EXIT_PORT, EXIT_EXCEPTION_BASE + (u32)(f->vector & 0x1f));
    for (;;)
        __asm__ volatile("hlt");
}
