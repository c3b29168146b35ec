/* What the guest knows about its environment: command line, RAM, the result line. */
#ifndef IOVMM_GUEST_ENV_H
#define IOVMM_GUEST_ENV_H

#include "lib.h"

/* ---- command line (boot_params.cmd_line_ptr), copied at start-up */
#define CMDLINE_MAX 2048
void cmdline_init(void);
const char *cmdline_raw(void);
/* Copies the value of `key=value` into buf; false when absent (or too long for buf). */
bool cmdline_get(const char *key, char *buf, size_t size);
/* Numeric parameter (see parse_u64). Returns 0 and sets *out = dflt when absent; -1 if malformed. */
int cmdline_u64(const char *key, u64 dflt, u64 *out);

/* TSC rate in kHz: iovmm.tsc_khz when given (CPUID does not tell it on AMD), else CPUID, else 0. */
u64 tsc_rate_khz(void);
/* Milliseconds to TSC cycles (assumes 3 GHz when the TSC rate is unknown). */
u64 ms_to_cycles(u64 ms);
/* One turn of a polling loop that gives up after `timeout` cycles without progress: with
 * progress (`got` > 0) restarts the clock at *last; else false once the time is up, or pauses. */
bool poll_progress(u64 got, u64 *last, u64 timeout);

/* ---- physical memory: e820 and a bump allocator over free RAM past the image */
struct e820_entry {
    u64 addr, size;
    u32 type;
} __attribute__((packed));
#define E820_RAM 1

/* Reads e820 and picks the free RAM after the image. Returns false if there is none. */
bool mem_init(void);
/* Zeroed, `align`-aligned (power of two) memory; NULL when exhausted. Never freed. */
void *mem_alloc(u64 size, u64 align);
u64 mem_free_bytes(void);
/* e820 entry i of the boot_params table; false past its end. */
bool e820_entry_at(u32 i, struct e820_entry *out);
u64 mem_total_ram(void);

/* ---- the result line: IOVMM-RESULT {"test":"...","status":"...",...} */
struct result {
    char buf[2048];
    size_t len;
    bool overflow;
};
void result_begin(struct result *r, const char *test, const char *status);
void result_str(struct result *r, const char *key, const char *value);
void result_u64(struct result *r, const char *key, u64 value);
void result_hex(struct result *r, const char *key, u64 value);
/* Prints the line (ends with "}\n"). */
void result_emit(struct result *r);

/* The scenario name for the exception reporter (exception.c). */
extern const char *current_test;

#endif
