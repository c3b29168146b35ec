//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT (PCI root, COM1, RTC, power
//! button with its Generic Event Device, `_S5`) and MCFG, plus
//! whatever extra tables the vIOMMU contributes (VIOT from [`super::viot`], DMAR from
//! [`super::dmar`], both with the same header fields).
//!
//! Tables are laid out one after another from [`ACPI_START`]; the RSDP comes
//! first so that both `boot_params.acpi_rsdp_addr` and a legacy BIOS-area
//! scan find it.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use devices::legacy::acpi_pm::{
    S5_SLEEP_TYPE as S5_SLP_TYP, SLEEP_CONTROL_PORT, SLEEP_REG_BIT_WIDTH, SLEEP_STATUS_PORT,
};
use devices::legacy::ged::{GED_EVENT_LEN, GED_EVENT_PORT, GED_EVENT_POWER_BUTTON, GED_IRQ};
use devices::legacy::rtc::{RTC_CENTURY_INDEX, RTC_PORT_LEN};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_SIZE, ACPI_START, APIC_START, IOAPIC_START, PCI_CONFIG_IO_PORT, PCI_ECAM_START,
    PCI_MMIO32_SIZE, PCI_MMIO32_START, RTC_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::vstate::memory::GuestMemoryMmap;

/// OEM id written into every table.
pub const OEM_ID: [u8; 6] = *b"IOVMM ";
/// OEM table id written into every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"IOVMMVM ";
/// OEM revision written into every table.
pub const OEM_REVISION: u32 = 1;

/// ACPI errors.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables do not fit in the reserved area.
    #[error("ACPI tables need {0} bytes, more than the {ACPI_SIZE} reserved")]
    TooLarge(u64),
    /// Writing to guest memory failed.
    #[error("cannot write ACPI table {0} into guest memory")]
    GuestMemory(String),
}

/// Inputs of the table set.
#[derive(Debug, Default)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..cpus).
    pub cpus: u8,
    /// Extra complete tables (e.g. VIOT, DMAR) referenced from the XSDT.
    pub extra_tables: Vec<Vec<u8>>,
}

/// Table bytes and their guest addresses.
#[derive(Debug, Default)]
pub struct AcpiLayout {
    /// `(address, signature, bytes)` of every table, RSDP first.
    pub tables: Vec<(u64, [u8; 4], Vec<u8>)>,
}

impl AcpiLayout {
    /// Address of the RSDP.
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_START
    }
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt() -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT, 1, 8);
    let io_lo = aml::AddressSpace::new_io(0u16, PCI_CONFIG_IO_PORT - 1, None);
    let io_hi = aml::AddressSpace::new_io(PCI_CONFIG_IO_PORT + 8, 0xffffu16, None);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &mmio]);
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut sdt);
    let com_io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com_crs),
        ],
    )
    .to_aml_bytes(&mut sdt);
    rtc_device(&mut sdt);
    power_button(&mut sdt);
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP]),
    )
    .to_aml_bytes(&mut sdt);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

/// The CMOS RTC as PNP0B00 with its two ports and no interrupt.
///
/// On a hardware-reduced machine Linux has no legacy IRQs: the fallback
/// `rtc_cmos` platform device it registers without this entry asks for IRQ 8,
/// which is not mapped, so the driver fails. With a PNP0B00 device and no IRQ
/// resource, `rtc-cmos` binds through PNP (or, on newer kernels, the ACPI
/// scan handler) and runs without alarms.
fn rtc_device(sdt: &mut Sdt) {
    let io = aml::IO::new(RTC_PORT, RTC_PORT, 1, RTC_PORT_LEN as u8);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sdt);
}

/// The power button of a hardware-reduced machine: `\_SB.PWRB` (`PNP0C0C`, a control-method
/// power button; the FADT's PWR_BUTTON flag says there is no fixed one) and the Generic Event
/// Device `\_SB.GED_` (`ACPI0013`) that notifies it.
///
/// The GED's `_CRS` is one interrupt, IOAPIC pin [`GED_IRQ`], level-triggered and active-high
/// (Linux's GED driver runs `_EVT` from a threaded handler with the line masked until it
/// returns; the device lowers the line when the register is read). `_EVT` reads the event
/// register (`GEVT`, one byte of SystemIO at [`GED_EVENT_PORT`], read-to-clear) and for the
/// power-button bit does `Notify (\_SB.PWRB, 0x80)`:
///
/// ```text
/// Device (\_SB.GED_) {
///     Name (_HID, "ACPI0013")  Name (_UID, 0)
///     Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) { 9 } })
///     OperationRegion (GEVR, SystemIO, 0x3C2, 1)
///     Field (GEVR, ByteAcc, NoLock, WriteAsZeros) { GEVT, 8 }
///     Method (_EVT, 1, Serialized) {
///         Local0 = GEVT
///         Local1 = Local0 & 1
///         If (Local1 == 1) { Notify (\_SB.PWRB, 0x80) }
///     }
/// }
/// ```
fn power_button(sdt: &mut Sdt) {
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(sdt);
    let irq = aml::Interrupt::new(true, false, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let port = GED_EVENT_PORT as usize;
    let len = GED_EVENT_LEN as usize;
    let bit = usize::from(GED_EVENT_POWER_BUTTON);
    let region = aml::OpRegion::new("GEVR".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "GEVR".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GEVT", 8)],
    );
    let gevt = aml::Path::new("GEVT");
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let read = aml::Store::new(&aml::Local(0), &gevt);
    let mask = aml::And::new(&aml::Local(1), &aml::Local(0), &bit);
    let notify = aml::Notify::new(&pwrb, &0x80usize);
    let pressed = aml::Equal::new(&aml::Local(1), &bit);
    let on_press = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &mask, &on_press]);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(sdt);
}

/// IAPC_BOOT_ARCH bit 2: no VGA hardware (Linux sets `x86_platform.legacy.no_vga`).
///
/// The other bits stay clear on purpose: LEGACY_DEVICES (bit 0) clear stops
/// PnP BIOS probing; 8042 (bit 1) clear makes Linux treat the keyboard
/// controller as absent, so the i8042 driver does not probe ports 0x60/0x64
/// (our i8042 only serves `reboot=k`, which works without the driver);
/// CMOS_RTC_NOT_PRESENT (bit 5) clear because the RTC exists.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u64| {
        GAS::new(
            AddressSpace::SystemIo,
            SLEEP_REG_BIT_WIDTH,
            0,
            AccessSize::ByteAccess,
            port,
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    b.sleep_control_reg = io(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io(SLEEP_STATUS_PORT);
    b.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA.into();
    // Linux's mc146818_get_time reads the century byte the FADT names.
    b.century = RTC_CENTURY_INDEX;
    to_bytes(&b.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    to_bytes(&m)
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_START, 0, 0, 0);
    to_bytes(&m)
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Builds every table and assigns addresses.
pub fn build(cfg: &AcpiConfig) -> Result<AcpiLayout, AcpiError> {
    let rsdp_len = Rsdp::len() as u64;
    let mut next = align8(ACPI_START + rsdp_len);
    let mut placed: Vec<(u64, [u8; 4], Vec<u8>)> = Vec::new();
    let mut place = |bytes: Vec<u8>, placed: &mut Vec<(u64, [u8; 4], Vec<u8>)>| {
        let addr = next;
        next = align8(next + bytes.len() as u64);
        let sig = [bytes[0], bytes[1], bytes[2], bytes[3]];
        placed.push((addr, sig, bytes));
        addr
    };
    let dsdt_addr = place(dsdt(), &mut placed);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(place(fadt(dsdt_addr), &mut placed));
    xsdt.add_entry(place(madt(cfg.cpus), &mut placed));
    xsdt.add_entry(place(mcfg(), &mut placed));
    for t in &cfg.extra_tables {
        xsdt.add_entry(place(t.clone(), &mut placed));
    }
    let xsdt_addr = place(to_bytes(&xsdt), &mut placed);
    if next > ACPI_START + ACPI_SIZE {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    placed.insert(0, (ACPI_START, *b"RSDP", rsdp));
    Ok(AcpiLayout { tables: placed })
}

/// Writes the tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, layout: &AcpiLayout) -> Result<(), AcpiError> {
    for (addr, sig, bytes) in &layout.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|_| AcpiError::GuestMemory(String::from_utf8_lossy(sig).into()))?;
    }
    Ok(())
}

/// Lays `table` out with the built-in tables and asserts it is there under
/// `signature`, with the same header fields as the MADT (OEM id, OEM table id,
/// OEM revision, creator id and revision): what an extra table must satisfy.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn assert_header_like_madt(table: &[u8], signature: &[u8; 4]) {
    let layout = build(&AcpiConfig {
        cpus: 1,
        extra_tables: vec![table.to_vec()],
    })
    .unwrap();
    let madt = &layout.tables.iter().find(|t| &t.1 == b"APIC").unwrap().2;
    assert_eq!(&table[10..36], &madt[10..36]);
    assert!(layout
        .tables
        .iter()
        .any(|(_, sig, b)| sig == signature && b == table));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn table<'a>(l: &'a AcpiLayout, sig: &[u8; 4]) -> &'a (u64, [u8; 4], Vec<u8>) {
        l.tables.iter().find(|t| &t.1 == sig).unwrap()
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_length() {
        let l = build(&AcpiConfig {
            cpus: 2,
            extra_tables: vec![],
        })
        .unwrap();
        let sigs: Vec<&[u8; 4]> = l.tables.iter().map(|t| &t.1).collect();
        assert_eq!(
            sigs,
            vec![b"RSDP", b"DSDT", b"FACP", b"APIC", b"MCFG", b"XSDT"]
        );
        for (_, sig, b) in &l.tables {
            if sig == b"RSDP" {
                assert!(checksum_ok(&b[..20]) && checksum_ok(b));
                continue;
            }
            assert!(checksum_ok(b), "{}", String::from_utf8_lossy(sig));
            assert_eq!(
                u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
                b.len()
            );
        }
    }

    #[test]
    fn pointers_chain_rsdp_to_xsdt_to_tables() {
        let l = build(&AcpiConfig {
            cpus: 1,
            extra_tables: vec![],
        })
        .unwrap();
        let rsdp = &table(&l, b"RSDP").2;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&l, b"XSDT");
        assert_eq!(xsdt.0, xsdt_addr);
        let entries: Vec<u64> = xsdt.2[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let expect: Vec<u64> = [b"FACP", b"APIC", b"MCFG"]
            .iter()
            .map(|s| table(&l, s).0)
            .collect();
        assert_eq!(entries, expect);
        // FADT X_DSDT at offset 140 points at the DSDT; hardware-reduced flag (bit 20) set.
        let fadt = &table(&l, b"FACP").2;
        assert_eq!(
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
            table(&l, b"DSDT").0
        );
        assert_ne!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        // SLEEP_CONTROL_REG at offset 244: system I/O, 8 bits, port 0x3c0.
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            0x3c0
        );
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let l = build(&AcpiConfig {
            cpus: 3,
            extra_tables: vec![],
        })
        .unwrap();
        let m = &table(&l, b"APIC").2;
        assert_eq!(
            u32::from_le_bytes(m[36..40].try_into().unwrap()),
            APIC_START as u32
        );
        // Structures follow the 44-byte header: 3 local APICs (8 bytes) then one IOAPIC (12).
        let s = &m[44..];
        assert_eq!(s.len(), 3 * 8 + 12);
        for i in 0..3 {
            assert_eq!(&s[i * 8..i * 8 + 4], &[0, 8, i as u8, i as u8]);
        }
        assert_eq!(&s[24..26], &[1, 12]);
        assert_eq!(
            u32::from_le_bytes(s[28..32].try_into().unwrap()),
            IOAPIC_START as u32
        );
    }

    #[test]
    fn mcfg_golden_bytes() {
        let l = build(&AcpiConfig {
            cpus: 1,
            extra_tables: vec![],
        })
        .unwrap();
        let m = &table(&l, b"MCFG").2;
        // 36-byte header, 8 reserved, then base (8), segment (2), start bus, end bus, 4 reserved.
        assert_eq!(m.len(), 60);
        assert_eq!(
            &m[44..60],
            &[0, 0, 0, 0xe0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn dsdt_declares_pci_root_serial_and_s5() {
        let l = build(&AcpiConfig {
            cpus: 1,
            extra_tables: vec![],
        })
        .unwrap();
        let d = &table(&l, b"DSDT").2;
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"COM1") && has(b"_S5_") && has(b"_CRS"));
        // EISA id PNP0A08 compressed.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]));
    }

    #[test]
    fn rtc_is_a_pnp0b00_device_with_ports_and_no_irq() {
        let l = build(&AcpiConfig::default()).unwrap();
        let d = &table(&l, b"DSDT").2;
        let at = d.windows(4).position(|w| w == b"RTC_").unwrap();
        let rtc = &d[at..];
        let has = |needle: &[u8]| rtc.windows(needle.len()).any(|w| w == needle);
        // _HID EISA id PNP0B00 compressed (DWordConst prefix 0x0c).
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        // IO descriptor: decode16, min = max = 0x70, alignment 1, length 2; then the end tag.
        assert!(has(&[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, 0x79]));
        // The RTC's resource template ends right after its IO descriptor: no IRQ.
        let crs = rtc.windows(4).position(|w| w == b"_CRS").unwrap();
        assert!(!rtc[crs..crs + 24].contains(&0x22) && !rtc[crs..crs + 24].contains(&0x89));
    }

    #[test]
    fn power_button_is_a_pnp0c0c_device_notified_by_a_level_ged() {
        let l = build(&AcpiConfig::default()).unwrap();
        let d = &table(&l, b"DSDT").2;
        if let Some(out) = std::env::var_os("IOVMM_DUMP_DSDT") {
            std::fs::write(out, d).unwrap();
        }
        let at = |needle: &[u8]| d.windows(needle.len()).position(|w| w == needle);
        let has = |needle: &[u8]| at(needle).is_some();
        // PWRB: _HID EISA id PNP0C0C compressed (DWordConst prefix 0x0c).
        let pwrb = at(b"PWRB").unwrap();
        assert_eq!(
            d[pwrb..]
                .windows(5)
                .position(|w| w == [0x0c, 0x41, 0xd0, 0x0c, 0x0c]),
            Some(9),
            "_HID right after the device name and `Name (_HID,`"
        );
        // GED: _HID "ACPI0013" (string), _CRS = Extended Interrupt descriptor, consumer,
        // level-triggered, active-high, exclusive (flags 0x01), one interrupt: pin 9.
        assert!(has(b"\x0dACPI0013\x00"));
        assert!(has(&[0x89, 6, 0, 0x01, 1, 9, 0, 0, 0, 0x79]));
        // OperationRegion (GEVR, SystemIO, 0x3C2, 1) and the 8-bit GEVT field in byte access.
        assert!(has(&[
            0x5b, 0x80, b'G', b'E', b'V', b'R', 1, 0x0b, 0xc2, 0x03, 1
        ]));
        assert!(has(b"GEVT\x08"));
        // _EVT, one argument, serialized; Notify (\_SB_.PWRB, 0x80).
        let evt = at(b"_EVT").unwrap();
        assert_eq!(d[evt + 4], 0x09, "1 argument, serialized");
        assert!(has(&[
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80
        ]));
        // The FADT says the power button is a control-method device (PWR_BUTTON, bit 4).
        let fadt = &table(&l, b"FACP").2;
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 4), 0);
    }

    #[test]
    fn fadt_names_the_century_byte_and_has_no_8042_or_vga() {
        let l = build(&AcpiConfig::default()).unwrap();
        let fadt = &table(&l, b"FACP").2;
        // CENTURY at offset 108, IAPC_BOOT_ARCH at 109.
        assert_eq!(fadt[108], 0x32);
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch, 1 << 2, "NO_VGA only: no 8042, CMOS RTC present");
    }

    #[test]
    fn extra_tables_are_linked_and_oversize_is_rejected() {
        let mut extra = Sdt::new(*b"VIOT", 48, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        extra.update_checksum();
        let l = build(&AcpiConfig {
            cpus: 1,
            extra_tables: vec![extra.as_slice().to_vec()],
        })
        .unwrap();
        let viot = table(&l, b"VIOT").0;
        let xsdt = &table(&l, b"XSDT").2;
        assert_eq!(
            u64::from_le_bytes(xsdt[xsdt.len() - 8..].try_into().unwrap()),
            viot
        );
        let huge = vec![0u8; ACPI_SIZE as usize];
        let mut h = huge.clone();
        h[..4].copy_from_slice(b"HUGE");
        assert!(matches!(
            build(&AcpiConfig {
                cpus: 1,
                extra_tables: vec![h]
            }),
            Err(AcpiError::TooLarge(_))
        ));
    }
}
