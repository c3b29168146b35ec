//! The i8042 keyboard controller as far as the guest's reset path needs it, on rust-vmm's
//! `vm_superio::I8042Device`.
//!
//! Linux's `reboot=k` (also its fallback after ACPI) waits until the status register at
//! [`I8042_COMMAND_PORT`] shows an empty input buffer (bit 1 clear), then writes
//! [`I8042_CMD_RESET`] there; the controller signals the reset [`EventFd`]. The status and data
//! registers read 0 (nothing to read, ready for input). There is no keyboard behind it and it
//! raises no interrupts; the FADT tells Linux that no 8042 exists, so its i8042 driver does not
//! probe it (`vmm::arch::x86_64::acpi`).
//!
//! The vmm may insert one device over `0x60..=0x64`: it tells the two ports apart by
//! `base + offset`, and the ports between them read as ones (no device).

use std::io;

use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Data port (read output buffer, write keyboard data / command argument).
pub const I8042_DATA_PORT: u64 = 0x60;
/// Status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// Controller command that pulses the CPU reset line.
pub const I8042_CMD_RESET: u8 = 0xFE;

/// The reset [`EventFd`] as the [`Trigger`] vm-superio signals.
#[derive(Debug)]
struct ResetTrigger(EventFd);

impl Trigger for ResetTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        log::info!("i8042: guest requested a CPU reset");
        self.0.write(1)
    }
}

/// The i8042 controller on the PIO bus.
#[derive(Debug)]
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Creates the controller; `reset_evt` is written on a CPU reset request.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            device: I8042Device::new(ResetTrigger(reset_evt)),
        }
    }
}

/// The vm-superio register offset of `port` (data 0, command/status 4), if it is one.
fn register(base: u64, offset: u64) -> Option<u8> {
    match base.checked_add(offset)? {
        port @ (I8042_DATA_PORT | I8042_COMMAND_PORT) => u8::try_from(port - I8042_DATA_PORT).ok(),
        _ => None,
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if let (Some(reg), Some(first)) = (register(base, offset), data.first_mut()) {
            *first = self.device.read(reg);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let (Some(reg), Some(&value)) = (register(base, offset), data.first()) else {
            log::debug!("i8042: ignoring write at {base:#x}+{offset:#x}");
            return;
        };
        if let Err(e) = self.device.write(reg, value) {
            log::error!("i8042: cannot signal the reset eventfd: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device() -> (I8042, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    /// As the vmm inserts it: one range from the data port over the command port.
    fn inb(dev: &mut I8042, port: u64) -> u8 {
        let mut b = [0u8];
        dev.read(I8042_DATA_PORT, port - I8042_DATA_PORT, &mut b);
        b[0]
    }

    fn outb(dev: &mut I8042, port: u64, value: u8) {
        dev.write(I8042_DATA_PORT, port - I8042_DATA_PORT, &[value]);
    }

    #[test]
    fn linux_reboot_k_waits_for_an_empty_input_buffer_then_resets() {
        let (mut dev, evt) = device();
        assert!(evt.read().is_err());
        // kb_wait: status bit 1 (input buffer full) must read clear.
        assert_eq!(inb(&mut dev, I8042_COMMAND_PORT) & 0x02, 0);
        outb(&mut dev, I8042_COMMAND_PORT, I8042_CMD_RESET);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn other_commands_ports_and_data_writes_do_not_reset() {
        let (mut dev, evt) = device();
        for cmd in [0x20, 0x60, 0xAA, 0xAD, 0xD1, 0xFF] {
            outb(&mut dev, I8042_COMMAND_PORT, cmd);
        }
        outb(&mut dev, I8042_DATA_PORT, I8042_CMD_RESET);
        dev.write(I8042_DATA_PORT, 2, &[I8042_CMD_RESET]);
        dev.write(I8042_COMMAND_PORT, 0, &[]);
        assert!(evt.read().is_err());
    }

    #[test]
    fn registers_read_zero_and_the_ports_between_read_ones() {
        let (mut dev, _) = device();
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), 0);
        assert_eq!(inb(&mut dev, I8042_COMMAND_PORT), 0);
        for port in 0x61..0x64 {
            assert_eq!(inb(&mut dev, port), 0xFF, "port {port:#x}");
        }
        let mut b = [0u8; 2];
        dev.read(I8042_COMMAND_PORT, 0, &mut b);
        assert_eq!(b, [0, 0xFF]);
    }

    #[test]
    fn a_command_port_inserted_on_its_own_still_resets() {
        let (mut dev, evt) = device();
        dev.write(I8042_COMMAND_PORT, 0, &[I8042_CMD_RESET]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
