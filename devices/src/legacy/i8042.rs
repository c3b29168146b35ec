//! A minimal i8042 keyboard controller: just enough for the guest's reset
//! path (`reboot=k`: command 0xFE on port 0x64) and harmless probing.
//!
//! Insert the same device at [`I8042_DATA_PORT`] and [`I8042_COMMAND_PORT`]
//! (1 port each); it tells them apart by `base + offset`. There is no
//! keyboard behind it and it raises no interrupts. A CPU reset request
//! (0xFE, any other pulse command that pulses output line 0, or a write to
//! the output port that clears the reset line) signals the reset [`EventFd`].

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Data port (read output buffer, write keyboard data / command argument).
pub const I8042_DATA_PORT: u64 = 0x60;
/// Status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// Controller command that pulses the CPU reset line.
pub const I8042_CMD_RESET: u8 = 0xFE;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;

// Controller commands.
const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xA7;
const CMD_ENABLE_AUX: u8 = 0xA8;
const CMD_TEST_AUX: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_TEST_KBD: u8 = 0xAB;
const CMD_DISABLE_KBD: u8 = 0xAD;
const CMD_ENABLE_KBD: u8 = 0xAE;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xD2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xD3;
const CMD_WRITE_AUX: u8 = 0xD4;
const CMD_PULSE_FIRST: u8 = 0xF0;

// Configuration byte bits.
const CONFIG_SYSTEM_FLAG: u8 = 0x04;
const CONFIG_KBD_DISABLED: u8 = 0x10;
const CONFIG_AUX_DISABLED: u8 = 0x20;
const DEFAULT_CONFIG: u8 = 0x45;

/// Output port bit 0: the CPU reset line (active low).
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;
const DEFAULT_OUTPUT_PORT: u8 = 0x03; // reset line high, A20 enabled

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
const KBD_ACK: u8 = 0xFA;
const KBD_RESET_OK: u8 = 0xAA;
const KBD_CMD_RESET: u8 = 0xFF;
const KBD_CMD_ECHO: u8 = 0xEE;
const OUTPUT_CAPACITY: usize = 16;

/// A command waiting for its argument on the data port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Config,
    OutputPort,
    EchoToOutput,
    Aux,
}

/// The i8042 controller.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
    output: VecDeque<u8>,
    config: u8,
    output_port: u8,
    pending: Option<Pending>,
    last_was_command: bool,
    reset_requested: bool,
}

impl I8042 {
    /// Creates the controller; `reset_evt` is written on a CPU reset request.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
            config: DEFAULT_CONFIG,
            output_port: DEFAULT_OUTPUT_PORT,
            pending: None,
            last_was_command: false,
            reset_requested: false,
        }
    }

    /// Whether the guest has requested a CPU reset.
    pub fn reset_requested(&self) -> bool {
        self.reset_requested
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn reset_cpu(&mut self) {
        log::info!("i8042: guest requested a CPU reset");
        self.reset_requested = true;
        if let Err(e) = self.reset_evt.write(1) {
            log::error!("i8042: cannot signal the reset eventfd: {e}");
        }
    }

    fn status(&self) -> u8 {
        let mut status = 0;
        if self.config & CONFIG_SYSTEM_FLAG != 0 {
            status |= STATUS_SYSTEM_FLAG;
        }
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            CMD_READ_CONFIG => self.push_output(self.config),
            CMD_WRITE_CONFIG => self.pending = Some(Pending::Config),
            CMD_DISABLE_AUX => self.config |= CONFIG_AUX_DISABLED,
            CMD_ENABLE_AUX => self.config &= !CONFIG_AUX_DISABLED,
            CMD_TEST_AUX | CMD_TEST_KBD => self.push_output(PORT_TEST_OK),
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_DISABLE_KBD => self.config |= CONFIG_KBD_DISABLED,
            CMD_ENABLE_KBD => self.config &= !CONFIG_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push_output(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.pending = Some(Pending::OutputPort),
            CMD_WRITE_KBD_BUFFER | CMD_WRITE_AUX_BUFFER => {
                self.pending = Some(Pending::EchoToOutput);
            }
            CMD_WRITE_AUX => self.pending = Some(Pending::Aux),
            // Pulse output lines: a clear bit 0 pulses the reset line (0xFE).
            CMD_PULSE_FIRST..=0xFF if cmd & OUTPUT_PORT_RESET_LINE == 0 => self.reset_cpu(),
            _ => log::debug!("i8042: ignoring command {cmd:#04x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(Pending::Config) => self.config = value,
            Some(Pending::OutputPort) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_LINE == 0 {
                    self.reset_cpu();
                }
            }
            Some(Pending::EchoToOutput) => self.push_output(value),
            Some(Pending::Aux) => {} // No mouse.
            None => self.keyboard_command(value),
        }
    }

    /// Answers a byte sent to the (absent) keyboard like a present one would.
    fn keyboard_command(&mut self, value: u8) {
        match value {
            KBD_CMD_ECHO => self.push_output(KBD_CMD_ECHO),
            KBD_CMD_RESET => {
                self.push_output(KBD_ACK);
                self.push_output(KBD_RESET_OK);
            }
            _ => self.push_output(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let value = match base.checked_add(offset) {
            Some(I8042_DATA_PORT) => self.output.pop_front().unwrap_or(0),
            Some(I8042_COMMAND_PORT) => self.status(),
            _ => 0xFF,
        };
        data.fill(0xFF);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match base.checked_add(offset) {
            Some(I8042_DATA_PORT) => {
                self.last_was_command = false;
                self.data(value);
            }
            Some(I8042_COMMAND_PORT) => {
                self.last_was_command = true;
                self.command(value);
            }
            _ => log::debug!("i8042: ignoring write at {base:#x}+{offset:#x}"),
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

    fn inb(dev: &mut I8042, port: u64) -> u8 {
        let mut b = [0u8];
        dev.read(port, 0, &mut b);
        b[0]
    }

    fn outb(dev: &mut I8042, port: u64, value: u8) {
        dev.write(port, 0, &[value]);
    }

    #[test]
    fn reset_command_signals_reset_event() {
        let (mut dev, evt) = device();
        assert!(evt.read().is_err());
        outb(&mut dev, I8042_COMMAND_PORT, I8042_CMD_RESET);
        assert!(dev.reset_requested());
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn clearing_reset_line_through_output_port_resets() {
        let (mut dev, evt) = device();
        outb(&mut dev, I8042_COMMAND_PORT, CMD_READ_OUTPUT_PORT);
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), DEFAULT_OUTPUT_PORT);
        outb(&mut dev, I8042_COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        outb(&mut dev, I8042_DATA_PORT, 0x03);
        assert!(evt.read().is_err(), "reset line kept high");
        outb(&mut dev, I8042_COMMAND_PORT, CMD_WRITE_OUTPUT_PORT);
        outb(&mut dev, I8042_DATA_PORT, 0x02);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn status_reports_output_buffer_and_system_flag() {
        let (mut dev, evt) = device();
        assert_eq!(inb(&mut dev, I8042_COMMAND_PORT), STATUS_SYSTEM_FLAG);
        outb(&mut dev, I8042_COMMAND_PORT, CMD_SELF_TEST);
        let status = inb(&mut dev, I8042_COMMAND_PORT);
        assert_eq!(status & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(status & STATUS_LAST_WAS_COMMAND, STATUS_LAST_WAS_COMMAND);
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), SELF_TEST_OK);
        assert_eq!(inb(&mut dev, I8042_COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert!(evt.read().is_err());
    }

    #[test]
    fn config_byte_round_trips_and_other_commands_are_harmless() {
        let (mut dev, evt) = device();
        outb(&mut dev, I8042_COMMAND_PORT, CMD_WRITE_CONFIG);
        outb(&mut dev, I8042_DATA_PORT, 0x61);
        outb(&mut dev, I8042_COMMAND_PORT, CMD_READ_CONFIG);
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), 0x61);
        for cmd in [0x00, CMD_DISABLE_KBD, CMD_ENABLE_AUX, 0xC0, 0xFF, 0xF1] {
            outb(&mut dev, I8042_COMMAND_PORT, cmd);
        }
        outb(&mut dev, I8042_DATA_PORT, KBD_CMD_RESET);
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), KBD_ACK);
        assert_eq!(inb(&mut dev, I8042_DATA_PORT), KBD_RESET_OK);
        assert!(!dev.reset_requested());
        assert!(evt.read().is_err());
    }

    #[test]
    fn output_buffer_is_bounded_and_unknown_ports_read_ones() {
        let (mut dev, _) = device();
        for _ in 0..100 {
            outb(&mut dev, I8042_DATA_PORT, 0x12);
        }
        assert_eq!(dev.output.len(), OUTPUT_CAPACITY);
        let mut b = [0u8; 2];
        dev.read(I8042_DATA_PORT, 1, &mut b);
        assert_eq!(b, [0xFF, 0xFF]);
    }
}
