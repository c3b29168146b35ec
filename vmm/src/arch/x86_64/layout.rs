//! The guest physical address map of an iovmm x86_64 guest.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  initial stack pointer    0x0000_9000  PML4, then PDPT and 4 PDs
//! 0x0002_0000  kernel command line      0x000e_0000  ACPI tables (RSDP first)
//! 0x0010_0000  start of high RAM (kernel / test guest images)
//! 0xc000_0000  32-bit PCI MMIO window (BARs)   0xe000_0000  PCI ECAM (bus 0)
//! 0xfec0_0000  IOAPIC   0xfed9_0000  VT-d DRHD   0xfee0_0000  local APIC
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// The Linux "zero page" (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table of the initial identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the initial identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories (2 MiB pages, 4 GiB identity map).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of the usable conventional memory below 1 MiB (EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables area (RSDP first, 16-byte aligned, inside the BIOS area Linux scans).
pub const ACPI_START: u64 = 0xe0000;
/// Size of the ACPI area.
pub const ACPI_SIZE: u64 = 0x20000;
/// Where high memory (kernel images) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB; low RAM ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 32-bit PCI BAR window.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI ECAM base (segment 0, bus 0 only).
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// PCI ECAM size: one bus.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// IOAPIC MMIO size.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// VT-d remapping unit (DRHD) register base.
pub const VTD_START: u64 = 0xfed9_0000;
/// Local APIC base.
pub const APIC_START: u64 = 0xfee0_0000;
/// First address above the 32-bit hole.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: usize = 24;
/// Legacy serial port (COM1) base and its IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 IRQ line on the IOAPIC.
pub const SERIAL_IRQ: u32 = 4;
/// CMOS RTC index port (data port is +1).
pub const RTC_PORT: u16 = 0x70;
/// Debug exit port used by test guests.
pub const EXIT_PORT: u16 = 0xf4;
/// i8042 controller data port (command port is +4).
pub const I8042_PORT: u16 = 0x60;
/// PCI configuration address port.
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;

// The fixed areas must not overlap; checked at compile time.
const _: () = {
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(ACPI_START + ACPI_SIZE <= HIMEM_START);
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
};

/// The guest RAM ranges for `mem_size` bytes: `(start, len)` pairs.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if mem_size > low {
        ranges.push((RAM_64BIT_START, mem_size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_low_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_guest_splits_around_the_mmio_hole() {
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_HOLE_START),
                (RAM_64BIT_START, (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }
}
