/* PCI bus 0 over ECAM: enumeration, config access, capabilities, BARs. */
#ifndef IOVMM_GUEST_PCI_H
#define IOVMM_GUEST_PCI_H

#include "lib.h"

#define PCI_ECAM_BASE 0xe0000000ULL
#define PCI_MAX_DEVICES 64

#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_CLASS_REVISION 0x08
#define PCI_HEADER_TYPE 0x0e
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34

#define PCI_COMMAND_IO 0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_STATUS_CAP_LIST 0x10

#define PCI_CAP_ID_MSIX 0x11
#define PCI_CAP_ID_VNDR 0x09

/* PCI Express extended capabilities (ECAM offsets 0x100..0xfff). */
#define PCI_EXT_CAP_START 0x100
#define PCI_EXT_CAP_ID_ATS 0x000f
#define PCI_ATS_CAP 0x04         /* u16: 4:0 invalidate queue depth (0 = 32), bit 5 page aligned request */
#define PCI_ATS_CTRL 0x06        /* u16: 4:0 smallest translation unit, bit 15 enable */
#define PCI_ATS_CAP_QDEP(c) ((c) & 0x1f)
#define PCI_ATS_CAP_PAGE_ALIGNED 0x20
#define PCI_ATS_CTRL_ENABLE 0x8000

struct pci_dev {
    u8 bus, dev, fn;
    u16 vendor, device;
    u32 class_code; /* class << 16 | subclass << 8 | prog-if */
    u8 header_type;
    u64 cfg;        /* ECAM address of the function's 4 KiB config space */
};

enum pci_bar_kind { PCI_BAR_NONE, PCI_BAR_IO, PCI_BAR_MEM32, PCI_BAR_MEM64 };

struct pci_bar {
    enum pci_bar_kind kind;
    bool prefetchable;
    u64 addr;
    u64 size; /* 0 unless sized with pci_bar_size */
};

u8 pci_read8(const struct pci_dev *d, u16 off);
u16 pci_read16(const struct pci_dev *d, u16 off);
u32 pci_read32(const struct pci_dev *d, u16 off);
void pci_write16(const struct pci_dev *d, u16 off, u16 v);
void pci_write32(const struct pci_dev *d, u16 off, u32 v);

/* Enumerates bus 0 (all functions of multi-function devices); returns the number found. */
size_t pci_scan(struct pci_dev *out, size_t max);
/* The result of the last pci_scan (its array and count); NULL/0 before the first scan. */
const struct pci_dev *pci_scanned(size_t *n);
/* Requester ID (endpoint/source ID): bus << 8 | dev << 3 | fn. */
static inline u16 pci_sid(const struct pci_dev *d) { return (u16)(d->bus << 8 | d->dev << 3 | d->fn); }
/* First function with this vendor and one of the device ids (0-terminated list), or NULL. */
const struct pci_dev *pci_find(const struct pci_dev *devs, size_t n, u16 vendor, const u16 *ids);
/* Decodes BAR idx (the upper half of a 64-bit BAR gives PCI_BAR_NONE). */
struct pci_bar pci_bar(const struct pci_dev *d, int idx);
/* Sizes BAR idx by the standard write-all-ones probe with decoding disabled, then restores it. */
u64 pci_bar_size(const struct pci_dev *d, int idx);
/* Offset of the next capability with id `id` after `after` (0: from the start), 0 if none. */
u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 after);
/* Offset of extended capability `id` (walked from 0x100 over ECAM), 0 if none. */
u16 pci_find_ext_cap(const struct pci_dev *d, u16 id);
void pci_enable(const struct pci_dev *d, u16 command_bits);

#endif
