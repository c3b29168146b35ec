/* ACPI table lookup (RSDP from boot_params or the BIOS area, then RSDT/XSDT), read-only. */
#ifndef IOVMM_GUEST_ACPI_H
#define IOVMM_GUEST_ACPI_H

#include "lib.h"

/* The first table with this 4-character signature and a sane length, or NULL. Sets *len. */
const u8 *acpi_find_table(const char *sig, u32 *len);

#endif
