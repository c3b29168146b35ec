//! A userspace IOAPIC (82093AA-style, 24 pins) for KVM's split irqchip.
//!
//! The guest programs it through the indirect IOREGSEL/IOWIN window at
//! [`IOAPIC_BASE`]. Pin assertions become MSI messages (x86 compatibility
//! format) sent through an [`MsiSink`]; the local APICs live in KVM.
//!
//! Level-triggered pins follow the remote-IRR protocol: delivery sets
//! remote IRR, which blocks further deliveries until the guest's EOI for the
//! vector reaches [`Ioapic::end_of_interrupt`] (KVM_EXIT_IOAPIC_EOI); a pin
//! that is still asserted then fires again.
//!
//! KVM only exits on the EOI of a vector it knows belongs to a level-triggered
//! IOAPIC route: it scans the MSI routes of GSIs `0..n` (n = the pin count
//! given to KVM_CAP_SPLIT_IRQCHIP) for level-triggered messages. The `vmm`
//! must therefore mirror pin `p`'s message ([`Ioapic::mirrored_route`]) into GSI
//! `p` with KVM_SET_GSI_ROUTING whenever it changes; a listener installed with
//! [`Ioapic::set_route_listener`] is told about every change.
//! [`Ioapic::eoi_vectors`] lists the vectors that need the EOI exit. A masked
//! pin stays mirrored while its remote IRR is set: a real IOAPIC sees the EOI
//! broadcast whatever the mask, and Linux masks a one-shot threaded interrupt
//! (the ACPI GED's) before it EOIs it, then waits for remote IRR to clear
//! before it frees the interrupt.
//!
//! Remappable-format entries (VT-d interrupt remapping, bit 48 set) become
//! remappable-format MSI addresses (see [`redirection_to_msi`]); whoever
//! implements the [`MsiSink`] must translate those through the vIOMMU's
//! interrupt remapping table before injecting them.

use std::sync::{Arc, Mutex};

use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::warn_limited;
use thiserror::Error;

use crate::bus::BusDevice;
use crate::interrupt::{MsiMessage, MsiSink};
use crate::legacy::IrqLine;

/// Most log lines per second about what the guest does wrong here (it can do it in a loop).
static LOG_BUDGET: Mutex<RateLimit> = Mutex::new(RateLimit::per_second(10));

/// Guest physical base of the IOAPIC's MMIO window.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the IOAPIC's MMIO window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of input pins (redirection entries).
pub const IOAPIC_NUM_PINS: usize = 24;
/// Base address of x86 compatibility-format MSI messages.
pub const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;

const IOAPIC_VERSION: u32 = 0x11;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;
const ID_SHIFT: u32 = 24;
const ID_MASK: u32 = 0x0F;

// Redirection entry fields.
const VECTOR_MASK: u64 = 0xFF;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u64 = 0x7;
const DEST_MODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// Bits 63:48: the 8-bit destination (63:56) plus, when non-zero, the
/// extended destination ID (55:49) or the interrupt-remapping index and
/// format bit (63:48).
const DEST_FIELD_SHIFT: u32 = 48;
const DEST_FIELD_MASK: u64 = 0xFFFF;
/// Bits the guest may write: vector, delivery/destination mode, polarity,
/// trigger mode, mask and bits 63:48.
const WRITABLE_BITS: u64 = 0xFFFF_0000_0001_AFFF;
const READ_ONLY_BITS: u64 = DELIVERY_STATUS | REMOTE_IRR;

// MSI message fields.
const MSI_DEST_FIELD_SHIFT: u32 = 4;
const MSI_ADDR_DEST_LOGICAL: u64 = 1 << 2;
const MSI_DATA_DELIVERY_SHIFT: u32 = 8;
const MSI_DATA_LEVEL_ASSERT: u32 = 1 << 14;
const MSI_DATA_TRIGGER_LEVEL: u32 = 1 << 15;

/// Errors of the IOAPIC's host-side API.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IoapicError {
    /// A pin number outside `0..IOAPIC_NUM_PINS`.
    #[error("IOAPIC pin {0} does not exist: valid pins are 0 to 23")]
    InvalidPin(usize),
}

/// Called with `(pin, message)` whenever a pin's MSI route changes; `None`
/// means the pin is masked.
pub type RouteListener = Box<dyn FnMut(usize, Option<MsiMessage>) + Send>;

/// Composes the MSI message a redirection entry delivers.
///
/// Bits 63:48 of the entry land in address bits 19:4 and bit 11
/// (destination mode) in address bit 2. For a compatibility-format entry
/// this is the usual `destination << 12` (plus KVM's extended destination
/// ID, entry bits 55:49, in address bits 11:5). For a remappable-format
/// entry (bit 48 set, VT-d interrupt remapping) it is the remappable MSI
/// address: `handle[14:0]` in bits 19:5, format in bit 4, `handle[15]` in bit 2.
pub fn redirection_to_msi(entry: u64) -> MsiMessage {
    let dest_field = (entry >> DEST_FIELD_SHIFT) & DEST_FIELD_MASK;
    let mut address = MSI_ADDRESS_BASE | (dest_field << MSI_DEST_FIELD_SHIFT);
    if entry & DEST_MODE_LOGICAL != 0 {
        address |= MSI_ADDR_DEST_LOGICAL;
    }
    let vector = (entry & VECTOR_MASK) as u32;
    let delivery = ((entry >> DELIVERY_MODE_SHIFT) & DELIVERY_MODE_MASK) as u32;
    let mut data = vector | (delivery << MSI_DATA_DELIVERY_SHIFT);
    if entry & TRIGGER_LEVEL != 0 {
        data |= MSI_DATA_TRIGGER_LEVEL | MSI_DATA_LEVEL_ASSERT;
    }
    MsiMessage { address, data }
}

/// The IOAPIC model.
pub struct Ioapic {
    id: u32,
    ioregsel: u8,
    redirection: [u64; IOAPIC_NUM_PINS],
    asserted: [bool; IOAPIC_NUM_PINS],
    msi: Arc<dyn MsiSink>,
    route_listener: Option<RouteListener>,
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("id", &self.id)
            .field("ioregsel", &self.ioregsel)
            .field("redirection", &self.redirection)
            .field("asserted", &self.asserted)
            .finish()
    }
}

impl Ioapic {
    /// Creates an IOAPIC with every pin masked, delivering through `msi`.
    pub fn new(msi: Arc<dyn MsiSink>) -> Self {
        Self {
            id: 0,
            ioregsel: 0,
            redirection: [MASKED; IOAPIC_NUM_PINS],
            asserted: [false; IOAPIC_NUM_PINS],
            msi,
            route_listener: None,
        }
    }

    /// Installs the listener told about every route change. It runs with the
    /// IOAPIC locked and must not call back into it.
    pub fn set_route_listener(&mut self, listener: RouteListener) {
        self.route_listener = Some(listener);
    }

    /// The redirection entry of `pin` (as the guest reads it).
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// The MSI message `pin` delivers, or `None` when masked or out of range.
    pub fn msi_route(&self, pin: usize) -> Option<MsiMessage> {
        let entry = *self.redirection.get(pin)?;
        (entry & MASKED == 0).then(|| redirection_to_msi(entry))
    }

    /// The message KVM must know in GSI `pin` (what the route listener is told): the pin's
    /// MSI while unmasked, and also while masked with remote IRR set (a level interrupt in
    /// service, whose EOI must still reach [`Ioapic::end_of_interrupt`]); `None` otherwise.
    pub fn mirrored_route(&self, pin: usize) -> Option<MsiMessage> {
        let entry = *self.redirection.get(pin)?;
        let in_service = entry & (TRIGGER_LEVEL | REMOTE_IRR) == TRIGGER_LEVEL | REMOTE_IRR;
        (entry & MASKED == 0 || in_service).then(|| redirection_to_msi(entry))
    }

    /// Vectors of level-triggered pins that are unmasked or in service (remote IRR set),
    /// sorted and without duplicates: the EOIs KVM must report with KVM_EXIT_IOAPIC_EOI.
    pub fn eoi_vectors(&self) -> Vec<u8> {
        let mut vectors: Vec<u8> = (0..IOAPIC_NUM_PINS)
            .filter(|&pin| self.redirection[pin] & TRIGGER_LEVEL != 0)
            .filter(|&pin| self.mirrored_route(pin).is_some())
            .map(|pin| (self.redirection[pin] & VECTOR_MASK) as u8)
            .collect();
        vectors.sort_unstable();
        vectors.dedup();
        vectors
    }

    /// Sets the logical input level of `pin`. Edge-triggered pins deliver on
    /// a rising edge, level-triggered pins whenever asserted and remote IRR
    /// is clear. Masked pins deliver nothing (a level pin still asserted
    /// when unmasked fires then).
    pub fn set_pin_level(&mut self, pin: usize, asserted: bool) -> Result<(), IoapicError> {
        let was = *self.asserted.get(pin).ok_or(IoapicError::InvalidPin(pin))?;
        self.asserted[pin] = asserted;
        let level = self.redirection[pin] & TRIGGER_LEVEL != 0;
        if asserted && (level || !was) {
            self.deliver(pin);
        }
        Ok(())
    }

    /// Handles the guest's EOI of `vector`: clears remote IRR of the
    /// level-triggered pins using it and re-delivers those still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..IOAPIC_NUM_PINS {
            let entry = self.redirection[pin];
            if entry & VECTOR_MASK != u64::from(vector) || entry & REMOTE_IRR == 0 {
                continue;
            }
            let old_route = self.mirrored_route(pin);
            self.redirection[pin] &= !REMOTE_IRR;
            // A masked pin is mirrored only until this EOI.
            self.route_changed(pin, old_route);
            if self.asserted[pin] {
                self.deliver(pin);
            }
        }
    }

    fn deliver(&mut self, pin: usize) {
        let entry = self.redirection[pin];
        let level = entry & TRIGGER_LEVEL != 0;
        if entry & MASKED != 0 || (level && entry & REMOTE_IRR != 0) {
            return;
        }
        match self.msi.signal_msi(redirection_to_msi(entry)) {
            Ok(()) if level => self.redirection[pin] |= REMOTE_IRR,
            Ok(()) => {}
            Err(e) => warn_limited!(
                lock(&LOG_BUDGET),
                "ioapic: delivering pin {pin} (entry {entry:#x}) failed: {e}"
            ),
        }
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARBITRATION => self.id << ID_SHIFT,
            REG_VERSION => IOAPIC_VERSION | (((IOAPIC_NUM_PINS - 1) as u32) << 16),
            sel => match Self::redirection_index(sel) {
                Some((pin, true)) => (self.redirection[pin] >> 32) as u32,
                Some((pin, false)) => self.redirection[pin] as u32,
                None => 0xFFFF_FFFF,
            },
        }
    }

    /// Maps an IOREGSEL value to `(pin, high dword)`.
    fn redirection_index(sel: u8) -> Option<(usize, bool)> {
        let index = usize::from(sel.checked_sub(REG_REDIRECTION)?);
        let pin = index / 2;
        (pin < IOAPIC_NUM_PINS).then_some((pin, index % 2 == 1))
    }

    fn write_register(&mut self, value: u32) {
        match self.ioregsel {
            REG_ID => self.id = (value >> ID_SHIFT) & ID_MASK,
            REG_VERSION | REG_ARBITRATION => {}
            sel => match Self::redirection_index(sel) {
                Some((pin, high)) => self.write_redirection(pin, high, value),
                None => log::debug!("ioapic: write to unknown register {sel:#x} ignored"),
            },
        }
    }

    fn write_redirection(&mut self, pin: usize, high: bool, value: u32) {
        let old = self.redirection[pin];
        let merged = if high {
            (old & 0xFFFF_FFFF) | (u64::from(value) << 32)
        } else {
            (old & !0xFFFF_FFFF) | u64::from(value)
        };
        let mut new = (merged & WRITABLE_BITS) | (old & READ_ONLY_BITS);
        if new & TRIGGER_LEVEL == 0 {
            new &= !REMOTE_IRR;
        }
        let old_route = self.mirrored_route(pin);
        self.redirection[pin] = new;
        self.route_changed(pin, old_route);
        if self.asserted[pin] && new & TRIGGER_LEVEL != 0 {
            self.deliver(pin);
        }
    }

    /// Tells the route listener about `pin`'s mirrored route if it is no longer `old`.
    fn route_changed(&mut self, pin: usize, old: Option<MsiMessage>) {
        let new = self.mirrored_route(pin);
        if old != new {
            if let Some(listener) = self.route_listener.as_mut() {
                listener(pin, new);
            }
        }
    }

    fn mmio_register(&self, register: u64) -> u32 {
        match register {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(),
            _ => 0xFFFF_FFFF,
        }
    }

    /// Splits an access into (register offset, byte within it) when it lies
    /// inside one 32-bit register.
    fn locate(offset: u64, len: usize) -> Option<(u64, usize)> {
        let byte = (offset & 3) as usize;
        (len > 0 && byte + len <= 4).then_some((offset & !3, byte))
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match Self::locate(offset, data.len()) {
            Some((register, byte)) => {
                let bytes = self.mmio_register(register).to_le_bytes();
                data.copy_from_slice(&bytes[byte..byte + data.len()]);
            }
            None => data.fill(0xFF),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some((register, byte)) = Self::locate(offset, data.len()) else {
            log::debug!("ioapic: ignoring {}-byte write at {offset:#x}", data.len());
            return;
        };
        let mut bytes = self.mmio_register(register).to_le_bytes();
        bytes[byte..byte + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        match register {
            IOREGSEL => self.ioregsel = value as u8,
            IOWIN => self.write_register(value),
            _ => log::debug!("ioapic: write to unknown offset {offset:#x} ignored"),
        }
    }
}

/// One IOAPIC input pin as an [`IrqLine`].
#[derive(Clone)]
pub struct IoapicPin {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

impl std::fmt::Debug for IoapicPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoapicPin").field("pin", &self.pin).finish()
    }
}

impl IoapicPin {
    /// Binds pin `pin` of `ioapic`.
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: usize) -> Result<Self, IoapicError> {
        if pin >= IOAPIC_NUM_PINS {
            return Err(IoapicError::InvalidPin(pin));
        }
        Ok(Self { ioapic, pin })
    }
}

impl IrqLine for IoapicPin {
    fn set_level(&self, high: bool) {
        let mut ioapic = lock(&self.ioapic);
        if let Err(e) = ioapic.set_pin_level(self.pin, high) {
            log::warn!("ioapic: {e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Default)]
    struct RecordingSink {
        sent: Mutex<Vec<MsiMessage>>,
        fail: std::sync::atomic::AtomicBool,
    }
    impl MsiSink for RecordingSink {
        fn signal_msi(&self, msg: MsiMessage) -> io::Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::Error::other("injected failure"));
            }
            self.sent.lock().unwrap().push(msg);
            Ok(())
        }
    }
    impl RecordingSink {
        fn take(&self) -> Vec<MsiMessage> {
            std::mem::take(&mut *self.sent.lock().unwrap())
        }
    }

    fn ioapic() -> (Ioapic, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (Ioapic::new(sink.clone()), sink)
    }

    fn write32(io: &mut Ioapic, offset: u64, value: u32) {
        io.write(IOAPIC_BASE, offset, &value.to_le_bytes());
    }

    fn read32(io: &mut Ioapic, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        io.read(IOAPIC_BASE, offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn reg_read(io: &mut Ioapic, sel: u32) -> u32 {
        write32(io, IOREGSEL, sel);
        read32(io, IOWIN)
    }

    fn reg_write(io: &mut Ioapic, sel: u32, value: u32) {
        write32(io, IOREGSEL, sel);
        write32(io, IOWIN, value);
    }

    fn program(io: &mut Ioapic, pin: u32, entry: u64) {
        reg_write(io, 0x10 + 2 * pin + 1, (entry >> 32) as u32);
        reg_write(io, 0x10 + 2 * pin, entry as u32);
    }

    #[test]
    fn id_version_and_arbitration_registers() {
        let (mut io, _) = ioapic();
        assert_eq!(reg_read(&mut io, 1), 0x0017_0011);
        reg_write(&mut io, 1, 0);
        assert_eq!(reg_read(&mut io, 1), 0x0017_0011, "version is read-only");
        reg_write(&mut io, 0, 0xFFFF_FFFF);
        assert_eq!(reg_read(&mut io, 0), 0x0F00_0000);
        assert_eq!(reg_read(&mut io, 2), 0x0F00_0000);
        assert_eq!(
            reg_read(&mut io, 0x10 + 48),
            0xFFFF_FFFF,
            "past the last entry"
        );
    }

    #[test]
    fn entries_reset_masked_and_read_back_without_read_only_bits() {
        let (mut io, _) = ioapic();
        for pin in 0..24 {
            assert_eq!(reg_read(&mut io, 0x10 + 2 * pin), MASKED as u32);
        }
        reg_write(&mut io, 0x10 + 2 * 5, 0xFFFF_FFFF);
        reg_write(&mut io, 0x10 + 2 * 5 + 1, 0xFFFF_FFFF);
        assert_eq!(reg_read(&mut io, 0x10 + 2 * 5), 0x0001_AFFF);
        assert_eq!(reg_read(&mut io, 0x10 + 2 * 5 + 1), 0xFFFF_0000);
    }

    #[test]
    fn redirection_entries_decode_to_exact_msi_messages() {
        let edge_fixed_physical = 0x31 | (3u64 << 56);
        assert_eq!(
            redirection_to_msi(edge_fixed_physical),
            MsiMessage {
                address: 0xFEE0_3000,
                data: 0x31
            }
        );
        let level_lowest_logical = 0x41 | (1 << 8) | DEST_MODE_LOGICAL | TRIGGER_LEVEL;
        assert_eq!(
            redirection_to_msi(level_lowest_logical | (0x0Fu64 << 56)),
            MsiMessage {
                address: 0xFEE0_F004,
                data: 0xC141
            }
        );
        // Remappable format (bit 48): handle 0x9234 -> address bits 19:5 and 2.
        let remappable = 0x23 | DEST_MODE_LOGICAL | (1u64 << 48) | (0x1234u64 << 49);
        assert_eq!(
            redirection_to_msi(remappable).address,
            0xFEE0_0000 | (0x1234 << 5) | (1 << 4) | (1 << 2)
        );
        let nmi = 0x02 | (4 << 8) | (0xFFu64 << 56);
        assert_eq!(
            redirection_to_msi(nmi),
            MsiMessage {
                address: 0xFEEF_F000,
                data: 0x402
            }
        );
    }

    #[test]
    fn masked_pin_delivers_nothing() {
        let (mut io, sink) = ioapic();
        io.set_pin_level(4, true).unwrap();
        assert!(sink.take().is_empty());
        program(&mut io, 4, 0x30 | MASKED);
        io.set_pin_level(4, false).unwrap();
        io.set_pin_level(4, true).unwrap();
        assert!(sink.take().is_empty());
    }

    #[test]
    fn edge_pin_delivers_once_per_rising_edge() {
        let (mut io, sink) = ioapic();
        program(&mut io, 4, 0x24 | (1u64 << 56));
        io.set_pin_level(4, true).unwrap();
        io.set_pin_level(4, true).unwrap();
        assert_eq!(sink.take().len(), 1);
        io.set_pin_level(4, false).unwrap();
        io.set_pin_level(4, true).unwrap();
        let sent = sink.take();
        assert_eq!(
            sent,
            vec![MsiMessage {
                address: 0xFEE0_1000,
                data: 0x24
            }]
        );
    }

    #[test]
    fn level_pin_sets_remote_irr_until_eoi_then_redelivers_if_still_high() {
        let (mut io, sink) = ioapic();
        program(&mut io, 10, 0x50 | TRIGGER_LEVEL);
        io.set_pin_level(10, true).unwrap();
        assert_eq!(sink.take().len(), 1);
        assert_ne!(io.redirection_entry(10).unwrap() & REMOTE_IRR, 0);
        assert_ne!(reg_read(&mut io, 0x10 + 20) & REMOTE_IRR as u32, 0);
        io.set_pin_level(10, true).unwrap();
        assert!(sink.take().is_empty(), "remote IRR blocks re-delivery");
        io.end_of_interrupt(0x51);
        assert!(sink.take().is_empty(), "EOI of another vector");
        io.end_of_interrupt(0x50);
        assert_eq!(sink.take().len(), 1, "still asserted: fires again");
        io.set_pin_level(10, false).unwrap();
        io.end_of_interrupt(0x50);
        assert!(sink.take().is_empty());
        assert_eq!(io.redirection_entry(10).unwrap() & REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let (mut io, sink) = ioapic();
        program(&mut io, 9, 0x60 | TRIGGER_LEVEL | MASKED);
        io.set_pin_level(9, true).unwrap();
        assert!(sink.take().is_empty());
        program(&mut io, 9, 0x60 | TRIGGER_LEVEL);
        assert_eq!(sink.take().len(), 1);
    }

    #[test]
    fn failed_delivery_leaves_remote_irr_clear() {
        let (mut io, sink) = ioapic();
        program(&mut io, 3, 0x70 | TRIGGER_LEVEL);
        sink.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        io.set_pin_level(3, true).unwrap();
        assert_eq!(io.redirection_entry(3).unwrap() & REMOTE_IRR, 0);
        sink.fail.store(false, std::sync::atomic::Ordering::Relaxed);
        io.set_pin_level(3, true).unwrap();
        assert_eq!(sink.take().len(), 1);
    }

    #[test]
    fn invalid_pins_are_rejected() {
        let (mut io, _) = ioapic();
        assert_eq!(io.set_pin_level(24, true), Err(IoapicError::InvalidPin(24)));
        let shared = Arc::new(Mutex::new(io));
        assert_eq!(
            IoapicPin::new(shared, 99).unwrap_err(),
            IoapicError::InvalidPin(99)
        );
    }

    #[test]
    fn route_listener_and_eoi_vectors_track_the_table() {
        let (mut io, _) = ioapic();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        io.set_route_listener(Box::new(move |pin, msg| {
            seen2.lock().unwrap().push((pin, msg))
        }));
        program(&mut io, 2, 0x80 | TRIGGER_LEVEL);
        program(&mut io, 6, 0x81);
        program(&mut io, 7, 0x40 | TRIGGER_LEVEL);
        assert_eq!(io.eoi_vectors(), vec![0x40, 0x80]);
        let seen_now = std::mem::take(&mut *seen.lock().unwrap());
        assert_eq!(seen_now.len(), 3);
        assert_eq!(
            seen_now[0],
            (2, Some(redirection_to_msi(0x80 | TRIGGER_LEVEL)))
        );
        program(&mut io, 2, 0x80 | TRIGGER_LEVEL | MASKED);
        assert_eq!(*seen.lock().unwrap(), vec![(2, None)]);
        assert_eq!(io.eoi_vectors(), vec![0x40]);
        assert_eq!(io.msi_route(2), None);
    }

    /// Linux's one-shot threaded level interrupt (the ACPI GED): delivered, masked by the hard
    /// handler, EOIed while masked, unmasked after the thread. KVM must still report that EOI,
    /// or remote IRR stays set and Linux's free_irq spins on it forever (it did: L2's power-off
    /// hung after the power button).
    #[test]
    fn a_masked_pin_in_service_stays_mirrored_until_its_eoi() {
        let (mut io, sink) = ioapic();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        io.set_route_listener(Box::new(move |pin, msg| {
            seen2.lock().unwrap().push((pin, msg))
        }));
        let level = 0x90 | TRIGGER_LEVEL;
        program(&mut io, 9, level);
        io.set_pin_level(9, true).unwrap();
        assert_eq!(sink.take().len(), 1);
        seen.lock().unwrap().clear();
        // Masked in service: still mirrored, still an EOI vector.
        program(&mut io, 9, level | MASKED);
        assert!(
            seen.lock().unwrap().is_empty(),
            "{:?}",
            seen.lock().unwrap()
        );
        assert_eq!(io.eoi_vectors(), vec![0x90]);
        assert_eq!(io.msi_route(9), None, "a masked pin delivers nothing");
        // The EOI clears remote IRR; only now the route goes.
        io.end_of_interrupt(0x90);
        assert_eq!(io.redirection_entry(9).unwrap() & REMOTE_IRR, 0);
        assert_eq!(*seen.lock().unwrap(), vec![(9, None)]);
        assert!(io.eoi_vectors().is_empty());
        assert!(
            sink.take().is_empty(),
            "masked: no re-delivery though still high"
        );
        // The thread read the event (line low), then the pin is unmasked: mirrored again,
        // nothing to deliver.
        io.set_pin_level(9, false).unwrap();
        program(&mut io, 9, level);
        assert_eq!(
            seen.lock().unwrap().last(),
            Some(&(9, Some(redirection_to_msi(level))))
        );
        assert!(sink.take().is_empty());
    }

    #[test]
    fn partial_and_misaligned_mmio_accesses() {
        let (mut io, _) = ioapic();
        io.write(IOAPIC_BASE, IOREGSEL, &[0x01]);
        let mut b = [0u8; 2];
        io.read(IOAPIC_BASE, IOWIN + 2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0017);
        let mut wide = [0u8; 8];
        io.read(IOAPIC_BASE, IOWIN, &mut wide);
        assert_eq!(wide, [0xFF; 8]);
        io.write(IOAPIC_BASE, IOWIN + 2, &[1, 2, 3, 4]);
        assert_eq!(reg_read(&mut io, 1), 0x0017_0011);
    }

    #[test]
    fn ioapic_pin_carries_serial_interrupts() {
        use crate::legacy::serial::{Serial, COM1_BASE, COM1_IRQ};
        let (mut io, sink) = ioapic();
        program(&mut io, COM1_IRQ as u32, 0x34);
        let shared = Arc::new(Mutex::new(io));
        let pin: Arc<dyn IrqLine> = Arc::new(IoapicPin::new(shared, COM1_IRQ).unwrap());
        let mut serial = Serial::new(Box::new(io::sink()), Some(pin));
        serial.write(COM1_BASE, 1, &[0x02]); // IER: THR empty
        assert_eq!(
            sink.take(),
            vec![MsiMessage {
                address: MSI_ADDRESS_BASE,
                data: 0x34
            }]
        );
    }
}
