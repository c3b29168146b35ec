/* PCI configuration space over ECAM (bus 0). Every access traps to the VMM. */
#include "pci.h"

u8 pci_read8(const struct pci_dev *d, u16 off) { return mmio_read8(d->cfg + off); }
u16 pci_read16(const struct pci_dev *d, u16 off) { return mmio_read16(d->cfg + off); }
u32 pci_read32(const struct pci_dev *d, u16 off) { return mmio_read32(d->cfg + off); }
void pci_write16(const struct pci_dev *d, u16 off, u16 v) { mmio_write16(d->cfg + off, v); }
void pci_write32(const struct pci_dev *d, u16 off, u32 v) { mmio_write32(d->cfg + off, v); }

static bool probe(struct pci_dev *d, u8 dev, u8 fn)
{
    d->bus = 0;
    d->dev = dev;
    d->fn = fn;
    d->cfg = PCI_ECAM_BASE + ((u64)dev << 15) + ((u64)fn << 12);
    u32 id = pci_read32(d, PCI_VENDOR_ID);
    if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
        return false;
    d->vendor = (u16)id;
    d->device = (u16)(id >> 16);
    d->class_code = pci_read32(d, PCI_CLASS_REVISION) >> 8;
    d->header_type = pci_read8(d, PCI_HEADER_TYPE);
    return true;
}

static const struct pci_dev *last_scan;
static size_t last_count;

const struct pci_dev *pci_scanned(size_t *n)
{
    *n = last_count;
    return last_scan;
}

size_t pci_scan(struct pci_dev *out, size_t max)
{
    size_t n = 0;
    for (u8 dev = 0; dev < 32 && n < max; dev++) {
        if (!probe(&out[n], dev, 0))
            continue;
        bool multi = out[n].header_type & 0x80;
        n++;
        for (u8 fn = 1; multi && fn < 8 && n < max; fn++) {
            if (probe(&out[n], dev, fn))
                n++;
        }
    }
    last_scan = out;
    last_count = n;
    return n;
}

const struct pci_dev *pci_find(const struct pci_dev *devs, size_t n, u16 vendor, const u16 *ids)
{
    for (size_t i = 0; i < n; i++) {
        for (const u16 *id = ids; *id; id++) {
            if (devs[i].vendor == vendor && devs[i].device == *id)
                return &devs[i];
        }
    }
    return NULL;
}

static int bar_count(const struct pci_dev *d) { return (d->header_type & 0x7f) == 0 ? 6 : 2; }

static bool bar_is_mem64(u32 lo) { return !(lo & 1) && ((lo >> 1) & 3) == 2; }

struct pci_bar pci_bar(const struct pci_dev *d, int idx)
{
    struct pci_bar b = {.kind = PCI_BAR_NONE};
    if (idx < 0 || idx >= bar_count(d))
        return b;
    /* Walk from BAR0: the upper half of a 64-bit BAR is not a BAR of its own. */
    int i = 0;
    while (i < idx)
        i += bar_is_mem64(pci_read32(d, (u16)(PCI_BAR0 + 4 * i))) ? 2 : 1;
    if (i != idx)
        return b;
    u32 lo = pci_read32(d, (u16)(PCI_BAR0 + 4 * idx));
    if (lo & 1) {
        b.kind = PCI_BAR_IO;
        b.addr = lo & ~3u;
        return b;
    }
    b.prefetchable = lo & 8;
    b.addr = lo & ~0xfu;
    b.kind = PCI_BAR_MEM32;
    if (bar_is_mem64(lo) && idx + 1 < bar_count(d)) {
        b.kind = PCI_BAR_MEM64;
        b.addr |= (u64)pci_read32(d, (u16)(PCI_BAR0 + 4 * (idx + 1))) << 32;
    }
    return b;
}

u64 pci_bar_size(const struct pci_dev *d, int idx)
{
    struct pci_bar b = pci_bar(d, idx);
    if (b.kind == PCI_BAR_NONE)
        return 0;
    u16 off = (u16)(PCI_BAR0 + 4 * idx);
    u16 cmd = pci_read16(d, PCI_COMMAND);
    pci_write16(d, PCI_COMMAND, cmd & (u16)~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
    u32 lo = pci_read32(d, off);
    pci_write32(d, off, 0xffffffff);
    u64 mask = pci_read32(d, off);
    pci_write32(d, off, lo);
    bool implemented = (mask & ~0xfULL) != 0;
    if (b.kind == PCI_BAR_MEM64) {
        u32 hi = pci_read32(d, (u16)(off + 4));
        pci_write32(d, (u16)(off + 4), 0xffffffff);
        u32 hi_mask = pci_read32(d, (u16)(off + 4));
        implemented |= hi_mask != 0;
        mask |= (u64)hi_mask << 32;
        pci_write32(d, (u16)(off + 4), hi);
    } else {
        mask |= 0xffffffff00000000ULL;
    }
    pci_write16(d, PCI_COMMAND, cmd);
    if (b.kind == PCI_BAR_IO) {
        mask &= ~3ULL;
        if (!(mask & 0xffff0000ULL)) /* 16-bit I/O decoder */
            mask |= 0xffff0000ULL;
    } else {
        mask &= ~0xfULL;
    }
    return implemented ? ~mask + 1 : 0;
}

u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 after)
{
    if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return 0;
    u8 pos = after ? pci_read8(d, (u16)(after + 1)) : pci_read8(d, PCI_CAP_PTR);
    /* At most 48 capabilities fit in 256 bytes: bounds a malformed (looping) list. */
    for (int guard = 0; pos >= 0x40 && guard < 48; guard++) {
        pos &= 0xfc;
        if (pci_read8(d, pos) == id)
            return pos;
        pos = pci_read8(d, (u16)(pos + 1));
    }
    return 0;
}

void pci_enable(const struct pci_dev *d, u16 command_bits)
{
    u16 cmd = pci_read16(d, PCI_COMMAND);
    pci_write16(d, PCI_COMMAND, cmd | command_bits);
}

u16 pci_find_ext_cap(const struct pci_dev *d, u16 id)
{
    u16 pos = PCI_EXT_CAP_START;
    /* At most (4096 - 256) / 4 headers fit: bounds a malformed (looping) list. */
    for (int guard = 0; guard < 960; guard++) {
        u32 hdr = pci_read32(d, pos);
        if (hdr == 0 || hdr == 0xffffffff)
            return 0;
        if ((hdr & 0xffff) == id)
            return pos;
        u16 next = (u16)((hdr >> 20) & 0xffc);
        if (next < PCI_EXT_CAP_START)
            return 0;
        pos = next;
    }
    return 0;
}
