//! The debug exit port of the test guests.
//!
//! A guest ends the run by writing its exit code (1 to 4 bytes, little
//! endian, zero-extended to `u32`) to [`EXIT_PORT`]; the device records the
//! code and signals the exit [`EventFd`]. Reads return ones.

use std::sync::Mutex;

use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::warn_limited;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Most log lines per second about what the guest does wrong here (it can do it in a loop).
static LOG_BUDGET: Mutex<RateLimit> = Mutex::new(RateLimit::per_second(10));

/// I/O port of the exit device.
pub const EXIT_PORT: u64 = 0xF4;
/// Number of ports the exit device claims (one 32-bit port).
pub const EXIT_PORT_LEN: u64 = 4;

/// The exit device.
#[derive(Debug)]
pub struct ExitPort {
    exit_evt: EventFd,
    exit_code: Option<u32>,
}

impl ExitPort {
    /// Creates the device; `exit_evt` is written when the guest exits.
    pub fn new(exit_evt: EventFd) -> Self {
        Self {
            exit_evt,
            exit_code: None,
        }
    }

    /// The code of the guest's last exit write, if any.
    pub fn exit_code(&self) -> Option<u32> {
        self.exit_code
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            warn_limited!(
                lock(&LOG_BUDGET),
                "exit port: ignoring {}-byte write at offset {offset}: write 1 to 4 bytes at the port base",
                data.len()
            );
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        let code = u32::from_le_bytes(bytes);
        self.exit_code = Some(code);
        log::info!("exit port: guest exited with code {code:#x}");
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("exit port: cannot signal the exit eventfd: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn device() -> (ExitPort, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (ExitPort::new(evt.try_clone().unwrap()), evt)
    }

    #[test]
    fn write_records_code_and_signals_exit() {
        let (mut dev, evt) = device();
        assert_eq!(dev.exit_code(), None);
        assert!(evt.read().is_err(), "nothing signalled yet");
        dev.write(EXIT_PORT, 0, &0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(dev.exit_code(), Some(0xDEAD_BEEF));
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn narrow_writes_are_zero_extended() {
        let (mut dev, evt) = device();
        dev.write(EXIT_PORT, 0, &[0x2A]);
        assert_eq!(dev.exit_code(), Some(0x2A));
        dev.write(EXIT_PORT, 0, &[0x34, 0x12]);
        assert_eq!(dev.exit_code(), Some(0x1234));
        assert_eq!(evt.read().unwrap(), 2);
    }

    #[test]
    fn malformed_writes_are_ignored() {
        let (mut dev, evt) = device();
        dev.write(EXIT_PORT, 1, &[1]);
        dev.write(EXIT_PORT, 0, &[1, 2, 3, 4, 5]);
        dev.write(EXIT_PORT, 0, &[]);
        assert_eq!(dev.exit_code(), None);
        assert!(evt.read().is_err());
        let mut b = [0u8; 2];
        dev.read(EXIT_PORT, 0, &mut b);
        assert_eq!(b, [0xFF, 0xFF]);
    }
}
