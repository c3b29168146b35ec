/* Command line, e820 memory and result-line helpers of the ring-3 workload. */
#include "env.h"

extern char __image_end[];

/* ------------------------------------------------------------------ command line */

static char cmdline[CMDLINE_MAX];

void cmdline_init(void)
{
    const u8 *bp = (const u8 *)BOOT_PARAMS_ADDR;
    u64 ptr = *(const u32 *)(bp + BP_CMD_LINE_PTR);
    if (ptr == 0)
        return;
    const char *src = (const char *)ptr;
    size_t n = 0;
    while (n + 1 < sizeof(cmdline) && src[n]) {
        cmdline[n] = src[n];
        n++;
    }
    cmdline[n] = '\0';
}

const char *cmdline_raw(void) { return cmdline; }

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

bool cmdline_get(const char *key, char *buf, size_t size)
{
    size_t klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (is_space(*p))
            p++;
        const char *tok = p;
        while (*p && !is_space(*p))
            p++;
        if ((size_t)(p - tok) > klen && strncmp(tok, key, klen) == 0 && tok[klen] == '=') {
            size_t vlen = (size_t)(p - tok) - klen - 1;
            if (vlen + 1 > size)
                return false;
            memcpy(buf, tok + klen + 1, vlen);
            buf[vlen] = '\0';
            return true;
        }
    }
    return false;
}

int cmdline_u64(const char *key, u64 dflt, u64 *out)
{
    char val[32];
    if (!cmdline_get(key, val, sizeof(val))) {
        *out = dflt;
        return 0;
    }
    return parse_u64(val, out) ? 0 : -1;
}

u64 tsc_rate_khz(void)
{
    /* Cached: CPUID is a VM exit and timeouts are computed on every vIOMMU request. */
    static u64 cached;
    static bool known;
    if (known)
        return cached;
    u64 khz;
    cached = (cmdline_u64("iovmm.tsc_khz", 0, &khz) == 0 && khz != 0) ? khz : tsc_khz();
    known = true;
    return cached;
}

u64 ms_to_cycles(u64 ms)
{
    u64 khz = tsc_rate_khz();
    return ms * (khz ? khz : 3000000);
}

bool poll_progress(u64 got, u64 *last, u64 timeout)
{
    if (got) {
        *last = rdtsc();
        return true;
    }
    if (rdtsc() - *last > timeout)
        return false;
    cpu_relax();
    return true;
}

/* ------------------------------------------------------------------ memory */

static u64 arena_next, arena_end, total_ram;

static void avoid_cmdline(u64 *start, u64 end)
{
    u64 ptr = *(const u32 *)(BOOT_PARAMS_ADDR + BP_CMD_LINE_PTR);
    if (ptr >= *start && ptr < end)
        *start = ALIGN_UP(ptr + CMDLINE_MAX, 4096);
}

bool mem_init(void)
{
    const u8 *bp = (const u8 *)BOOT_PARAMS_ADDR;
    u32 n = bp[BP_E820_ENTRIES];
    if (n > BP_E820_MAX)
        n = BP_E820_MAX;
    const struct e820_entry *e = (const struct e820_entry *)(bp + BP_E820_TABLE);
    u64 image_end = (u64)(uintptr_t)__image_end;
    for (u32 i = 0; i < n; i++) {
        if (e[i].type != E820_RAM || e[i].addr + e[i].size < e[i].addr)
            continue;
        total_ram += e[i].size;
        u64 start = e[i].addr, end = e[i].addr + e[i].size;
        if (end <= image_end || start > image_end || arena_end)
            continue;
        /* The region that holds the image; the arena starts after it. */
        start = image_end;
        avoid_cmdline(&start, end);
        /* Stay below 4 GiB: the guest's 2 MiB mappings cover it on every CPU. */
        if (end > 0x100000000ULL)
            end = 0x100000000ULL;
        if (start < end) {
            arena_next = start;
            arena_end = end;
        }
    }
    return arena_end != 0;
}

void *mem_alloc(u64 size, u64 align)
{
    u64 a = ALIGN_UP(arena_next, align);
    if (a < arena_next || a > arena_end || size > arena_end - a)
        return NULL;
    arena_next = a + size;
    void *p = (void *)(uintptr_t)a;
    memset(p, 0, size);
    return p;
}

u64 mem_free_bytes(void) { return arena_end - arena_next; }

bool e820_entry_at(u32 i, struct e820_entry *out)
{
    const u8 *bp = (const u8 *)BOOT_PARAMS_ADDR;
    u32 n = bp[BP_E820_ENTRIES];
    if (i >= n || i >= BP_E820_MAX)
        return false;
    *out = ((const struct e820_entry *)(bp + BP_E820_TABLE))[i];
    return true;
}
u64 mem_total_ram(void) { return total_ram; }

/* ------------------------------------------------------------------ result line */

/* Room kept free for the ",\"truncated\":true" marker. */
#define RESULT_RESERVE 24

/* A field is built whole in a fragment, then appended whole or not at all (valid JSON). */
struct frag {
    char buf[256];
    size_t len;
    bool overflow;
};

static void frag_raw(struct frag *f, const char *s)
{
    size_t n = strlen(s);
    if (f->len + n >= sizeof(f->buf)) {
        f->overflow = true;
        return;
    }
    memcpy(f->buf + f->len, s, n + 1);
    f->len += n;
}

/* JSON string: quotes, backslashes and control characters escaped. */
static void frag_string(struct frag *f, const char *s)
{
    frag_raw(f, "\"");
    for (; *s; s++) {
        char tmp[8];
        u8 c = (u8)*s;
        if (c == '"' || c == '\\')
            snprintf(tmp, sizeof(tmp), "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            snprintf(tmp, sizeof(tmp), "\\u%04x", c);
        else
            snprintf(tmp, sizeof(tmp), "%c", c);
        frag_raw(f, tmp);
    }
    frag_raw(f, "\"");
}

static void result_append(struct result *r, const struct frag *f)
{
    if (f->overflow || r->len + f->len + RESULT_RESERVE >= sizeof(r->buf)) {
        r->overflow = true;
        return;
    }
    memcpy(r->buf + r->len, f->buf, f->len + 1);
    r->len += f->len;
}

static void field_begin(struct frag *f, const char *key)
{
    f->len = 0;
    f->overflow = false;
    f->buf[0] = '\0';
    frag_raw(f, ",");
    frag_string(f, key);
    frag_raw(f, ":");
}

void result_begin(struct result *r, const char *test, const char *status)
{
    struct frag f = {.len = 0};
    r->len = 0;
    r->overflow = false;
    r->buf[0] = '\0';
    frag_raw(&f, "{\"test\":");
    frag_string(&f, test);
    result_append(r, &f);
    result_str(r, "status", status);
}

void result_str(struct result *r, const char *key, const char *value)
{
    struct frag f;
    field_begin(&f, key);
    frag_string(&f, value);
    result_append(r, &f);
}

/* A field whose value is `value` printed with `fmt` (one unsigned long long conversion). */
static void result_number(struct result *r, const char *key, const char *fmt, u64 value)
{
    struct frag f;
    char tmp[24];
    field_begin(&f, key);
    snprintf(tmp, sizeof(tmp), fmt, (unsigned long long)value);
    frag_raw(&f, tmp);
    result_append(r, &f);
}

void result_u64(struct result *r, const char *key, u64 value) { result_number(r, key, "%llu", value); }

void result_hex(struct result *r, const char *key, u64 value) { result_number(r, key, "\"0x%llx\"", value); }

void result_emit(struct result *r)
{
    printf("IOVMM-RESULT %s%s}\n", r->buf, r->overflow ? ",\"truncated\":true" : "");
}
