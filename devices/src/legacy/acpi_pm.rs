//! ACPI hardware-reduced sleep registers (FADT SLEEP_CONTROL_REG and
//! SLEEP_STATUS_REG): the guest's power-off path.
//!
//! Both are 1-byte registers in I/O space. The FADT must describe them as
//! generic addresses in SystemIO space, 8 bits wide, byte access, at
//! [`SLEEP_CONTROL_PORT`] and [`SLEEP_STATUS_PORT`], and the DSDT must declare
//! `Name (_S5, Package () { S5_SLEEP_TYPE, 0, 0, 0 })` so the guest writes
//! `(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN` on power-off. That write
//! signals the exit [`EventFd`]; other sleep types are logged and ignored.

use std::sync::Mutex;

use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::warn_limited;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Most log lines per second about what the guest does wrong here (it can do it in a loop).
static LOG_BUDGET: Mutex<RateLimit> = Mutex::new(RateLimit::per_second(10));

/// I/O port of SLEEP_CONTROL_REG.
pub const SLEEP_CONTROL_PORT: u64 = 0x3C0;
/// I/O port of SLEEP_STATUS_REG.
pub const SLEEP_STATUS_PORT: u64 = 0x3C1;
/// Number of ports the device claims, starting at [`SLEEP_CONTROL_PORT`].
pub const SLEEP_REGS_LEN: u64 = 2;
/// Width of each register in bits (for the FADT generic address).
pub const SLEEP_REG_BIT_WIDTH: u8 = 8;
/// SLEEP_CONTROL_REG: SLP_EN, starts the transition.
pub const SLP_EN: u8 = 1 << 5;
/// SLEEP_CONTROL_REG: position of the 3-bit SLP_TYP field.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLEEP_CONTROL_REG: mask of the SLP_TYP field (in place).
pub const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
/// The SLP_TYP value of S5 (soft off); the DSDT's `_S5` package holds it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLEEP_STATUS_REG: WAK_STS, write 1 to clear. Never set: the guest never
/// wakes from a sleep state.
pub const WAK_STS: u8 = 1 << 7;

/// The sleep control/status register pair.
#[derive(Debug)]
pub struct AcpiSleepRegs {
    exit_evt: EventFd,
    powered_off: bool,
}

impl AcpiSleepRegs {
    /// Creates the registers; `exit_evt` is written on an S5 request.
    pub fn new(exit_evt: EventFd) -> Self {
        Self {
            exit_evt,
            powered_off: false,
        }
    }

    /// Whether the guest has requested S5.
    pub fn powered_off(&self) -> bool {
        self.powered_off
    }

    fn write_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if sleep_type != S5_SLEEP_TYPE {
            warn_limited!(
                lock(&LOG_BUDGET),
                "acpi: ignoring sleep request of type {sleep_type}: only S5 (type {S5_SLEEP_TYPE}, power off) is supported"
            );
            return;
        }
        log::info!("acpi: guest requested S5, powering off");
        self.powered_off = true;
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("acpi: cannot signal the exit eventfd: {e}");
        }
    }
}

impl BusDevice for AcpiSleepRegs {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Control reads as 0 (SLP_EN is write-only); status has no wake event.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // A 2-byte write covers both registers; only the control byte matters.
        // Status: writing WAK_STS clears nothing that is ever set.
        if let (0, Some(value)) = (offset, data.first()) {
            self.write_control(*value);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device() -> (AcpiSleepRegs, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (AcpiSleepRegs::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn s5_with_slp_en_signals_power_off() {
        let (mut dev, evt) = device();
        dev.write(
            SLEEP_CONTROL_PORT,
            0,
            &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN],
        );
        assert!(dev.powered_off());
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn linux_hw_reduced_sleep_value_is_0x34() {
        // acpi_hw_extended_sleep(): (SLP_TYP << 2) & 0x1C | 0x20.
        assert_eq!((S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN, 0x34);
        assert_eq!(SLP_TYP_MASK, 0x1C);
    }

    #[test]
    fn other_sleep_types_and_missing_slp_en_are_ignored() {
        let (mut dev, evt) = device();
        dev.write(SLEEP_CONTROL_PORT, 0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        dev.write(SLEEP_CONTROL_PORT, 0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        dev.write(
            SLEEP_CONTROL_PORT,
            1,
            &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN],
        );
        assert!(!dev.powered_off());
        assert!(evt.read().is_err());
    }

    #[test]
    fn status_register_reads_clear_and_accepts_wak_sts_writes() {
        let (mut dev, evt) = device();
        dev.write(SLEEP_CONTROL_PORT, 1, &[WAK_STS]);
        let mut b = [0xAAu8];
        dev.read(SLEEP_CONTROL_PORT, 1, &mut b);
        assert_eq!(b, [0]);
        assert!(evt.read().is_err());
    }
}
