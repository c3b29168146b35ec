//! Legacy platform devices: serial console, IOAPIC, CMOS RTC, reset and power-off paths, and
//! the ACPI power button.
//!
//! Every device here is a [`crate::bus::BusDevice`]; the `vmm` crate inserts
//! it on the PIO or MMIO bus at the documented address:
//!
//! | Device | Bus | Base | Length |
//! | --- | --- | --- | --- |
//! | [`serial::Serial`] (COM1, IOAPIC pin 4) | PIO | [`serial::COM1_BASE`] | [`serial::SERIAL_PORT_LEN`] |
//! | [`ioapic::Ioapic`] | MMIO | [`ioapic::IOAPIC_BASE`] | [`ioapic::IOAPIC_SIZE`] |
//! | [`i8042::I8042`] | PIO | [`i8042::I8042_DATA_PORT`] and [`i8042::I8042_COMMAND_PORT`] | 1 each |
//! | [`rtc::Rtc`] (MC146818, no IRQ) | PIO | [`rtc::RTC_PORT`] | [`rtc::RTC_PORT_LEN`] |
//! | [`exit_port::ExitPort`] | PIO | [`exit_port::EXIT_PORT`] | [`exit_port::EXIT_PORT_LEN`] |
//! | [`acpi_pm::AcpiSleepRegs`] | PIO | [`acpi_pm::SLEEP_CONTROL_PORT`] | [`acpi_pm::SLEEP_REGS_LEN`] |
//! | [`ged::Ged`] (power button, IOAPIC pin 9) | PIO | [`ged::GED_EVENT_PORT`] | [`ged::GED_EVENT_LEN`] |
//!
//! Interrupt-raising devices talk to an [`IrqLine`]; [`ioapic::IoapicPin`] is
//! the implementation that feeds an IOAPIC input pin.

pub mod acpi_pm;
pub mod exit_port;
pub mod ged;
pub mod i8042;
pub mod ioapic;
pub mod rtc;
pub mod serial;

/// One interrupt request line driven by a device.
///
/// The line is level-based: a device calls `set_level(true)` while it has an
/// interrupt pending and `set_level(false)` once the condition is gone. It
/// only calls when the level changes. `high` is the logical assertion; the
/// receiver ignores electrical polarity. An edge-triggered receiver (such as
/// an IOAPIC pin programmed for edge) fires on every low-to-high change, so a
/// device re-raises an interrupt by dropping and raising the line.
///
/// Implementations must not call back into the device that drives them: the
/// device usually holds its own lock while calling `set_level`.
pub trait IrqLine: Send + Sync {
    /// Sets the line's logical level.
    fn set_level(&self, high: bool);
}
