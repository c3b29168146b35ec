/* ACPI table lookup: RSDP (boot_params.acpi_rsdp_addr, else a scan of 0xe0000..0xfffff), XSDT/RSDT. */
#include "acpi.h"

#define BP_ACPI_RSDP_ADDR 0x070
#define TABLE_MAX_LEN 0x100000
#define ADDR_LIMIT 0x100000000ULL /* the guest maps 0..4 GiB */

static bool sane_table(u64 addr, u32 *len)
{
    if (addr == 0 || addr >= ADDR_LIMIT - 36)
        return false;
    u32 l;
    memcpy(&l, (const u8 *)(uintptr_t)addr + 4, 4);
    if (l < 36 || l > TABLE_MAX_LEN || addr + l > ADDR_LIMIT)
        return false;
    *len = l;
    return true;
}

static const u8 *find_rsdp(void)
{
    u64 addr;
    memcpy(&addr, (const u8 *)BOOT_PARAMS_ADDR + BP_ACPI_RSDP_ADDR, 8);
    if (addr && addr < ADDR_LIMIT - 36 && memcmp((const void *)(uintptr_t)addr, "RSD PTR ", 8) == 0)
        return (const u8 *)(uintptr_t)addr;
    for (u64 a = 0xe0000; a < 0x100000; a += 16) {
        if (memcmp((const void *)(uintptr_t)a, "RSD PTR ", 8) == 0)
            return (const u8 *)(uintptr_t)a;
    }
    return NULL;
}

const u8 *acpi_find_table(const char *sig, u32 *len)
{
    const u8 *rsdp = find_rsdp();
    if (!rsdp)
        return NULL;
    u64 root = 0;
    u32 entry_size = 8, root_len;
    if (rsdp[15] >= 2)
        memcpy(&root, rsdp + 24, 8);
    if (root == 0) {
        u32 rsdt;
        memcpy(&rsdt, rsdp + 16, 4);
        root = rsdt;
        entry_size = 4;
    }
    if (!sane_table(root, &root_len))
        return NULL;
    const u8 *t = (const u8 *)(uintptr_t)root;
    for (u32 off = 36; off + entry_size <= root_len; off += entry_size) {
        u64 addr = 0;
        memcpy(&addr, t + off, entry_size);
        if (sane_table(addr, len) && memcmp((const void *)(uintptr_t)addr, sig, 4) == 0)
            return (const u8 *)(uintptr_t)addr;
    }
    return NULL;
}
