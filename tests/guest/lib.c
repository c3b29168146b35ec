/* Ring-3 runtime: memory and string helpers, a printf for the serial console, exit. */
#include "lib.h"

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++) {
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    }
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i])
            return (u8)a[i] < (u8)b[i] ? -1 : 1;
        if (!a[i])
            return 0;
    }
    return 0;
}

int strcmp(const char *a, const char *b) { return strncmp(a, b, (size_t)-1); }

static int digit_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return 99;
}

bool parse_u64(const char *s, u64 *out)
{
    u64 base = 10, v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (digit_value(*s) >= (int)base)
        return false;
    for (; digit_value(*s) < (int)base; s++) {
        u64 d = (u64)digit_value(*s);
        if (v > (UINT64_MAX - d) / base)
            return false;
        v = v * base + d;
    }
    u64 mult = 1;
    if (*s == 'K' || *s == 'k')
        mult = 1ULL << 10;
    else if (*s == 'M' || *s == 'm')
        mult = 1ULL << 20;
    else if (*s == 'G' || *s == 'g')
        mult = 1ULL << 30;
    if (mult != 1)
        s++;
    if (*s != '\0' || v > UINT64_MAX / mult)
        return false;
    *out = v * mult;
    return true;
}

/* ------------------------------------------------------------------ console */

static char line_buf[256];
static size_t line_len;

void console_flush(void)
{
    for (size_t i = 0; i < line_len; i++)
        outb(SERIAL_PORT, (u8)line_buf[i]);
    line_len = 0;
}

void console_putc(char c)
{
    if (line_len == sizeof(line_buf))
        console_flush();
    line_buf[line_len++] = c;
    if (c == '\n')
        console_flush();
}

void console_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        console_putc(s[i]);
}

NORETURN void guest_exit(u32 code)
{
    console_flush();
    outl(EXIT_PORT, code);
    for (;;)
        cpu_relax();
}

/* ------------------------------------------------------------------ formatting */

struct sink {
    char *buf;     /* NULL: write to the console */
    size_t size;
    size_t len;    /* characters produced so far (also past the end of buf) */
};

static void sink_put(struct sink *s, char c)
{
    if (!s->buf)
        console_putc(c);
    else if (s->len + 1 < s->size)
        s->buf[s->len] = c;
    s->len++;
}

struct spec {
    bool left, zero;
    int width;
};

static void put_padded(struct sink *s, const struct spec *sp, const char *str, size_t n)
{
    int pad = sp->width > (int)n ? sp->width - (int)n : 0;
    char padc = sp->zero && !sp->left ? '0' : ' ';
    if (!sp->left) {
        /* Zero padding goes after a sign. */
        if (padc == '0' && n > 0 && str[0] == '-') {
            sink_put(s, '-');
            str++;
            n--;
        }
        while (pad-- > 0)
            sink_put(s, padc);
    }
    for (size_t i = 0; i < n; i++)
        sink_put(s, str[i]);
    while (sp->left && pad-- > 0)
        sink_put(s, ' ');
}

static size_t format_u64(char *out, u64 v, unsigned base, bool upper)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

static void put_number(struct sink *s, const struct spec *sp, char conv, u64 uv, bool neg)
{
    char num[26];
    size_t n = 0;
    if (neg)
        num[n++] = '-';
    if (conv == 'p') {
        num[n++] = '0';
        num[n++] = 'x';
    }
    unsigned base = (conv == 'x' || conv == 'X' || conv == 'p') ? 16 : 10;
    n += format_u64(num + n, uv, base, conv == 'X');
    put_padded(s, sp, num, n);
}

static u64 take_unsigned(va_list *ap, int longness)
{
    if (longness == 0)
        return va_arg(*ap, unsigned int);
    return va_arg(*ap, unsigned long long);
}

static i64 take_signed(va_list *ap, int longness)
{
    if (longness == 0)
        return va_arg(*ap, int);
    return va_arg(*ap, long long);
}

static const char *parse_spec(const char *f, struct spec *sp, int *longness)
{
    *sp = (struct spec){0};
    for (;; f++) {
        if (*f == '-')
            sp->left = true;
        else if (*f == '0')
            sp->zero = true;
        else
            break;
    }
    while (*f >= '0' && *f <= '9')
        sp->width = sp->width * 10 + (*f++ - '0');
    *longness = 0;
    while (*f == 'l' || *f == 'z') {
        *longness = 1;
        f++;
    }
    return f;
}

static void format_one(struct sink *s, char conv, const struct spec *sp, int longness, va_list *ap)
{
    switch (conv) {
    case 'd':
    case 'i': {
        i64 v = take_signed(ap, longness);
        put_number(s, sp, 'd', v < 0 ? (u64)0 - (u64)v : (u64)v, v < 0);
        break;
    }
    case 'u':
    case 'x':
    case 'X':
        put_number(s, sp, conv, take_unsigned(ap, longness), false);
        break;
    case 'p':
        put_number(s, sp, 'p', (u64)(uintptr_t)va_arg(*ap, void *), false);
        break;
    case 's': {
        const char *str = va_arg(*ap, const char *);
        if (!str)
            str = "(null)";
        put_padded(s, sp, str, strlen(str));
        break;
    }
    case 'c': {
        char c = (char)va_arg(*ap, int);
        put_padded(s, sp, &c, 1);
        break;
    }
    default:
        sink_put(s, '%');
        if (conv)
            sink_put(s, conv);
        break;
    }
}

static int format(struct sink *s, const char *fmt, va_list ap)
{
    va_list args;
    va_copy(args, ap);
    while (*fmt) {
        if (*fmt != '%') {
            sink_put(s, *fmt++);
            continue;
        }
        struct spec sp;
        int longness;
        fmt = parse_spec(fmt + 1, &sp, &longness);
        char conv = *fmt;
        if (conv)
            fmt++;
        format_one(s, conv, &sp, longness, &args);
    }
    va_end(args);
    return (int)s->len;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    static char dummy;
    struct sink s = {.buf = size ? buf : &dummy, .size = size, .len = 0};
    int n = format(&s, fmt, ap);
    if (size)
        buf[s.len < size ? s.len : size - 1] = '\0';
    return n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int vprintf(const char *fmt, va_list ap)
{
    struct sink s = {0};
    return format(&s, fmt, ap);
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

/* ------------------------------------------------------------------ time */

u64 tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(0, 0, &a, &b, &c, &d);
    u32 max_leaf = a;
    if (max_leaf >= 0x15) {
        cpuid(0x15, 0, &a, &b, &c, &d);
        if (a && b && c)
            return (u64)c * b / a / 1000;
    }
    if (max_leaf >= 0x16) {
        cpuid(0x16, 0, &a, &b, &c, &d);
        if (a & 0xffff)
            return (u64)(a & 0xffff) * 1000;
    }
    return 0;
}
