//! MSI-X: capability, vector table and pending bit array (PBA).
//!
//! [`MsixConfig`] holds the guest-programmed table and the capability's
//! enable / function-mask bits. A vector fired while it is masked (or the
//! function is masked) sets its pending bit; the message is delivered through
//! the [`MsiSink`] as soon as the vector becomes unmasked.
//!
//! Optionally each vector is also backed by an irqfd ([`MsixIrqfds`]): an
//! eventfd registered with KVM on its own GSI. The GSI route follows the
//! table entry and mask state (route disabled while masked or MSI-X is off),
//! so an external process (a vhost-user backend) can raise the vector
//! without a VMM round trip. Interrupts raised through the eventfd while the
//! vector is masked are dropped by KVM, not latched in the PBA.

use std::io;
use std::sync::{Arc, Mutex};

use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::warn_limited;
use log::{debug, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::interrupt::{IrqfdRouter, MsiMessage, MsiSink};

/// Most log lines per second about what the guest does wrong here (it can do it in a loop).
static LOG_BUDGET: Mutex<RateLimit> = Mutex::new(RateLimit::per_second(10));

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Maximum number of vectors per function.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Size of one table entry in bytes.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Length of the MSI-X capability body (after the ID/next bytes).
pub const MSIX_CAP_BODY_LEN: usize = 10;

const MSG_CTL_ENABLE: u16 = 1 << 15;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CTL_MASK: u32 = 1;

/// Errors setting up MSI-X.
#[derive(Debug, Error)]
pub enum MsixError {
    /// Vector count out of range.
    #[error("MSI-X vector count {0} is invalid; use 1..=2048")]
    VectorCount(u16),
    /// Creating an eventfd failed.
    #[error("failed to create the eventfd of MSI-X vector {vector}")]
    EventFd {
        /// Vector index.
        vector: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The irqfd router failed (GSI allocation, route or irqfd registration).
    #[error("failed to set up the irqfd of MSI-X vector {vector}")]
    Irqfd {
        /// Vector index.
        vector: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Builds the MSI-X capability body: message control plus the table and PBA
/// locations (`bir` is the BAR index). Pair it with [`msix_cap_writable_mask`].
pub fn msix_cap_body(vectors: u16, bir: u8, table_offset: u32, pba_offset: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(MSIX_CAP_BODY_LEN);
    body.extend_from_slice(&(vectors.saturating_sub(1) & 0x7ff).to_le_bytes());
    body.extend_from_slice(&((table_offset & !7) | u32::from(bir & 7)).to_le_bytes());
    body.extend_from_slice(&((pba_offset & !7) | u32::from(bir & 7)).to_le_bytes());
    body
}

/// The guest-writable bits of the MSI-X capability body (enable, function mask).
pub fn msix_cap_writable_mask() -> [u8; MSIX_CAP_BODY_LEN] {
    let mut mask = [0u8; MSIX_CAP_BODY_LEN];
    mask[1] = 0xc0;
    mask
}

/// Per-vector irqfds (eventfd + GSI) registered through an [`IrqfdRouter`].
///
/// Immutable after creation, so it can be shared (`Arc`) between the MSI-X
/// state and whoever hands the eventfds out. Dropping it unregisters the
/// irqfds.
pub struct MsixIrqfds {
    router: Arc<dyn IrqfdRouter>,
    vectors: Vec<(u32, EventFd)>,
}

impl std::fmt::Debug for MsixIrqfds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gsis: Vec<u32> = self.vectors.iter().map(|v| v.0).collect();
        f.debug_struct("MsixIrqfds").field("gsis", &gsis).finish()
    }
}

impl MsixIrqfds {
    /// Allocates a GSI and an eventfd per vector, disables each route and
    /// registers the irqfds.
    pub fn new(router: Arc<dyn IrqfdRouter>, vectors: u16) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MAX_MSIX_VECTORS {
            return Err(MsixError::VectorCount(vectors));
        }
        let mut irqfds = MsixIrqfds {
            router,
            vectors: Vec::with_capacity(usize::from(vectors)),
        };
        for vector in 0..vectors {
            let irqfd = |source| MsixError::Irqfd { vector, source };
            let fd = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| MsixError::EventFd { vector, source })?;
            let gsi = irqfds.router.allocate_gsi().map_err(irqfd)?;
            irqfds.router.set_msi_route(gsi, None).map_err(irqfd)?;
            irqfds.router.register_irqfd(&fd, gsi).map_err(irqfd)?;
            irqfds.vectors.push((gsi, fd));
        }
        Ok(irqfds)
    }

    /// The eventfd raising `vector`.
    pub fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.1)
    }

    /// The GSI of `vector`.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|v| v.0)
    }

    fn set_route(&self, vector: usize, msg: Option<MsiMessage>) {
        if let Some((gsi, _)) = self.vectors.get(vector) {
            if let Err(e) = self.router.set_msi_route(*gsi, msg) {
                warn_limited!(
                    lock(&LOG_BUDGET),
                    "msix: failed to update the route of GSI {gsi}: {e}"
                );
            }
        }
    }
}

impl Drop for MsixIrqfds {
    fn drop(&mut self) {
        for (gsi, fd) in &self.vectors {
            if let Err(e) = self.router.unregister_irqfd(fd, *gsi) {
                warn!("msix: failed to unregister the irqfd of GSI {gsi}: {e}");
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TableEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    vector_ctl: u32,
}

impl TableEntry {
    fn masked(&self) -> bool {
        self.vector_ctl & VECTOR_CTL_MASK != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn field_mut(&mut self, idx: usize) -> &mut u32 {
        match idx {
            0 => &mut self.addr_lo,
            1 => &mut self.addr_hi,
            2 => &mut self.data,
            _ => &mut self.vector_ctl,
        }
    }
}

/// MSI-X state of one PCI function.
pub struct MsixConfig {
    table: Vec<TableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    sink: Arc<dyn MsiSink>,
    irqfds: Option<Arc<MsixIrqfds>>,
    routes: Vec<Option<MsiMessage>>,
}

impl std::fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("irqfds", &self.irqfds)
            .finish_non_exhaustive()
    }
}

impl MsixConfig {
    /// Creates `vectors` vectors, all masked, MSI-X disabled. With `irqfds`,
    /// vector routes are kept in sync with the table (it must have at least
    /// `vectors` entries).
    pub fn new(
        vectors: u16,
        sink: Arc<dyn MsiSink>,
        irqfds: Option<Arc<MsixIrqfds>>,
    ) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MAX_MSIX_VECTORS {
            return Err(MsixError::VectorCount(vectors));
        }
        if let Some(irq) = &irqfds {
            if irq.vectors.len() < usize::from(vectors) {
                return Err(MsixError::VectorCount(vectors));
            }
        }
        let n = usize::from(vectors);
        Ok(MsixConfig {
            table: vec![
                TableEntry {
                    vector_ctl: VECTOR_CTL_MASK,
                    ..Default::default()
                };
                n
            ],
            pba: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            sink,
            irqfds,
            routes: vec![None; n],
        })
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_len(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Size of the PBA in bytes.
    pub fn pba_len(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The irqfds, if this function uses them.
    pub fn irqfds(&self) -> Option<&Arc<MsixIrqfds>> {
        self.irqfds.as_ref()
    }

    /// True when the guest set the MSI-X enable bit.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// True when the guest set the function mask bit.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// True when `vector` is masked by its own mask bit or the function mask
    /// (out-of-range vectors count as masked).
    pub fn vector_masked(&self, vector: u16) -> bool {
        self.function_masked
            || self
                .table
                .get(usize::from(vector))
                .is_none_or(TableEntry::masked)
    }

    /// True when `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba
            .get(v / 64)
            .is_some_and(|w| w & (1u64 << (v % 64)) != 0)
    }

    /// Applies a guest write of the capability's message control word
    /// (only the enable and function mask bits matter).
    pub fn set_message_control(&mut self, msg_ctl: u16) {
        let enabled = msg_ctl & MSG_CTL_ENABLE != 0;
        let masked = msg_ctl & MSG_CTL_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.table.len() {
            self.sync_vector(v);
        }
    }

    /// Reads the table at `offset` (4- or 8-byte aligned accesses).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        let e = &self.table[entry];
        let words = [e.addr_lo, e.addr_hi, e.data, e.vector_ctl];
        let lo = words[field];
        if data.len() == 8 {
            let hi = words[field + 1];
            data.copy_from_slice(&(u64::from(hi) << 32 | u64::from(lo)).to_le_bytes());
        } else {
            data.copy_from_slice(&lo.to_le_bytes());
        }
    }

    /// Writes the table at `offset` (4- or 8-byte aligned accesses), then
    /// updates the route and delivers a pending message if now unmasked.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            debug!(
                "msix: ignored table write at {offset:#x} len {}",
                data.len()
            );
            return;
        };
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let e = &mut self.table[entry];
        *e.field_mut(field) = value as u32;
        if data.len() == 8 {
            *e.field_mut(field + 1) = (value >> 32) as u32;
        }
        e.vector_ctl &= VECTOR_CTL_MASK;
        self.sync_vector(entry);
    }

    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let entry = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        let field = (offset % MSIX_TABLE_ENTRY_SIZE / 4) as usize;
        (entry < self.table.len()).then_some((entry, field))
    }

    /// Reads the PBA at `offset` (4- or 8-byte aligned accesses); the PBA is
    /// read-only for the guest.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        let word = usize::try_from(offset / 8)
            .ok()
            .and_then(|w| self.pba.get(w));
        match (word, len) {
            (Some(w), 8) if offset.is_multiple_of(8) => data.copy_from_slice(&w.to_le_bytes()),
            (Some(w), 4) if offset.is_multiple_of(4) => {
                let v = (w >> ((offset % 8) * 8)) as u32;
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => data.fill(0xff),
        }
    }

    /// Fires `vector`: delivers its message, or sets its pending bit while it
    /// is masked. Nothing happens while MSI-X is disabled or for vectors out
    /// of range.
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        let v = usize::from(vector);
        if !self.enabled || v >= self.table.len() {
            return Ok(());
        }
        if self.vector_masked(vector) {
            self.pba[v / 64] |= 1u64 << (v % 64);
            return Ok(());
        }
        self.sink.signal_msi(self.table[v].message())
    }

    /// Masks every vector, disables MSI-X and clears the PBA (function reset).
    pub fn reset(&mut self) {
        for e in &mut self.table {
            *e = TableEntry {
                vector_ctl: VECTOR_CTL_MASK,
                ..Default::default()
            };
        }
        self.pba.fill(0);
        self.enabled = false;
        self.function_masked = false;
        for v in 0..self.table.len() {
            self.sync_vector(v);
        }
    }

    /// Brings the irqfd route of vector `v` in line with its state and
    /// delivers its pending message once it is unmasked.
    fn sync_vector(&mut self, v: usize) {
        let deliverable = self.enabled && !self.vector_masked(v as u16);
        let msg = self.table[v].message();
        if let Some(irqfds) = &self.irqfds {
            let route = deliverable.then_some(msg);
            if self.routes[v] != route {
                irqfds.set_route(v, route);
                self.routes[v] = route;
            }
        }
        let bit = 1u64 << (v % 64);
        if deliverable && self.pba[v / 64] & bit != 0 {
            self.pba[v / 64] &= !bit;
            if let Err(e) = self.sink.signal_msi(msg) {
                warn_limited!(
                    lock(&LOG_BUDGET),
                    "msix: failed to deliver pending vector {v}: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::Mutex;

    use super::*;

    /// An [`MsiSink`] that records every message.
    #[derive(Default)]
    pub struct RecordingSink {
        pub messages: Mutex<Vec<MsiMessage>>,
    }

    impl RecordingSink {
        pub fn take(&self) -> Vec<MsiMessage> {
            std::mem::take(&mut *lock(&self.messages))
        }
    }

    impl MsiSink for RecordingSink {
        fn signal_msi(&self, msg: MsiMessage) -> io::Result<()> {
            lock(&self.messages).push(msg);
            Ok(())
        }
    }

    /// One call made to a [`RecordingRouter`].
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum RouterCall {
        Route(u32, Option<MsiMessage>),
        Register(u32),
        Unregister(u32),
    }

    /// An [`IrqfdRouter`] that hands out GSIs from 24 up and records calls.
    #[derive(Default)]
    pub struct RecordingRouter {
        pub next_gsi: Mutex<u32>,
        pub calls: Mutex<Vec<RouterCall>>,
    }

    impl RecordingRouter {
        pub fn take(&self) -> Vec<RouterCall> {
            std::mem::take(&mut *lock(&self.calls))
        }
        fn record(&self, call: RouterCall) {
            lock(&self.calls).push(call);
        }
    }

    impl IrqfdRouter for RecordingRouter {
        fn allocate_gsi(&self) -> io::Result<u32> {
            let mut next = lock(&self.next_gsi);
            *next += 1;
            Ok(23 + *next)
        }
        fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
            self.record(RouterCall::Route(gsi, msg));
            Ok(())
        }
        fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            self.record(RouterCall::Register(gsi));
            Ok(())
        }
        fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            self.record(RouterCall::Unregister(gsi));
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_utils::*;
    use super::*;

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x4041,
    };

    fn program(msix: &mut MsixConfig, v: u64, msg: MsiMessage, masked: bool) {
        let base = v * MSIX_TABLE_ENTRY_SIZE;
        msix.write_table(base, &(msg.address as u32).to_le_bytes());
        msix.write_table(base + 4, &((msg.address >> 32) as u32).to_le_bytes());
        msix.write_table(base + 8, &msg.data.to_le_bytes());
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn new_msix(n: u16) -> (Arc<RecordingSink>, MsixConfig) {
        let sink = Arc::new(RecordingSink::default());
        let msix = MsixConfig::new(n, sink.clone(), None).unwrap();
        (sink, msix)
    }

    #[test]
    fn capability_body_encodes_size_and_locations() {
        let body = msix_cap_body(3, 0, 0x4000, 0x5000);
        assert_eq!(body, [2, 0, 0, 0x40, 0, 0, 0, 0x50, 0, 0]);
        assert_eq!(msix_cap_writable_mask()[1], 0xc0);
    }

    #[test]
    fn table_reads_back_writes_and_starts_masked() {
        let (_, mut msix) = new_msix(2);
        let mut b = [0u8; 4];
        msix.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        program(&mut msix, 1, MSG, false);
        let mut q = [0u8; 8];
        msix.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        msix.read_table(24, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x4041);
        // Reserved vector control bits read as zero; out of range reads ones.
        msix.write_table(28, &0xffff_fffeu32.to_le_bytes());
        msix.read_table(28, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        msix.read_table(32, &mut b);
        assert_eq!(b, [0xff; 4]);
        msix.read_table(2, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn trigger_delivers_only_when_enabled_and_unmasked() {
        let (sink, mut msix) = new_msix(1);
        program(&mut msix, 0, MSG, false);
        msix.trigger(0).unwrap();
        assert!(sink.take().is_empty(), "disabled MSI-X must not deliver");
        assert!(!msix.pending(0));
        msix.set_message_control(MSG_CTL_ENABLE);
        msix.trigger(0).unwrap();
        assert_eq!(sink.take(), vec![MSG]);
        msix.trigger(7).unwrap();
        assert!(sink.take().is_empty());
    }

    #[test]
    fn masked_vector_sets_pending_and_unmask_delivers() {
        let (sink, mut msix) = new_msix(70);
        msix.set_message_control(MSG_CTL_ENABLE);
        program(&mut msix, 65, MSG, true);
        msix.trigger(65).unwrap();
        assert!(sink.take().is_empty());
        assert!(msix.pending(65));
        let mut q = [0u8; 8];
        msix.read_pba(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 1);
        let mut d = [0u8; 4];
        msix.read_pba(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1 << 1);
        msix.write_table(65 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(sink.take(), vec![MSG]);
        assert!(!msix.pending(65));
    }

    #[test]
    fn function_mask_latches_and_releases_all_vectors() {
        let (sink, mut msix) = new_msix(2);
        program(&mut msix, 0, MSG, false);
        let other = MsiMessage { data: 0x42, ..MSG };
        program(&mut msix, 1, other, false);
        msix.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        msix.trigger(0).unwrap();
        msix.trigger(1).unwrap();
        assert!(sink.take().is_empty());
        assert!(msix.pending(0) && msix.pending(1));
        msix.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(sink.take(), vec![MSG, other]);
        assert!(!msix.pending(0) && !msix.pending(1));
    }

    #[test]
    fn reset_masks_vectors_and_clears_pending() {
        let (sink, mut msix) = new_msix(1);
        msix.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        program(&mut msix, 0, MSG, false);
        msix.trigger(0).unwrap();
        msix.reset();
        assert!(!msix.pending(0) && !msix.enabled() && msix.vector_masked(0));
        msix.set_message_control(MSG_CTL_ENABLE);
        assert!(sink.take().is_empty());
    }

    #[test]
    fn invalid_vector_counts_are_rejected() {
        let sink = Arc::new(RecordingSink::default());
        assert!(matches!(
            MsixConfig::new(0, sink.clone(), None),
            Err(MsixError::VectorCount(0))
        ));
        assert!(MsixConfig::new(2049, sink, None).is_err());
    }

    #[test]
    fn irqfd_routes_follow_entry_and_mask_changes() {
        let router = Arc::new(RecordingRouter::default());
        let irqfds = Arc::new(MsixIrqfds::new(router.clone(), 2).unwrap());
        assert_eq!(
            router.take(),
            vec![
                RouterCall::Route(24, None),
                RouterCall::Register(24),
                RouterCall::Route(25, None),
                RouterCall::Register(25),
            ]
        );
        assert!(irqfds.eventfd(1).is_some() && irqfds.eventfd(2).is_none());
        let sink = Arc::new(RecordingSink::default());
        let mut msix = MsixConfig::new(2, sink, Some(irqfds.clone())).unwrap();
        program(&mut msix, 1, MSG, false);
        assert!(router.take().is_empty(), "disabled MSI-X keeps routes off");
        msix.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(router.take(), vec![RouterCall::Route(25, Some(MSG))]);
        let moved = MsiMessage { data: 0x51, ..MSG };
        msix.write_table(16 + 8, &moved.data.to_le_bytes());
        assert_eq!(router.take(), vec![RouterCall::Route(25, Some(moved))]);
        msix.write_table(16 + 12, &1u32.to_le_bytes());
        assert_eq!(router.take(), vec![RouterCall::Route(25, None)]);
        msix.write_table(16 + 12, &0u32.to_le_bytes());
        msix.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        assert_eq!(
            router.take(),
            vec![
                RouterCall::Route(25, Some(moved)),
                RouterCall::Route(25, None)
            ]
        );
        drop(msix);
        drop(irqfds);
        assert_eq!(
            router.take(),
            vec![RouterCall::Unregister(24), RouterCall::Unregister(25)]
        );
    }
}
