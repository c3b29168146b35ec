//! The ACPI Generic Event Device (GED, `ACPI0013`) behind the power button: how a
//! hardware-reduced machine (no fixed power button, no SCI) tells the guest's ACPI code about a
//! platform event.
//!
//! One 1-byte event register in I/O space at [`GED_EVENT_PORT`] and one interrupt line
//! ([`GED_IRQ`], an IOAPIC pin described to the guest as level-triggered, active-high). An event
//! ([`Ged::press_power_button`]) sets its bit ([`GED_EVENT_POWER_BUTTON`]) and raises the line;
//! the guest's GED driver runs the DSDT's `_EVT` method, which reads the register and, for the
//! power-button bit, does `Notify (\_SB.PWRB, 0x80)` on the `PNP0C0C` device (the tables are in
//! `vmm::arch::x86_64::acpi`). The read returns the pending events, clears them and lowers the
//! line. Linux runs `_EVT` from a threaded handler with the pin masked, so the line being high
//! until then does not storm; a level pin still high when unmasked fires again.
//!
//! Writes are ignored: the register is read-to-clear.

use std::sync::{Arc, Mutex};

use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::warn_limited;

use crate::bus::BusDevice;
use crate::legacy::IrqLine;

/// Most log lines per second about what the guest does wrong here (it can do it in a loop).
static LOG_BUDGET: Mutex<RateLimit> = Mutex::new(RateLimit::per_second(10));

/// I/O port of the event register (after the ACPI sleep registers at 0x3C0 and 0x3C1).
pub const GED_EVENT_PORT: u64 = 0x3C2;
/// Number of ports the device claims.
pub const GED_EVENT_LEN: u64 = 1;
/// The IOAPIC pin (GSI) the device raises. Pin 9 is the SCI's on PCs; a hardware-reduced
/// machine has no SCI, so the pin is free.
pub const GED_IRQ: u32 = 9;
/// Event register bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// The Generic Event Device.
pub struct Ged {
    line: Arc<dyn IrqLine>,
    pending: u8,
    presses: u64,
    reads: u64,
}

impl std::fmt::Debug for Ged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ged")
            .field("pending", &self.pending)
            .field("presses", &self.presses)
            .field("reads", &self.reads)
            .finish_non_exhaustive()
    }
}

impl Ged {
    /// A device that raises `line` while an event is pending.
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Ged {
            line,
            pending: 0,
            presses: 0,
            reads: 0,
        }
    }

    /// Presses the power button: sets its event bit and raises the line (once: a second press
    /// before the guest read the register is the same pending event).
    pub fn press_power_button(&mut self) {
        self.presses += 1;
        let was = self.pending;
        self.pending |= GED_EVENT_POWER_BUTTON;
        if was == 0 {
            self.line.set_level(true);
        }
    }

    /// Events set and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.pending
    }

    /// Power-button presses so far.
    pub fn presses(&self) -> u64 {
        self.presses
    }

    /// Guest reads of the event register that found an event (the guest's `_EVT` ran).
    pub fn event_reads(&self) -> u64 {
        self.reads
    }

    fn take_events(&mut self) -> u8 {
        let events = std::mem::take(&mut self.pending);
        if events != 0 {
            self.reads += 1;
            self.line.set_level(false);
        }
        events
    }
}

impl BusDevice for Ged {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset != 0 || data.is_empty() {
            warn_limited!(
                lock(&LOG_BUDGET),
                "ged: ignoring a {}-byte read at offset {offset}: read 1 byte at the port",
                data.len()
            );
            return;
        }
        data[0] = self.take_events();
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        warn_limited!(
            lock(&LOG_BUDGET),
            "ged: ignoring a {}-byte write at offset {offset}: the event register is read-only",
            data.len()
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Records every level change.
    #[derive(Default)]
    struct Line(Mutex<Vec<bool>>);
    impl IrqLine for Line {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    fn device() -> (Ged, Arc<Line>) {
        let line = Arc::new(Line::default());
        (Ged::new(line.clone()), line)
    }

    fn read(dev: &mut Ged) -> u8 {
        let mut b = [0xAA];
        dev.read(GED_EVENT_PORT, 0, &mut b);
        b[0]
    }

    #[test]
    fn a_press_raises_the_line_until_the_guest_reads_the_event() {
        let (mut dev, line) = device();
        assert_eq!(read(&mut dev), 0, "nothing pending");
        assert!(line.0.lock().unwrap().is_empty(), "no event, no edge");
        dev.press_power_button();
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        assert_eq!(dev.pending(), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        assert_eq!(read(&mut dev), 0, "read-to-clear");
        assert_eq!((dev.presses(), dev.event_reads()), (1, 1));
    }

    #[test]
    fn a_second_press_before_the_read_is_the_same_event() {
        let (mut dev, line) = device();
        dev.press_power_button();
        dev.press_power_button();
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
        dev.press_power_button();
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true]);
        assert_eq!(dev.presses(), 3);
    }

    /// Counts the MSIs the IOAPIC sends.
    #[derive(Default)]
    struct Msis(Mutex<u32>);
    impl crate::interrupt::MsiSink for Msis {
        fn signal_msi(&self, _: crate::interrupt::MsiMessage) -> std::io::Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }

    #[test]
    fn on_a_level_pin_the_event_fires_until_read_and_eoied() {
        use crate::legacy::ioapic::{Ioapic, IoapicPin};
        let msis = Arc::new(Msis::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(msis.clone())));
        let pin = IoapicPin::new(ioapic.clone(), GED_IRQ as usize).unwrap();
        let mut dev = Ged::new(Arc::new(pin));
        let program = |entry: u32| {
            let mut io = ioapic.lock().unwrap();
            io.write(0, 0, &(0x10 + 2 * GED_IRQ).to_le_bytes());
            io.write(0, 0x10, &entry.to_le_bytes());
        };
        let sent = || *msis.0.lock().unwrap();
        // Masked (as at reset, before the guest's GED driver binds): nothing is delivered...
        dev.press_power_button();
        assert_eq!(sent(), 0);
        // ...until the driver unmasks the pin: level-triggered (bit 15), vector 0x30.
        program((1 << 15) | 0x30);
        assert_eq!(sent(), 1);
        // Still asserted at the EOI (the guest has not read the register): fires again.
        ioapic.lock().unwrap().end_of_interrupt(0x30);
        assert_eq!(sent(), 2);
        // _EVT reads the event: the line drops, and the next EOI fires nothing.
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
        ioapic.lock().unwrap().end_of_interrupt(0x30);
        assert_eq!(sent(), 2);
    }

    #[test]
    fn writes_and_odd_reads_change_nothing() {
        let (mut dev, line) = device();
        dev.press_power_button();
        dev.write(GED_EVENT_PORT, 0, &[0xFF]);
        let mut wide = [0xAAu8; 2];
        dev.read(GED_EVENT_PORT, 1, &mut wide);
        assert_eq!(wide, [0, 0]);
        assert_eq!(dev.pending(), GED_EVENT_POWER_BUTTON, "still pending");
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
    }
}
