//! [`VirtioIommuDevice`]: the virtio-iommu [`VirtioDevice`].

use std::sync::Arc;

use iommu::domain::DomainsConfig;
use iommu::error::chain as causes;
use iommu::sync::lock;
use iommu::virtio::protocol::{
    VirtioIommuConfig, VIRTIO_ID_IOMMU, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_DOMAIN_RANGE,
    VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_PROBE,
};
use iommu::virtio::VirtioIommuSettings;
use iommu::warn_limited;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use zerocopy::IntoBytes;

use super::event::{EventQueue, EVENTQ_INDEX};
use super::handler::GUEST_LOG;
use super::handler::{RequestQueue, RequestWorker, REQUESTQ_INDEX};
use super::{IommuState, VirtioIommuDeviceError, VirtioIommuStats};
use crate::thread::ThreadHook;
use crate::virtio::{ActivateContext, VirtioDevice, VirtioDeviceError};

/// Size of the request queue.
pub const REQUESTQ_SIZE: u16 = 256;
/// Size of the event queue.
pub const EVENTQ_SIZE: u16 = 64;
/// Offset of the `bypass` byte in the config space.
const BYPASS_OFFSET: u64 = std::mem::offset_of!(VirtioIommuConfig, bypass) as u64;

/// Device-specific features this device implements: INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP,
/// PROBE, BYPASS_CONFIG. Not offered: the legacy BYPASS (superseded), MMIO (a vhost-user back
/// end cannot reach device MMIO through a translation anyway) and EVENT_IDX.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
    | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
    | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
    | (1 << VIRTIO_IOMMU_F_PROBE)
    | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);

/// The virtio-iommu device. Queues: 0 = requestq, 1 = eventq.
///
/// The model lives in a shared [`IommuState`]; the device serves the request queue on a worker
/// thread between activation and reset. A device reset drops every domain (consumers see
/// `Reset`) but keeps the `bypass` setting; [`IommuState::system_reset`] restores it.
pub struct VirtioIommuDevice {
    state: Arc<IommuState>,
    acked: u64,
    worker: Option<RequestWorker>,
    thread_hook: Option<ThreadHook>,
}

impl std::fmt::Debug for VirtioIommuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommuDevice")
            .field("acked", &self.acked)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl VirtioIommuDevice {
    /// A device over existing shared state.
    pub fn new(state: Arc<IommuState>) -> Self {
        Self {
            state,
            acked: 0,
            worker: None,
            thread_hook: None,
        }
    }

    /// A device with fresh state built from `settings` and `config`.
    pub fn with_settings(
        settings: VirtioIommuSettings,
        config: DomainsConfig,
    ) -> Result<Self, VirtioIommuDeviceError> {
        Ok(Self::new(IommuState::new(settings, config)?))
    }

    /// The shared state (model, notifiers, fault reporting, translation).
    pub fn state(&self) -> Arc<IommuState> {
        Arc::clone(&self.state)
    }

    /// The counters.
    pub fn stats(&self) -> Arc<VirtioIommuStats> {
        self.state.stats()
    }

    /// Whether the request worker is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn config_bytes(&self) -> VirtioIommuConfig {
        self.state.settings.config_space(self.state.global_bypass())
    }

    fn write_bypass(&mut self, value: u8) {
        let bypass = match self.state.settings.bypass_write(self.acked, value) {
            Ok(b) => b,
            Err(e) => {
                warn_limited!(
                    lock(&GUEST_LOG),
                    "virtio-iommu: ignoring config write: {}",
                    causes(&e)
                );
                return;
            }
        };
        let update = self.state.begin_update();
        let ((), events) = update.apply(|d| ((), d.set_global_bypass(bypass)));
        if let Err(e) = update.deliver(&events) {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: bypass={bypass}: a translation consumer failed: {}",
                causes(&e)
            );
        }
    }

    fn stop(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
        self.state.set_event_queue(None);
    }
}

impl VirtioDevice for VirtioIommuDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[REQUESTQ_SIZE, EVENTQ_SIZE]
    }

    fn config_len(&self) -> usize {
        std::mem::size_of::<VirtioIommuConfig>()
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | self.state.settings.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.avail_features();
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        crate::virtio::copy_config(cfg.as_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Some(index) = BYPASS_OFFSET.checked_sub(offset) else {
            log::debug!("virtio-iommu: ignoring write to read-only config offset {offset:#x}");
            return;
        };
        match usize::try_from(index).ok().and_then(|i| data.get(i)) {
            Some(&value) => self.write_bypass(value),
            None => {
                log::debug!("virtio-iommu: ignoring write to read-only config offset {offset:#x}")
            }
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioDeviceError> {
        if self.worker.is_some() {
            return Err(VirtioDeviceError::AlreadyActive);
        }
        let actual = ctx.queues.len();
        let mut requestq = None;
        let mut eventq = None;
        for (index, queue, kick) in ctx.queues {
            match u16::try_from(index) {
                Ok(REQUESTQ_INDEX) => requestq = Some((queue, kick)),
                Ok(EVENTQ_INDEX) => eventq = Some((queue, kick)),
                _ => {}
            }
        }
        let (Some((rq, rkick)), Some((eq, ekick))) = (requestq, eventq) else {
            return Err(VirtioDeviceError::QueueCount {
                expected: 2,
                actual,
            });
        };
        let events = EventQueue::new(ctx.mem.clone(), eq, ekick, ctx.interrupt.clone());
        self.state.set_event_queue(Some(events));
        let worker = RequestWorker::spawn(
            RequestQueue {
                state: Arc::clone(&self.state),
                mem: ctx.mem,
                queue: rq,
                kick: rkick,
                interrupt: ctx.interrupt,
                acked: self.acked,
            },
            self.thread_hook.clone(),
        );
        match worker {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            Err(e) => {
                self.state.set_event_queue(None);
                Err(VirtioDeviceError::Backend(Box::new(
                    VirtioIommuDeviceError::Worker(e),
                )))
            }
        }
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked = 0;
        let update = self.state.begin_update();
        let ((), events) = update.apply(|d| ((), d.reset()));
        if let Err(e) = update.deliver(&events) {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: reset: a translation consumer failed: {}",
                causes(&e)
            );
        }
        true
    }

    fn set_thread_hook(&mut self, hook: ThreadHook) {
        self.thread_hook = Some(hook);
    }
}

impl Drop for VirtioIommuDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use iommu::notifier::{IommuEvent, IommuNotifier, NotifierFlags, NotifyError};
    use iommu::translate::{DmaTranslate, TranslateError};
    use iommu::types::{Access, Iova, RequesterId};
    use iommu::virtio::protocol::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::*;
    use super::super::FaultDelivery;
    use super::*;
    use crate::virtio::VirtioInterruptType;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<IommuEvent>>);

    impl IommuNotifier for Recorder {
        fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError> {
            self.0.lock().unwrap().push(ev.clone());
            Ok(())
        }
    }

    fn boot_bypass_state() -> Arc<IommuState> {
        let config = DomainsConfig {
            boot_bypass: true,
            ..Default::default()
        };
        let s = IommuState::new(VirtioIommuSettings::default(), config).unwrap();
        s.add_endpoint(EP).unwrap();
        s
    }

    fn read(dev: &mut VirtioIommuDevice, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0xff; len];
        dev.read_config(offset, &mut data);
        data
    }

    #[test]
    fn identity_features_and_config_space() {
        let mut dev = VirtioIommuDevice::new(boot_bypass_state());
        assert_eq!(dev.device_type(), 23);
        assert_eq!(dev.queue_max_sizes(), &[256, 64]);
        assert_eq!(dev.config_len(), 40);
        assert_eq!(dev.avail_features(), ALL_FEATURES);
        let cfg = read(&mut dev, 0, 40);
        assert_eq!(&cfg[0..8], &(!0xfffu64).to_le_bytes());
        assert_eq!(&cfg[16..24], &((1u64 << 48) - 1).to_le_bytes());
        assert_eq!(&cfg[28..32], &u32::MAX.to_le_bytes());
        assert_eq!(&cfg[32..36], &512u32.to_le_bytes());
        assert_eq!(&cfg[36..40], &[1, 0, 0, 0]);
        assert_eq!(
            read(&mut dev, 38, 4),
            vec![0, 0, 0, 0],
            "past the end reads 0"
        );
        assert_eq!(read(&mut dev, u64::MAX, 2), vec![0, 0]);
    }

    #[test]
    fn the_pci_transport_exposes_it_as_device_0x1057() {
        use crate::pci::msix::test_utils::RecordingSink;
        use crate::pci::PciDevice;
        use crate::virtio::transport::VirtioPciDevice;
        let dev = VirtioIommuDevice::new(state());
        let sink = Arc::new(RecordingSink::default());
        let mut pci = VirtioPciDevice::new(Box::new(dev), mem(), sink, None).unwrap();
        assert_eq!(pci.read_config_register(0), 0x1057_1af4);
    }

    #[test]
    fn bypass_byte_is_writable_only_with_bypass_config() {
        let state = boot_bypass_state();
        let rec = Arc::new(Recorder::default());
        state
            .register_notifier(EP, NotifierFlags::UNMAP, rec.clone())
            .unwrap();
        let mut dev = VirtioIommuDevice::new(state.clone());
        dev.ack_features(ALL_FEATURES & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
        dev.write_config(36, &[0]);
        assert!(state.global_bypass(), "not negotiated: ignored");
        dev.ack_features(ALL_FEATURES);
        dev.write_config(0, &[0; 8]);
        dev.write_config(36, &[2]);
        assert!(
            state.global_bypass(),
            "read-only fields and bad values ignored"
        );
        dev.write_config(36, &[0]);
        assert!(!state.global_bypass());
        assert_eq!(read(&mut dev, 36, 1), vec![0]);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![IommuEvent::DetachEndpoint { rid: EP }]
        );
        dev.write_config(34, &[0, 0, 1, 0]);
        assert!(state.global_bypass(), "a wider write covering the byte");
        assert!(state.translate(EP, Iova(0x1000), 8, Access::Write).is_ok());
        assert!(dev.reset());
        assert!(state.global_bypass(), "device reset keeps bypass");
        dev.write_config(36, &[0]);
        assert!(state.global_bypass(), "features are forgotten on reset");
        state.system_reset().unwrap();
        assert!(state.global_bypass());
    }

    #[test]
    fn activation_needs_both_queues_and_a_reset_in_between() {
        let mem = mem();
        let (req, evt) = (Ring::new(0, 256), Ring::new(0x4000, 64));
        let mut dev = VirtioIommuDevice::new(state());
        let int = Arc::new(RecordingInterrupt::default());
        let (mut ctx, _kick) = context(&mem, &req, &evt, int.clone());
        ctx.queues.pop();
        assert!(matches!(
            dev.activate(ctx),
            Err(VirtioDeviceError::QueueCount {
                expected: 2,
                actual: 1
            })
        ));
        assert!(!dev.is_active());
        let (ctx, _kick) = context(&mem, &req, &evt, int.clone());
        dev.activate(ctx).unwrap();
        let (ctx, _kick) = context(&mem, &req, &evt, int);
        assert!(matches!(
            dev.activate(ctx),
            Err(VirtioDeviceError::AlreadyActive)
        ));
    }

    #[test]
    fn reset_stops_the_worker_and_drops_every_domain() {
        let state = state();
        let rec = Arc::new(Recorder::default());
        state
            .register_notifier(EP, NotifierFlags::UNMAP, rec.clone())
            .unwrap();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        assert!(Arc::strong_count(&d.interrupt) > 1);
        assert!(d.dev.reset());
        assert!(!d.dev.is_active());
        assert_eq!(
            Arc::strong_count(&d.interrupt),
            1,
            "worker and eventq released"
        );
        assert_eq!(state.with_domains(|m| m.domain_count()), 0);
        assert_eq!(rec.0.lock().unwrap().last(), Some(&IommuEvent::Reset));
        // The worker is gone (it let go of the interrupt): a request and its
        // kick now stay untouched, with no need to wait and see.
        let before = d.req.used_idx(&d.mem);
        d.req
            .push(&d.mem, &[(0x10_0000, 20, false), (0x10_0100, 4, true)]);
        d.kick.write(1).unwrap();
        assert_eq!(d.kick.read().unwrap(), 1, "nobody read the kick");
        assert_eq!(d.req.used_idx(&d.mem), before, "nobody serves the queue");
        // Activate again on fresh rings.
        d.req = Ring::new(0x8000, 256);
        d.evt = Ring::new(0xc000, 64);
        d.dev.ack_features(ALL_FEATURES);
        let (ctx, kick) = context(&d.mem, &d.req, &d.evt, d.interrupt.clone());
        d.kick = kick;
        d.dev.activate(ctx).unwrap();
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        drop(d.dev);
        assert_eq!(Arc::strong_count(&d.interrupt), 1, "drop stops the worker");
    }

    fn event_buffer(d: &mut Driver, len: u32) -> u64 {
        let addr = d.alloc(len);
        d.evt.push(&d.mem, &[(addr, len, true)]);
        addr
    }

    #[test]
    fn faults_fill_event_buffers_and_are_dropped_without_one() {
        let state = state();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        let a = event_buffer(&mut d, 24);
        let b = event_buffer(&mut d, 32);
        let out = state.report_fault(EP, Some(Iova(0x1234_5000)), 2, VIRTIO_IOMMU_FAULT_F_WRITE);
        assert_eq!(out, FaultDelivery::Queued);
        let mut rec = [0u8; 24];
        d.mem.read_slice(&mut rec, GuestAddress(a)).unwrap();
        let mut want = vec![2, 0, 0, 0, 2, 1, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&0x1234_5000u64.to_le_bytes());
        assert_eq!(&rec[..], &want[..]);
        assert_eq!(d.evt.next_used(&d.mem), Some((0, 24)));
        assert_eq!(
            d.interrupt.triggers.lock().unwrap().last(),
            Some(&VirtioInterruptType::Queue(1))
        );
        let err = TranslateError::NotAttached { rid: EP };
        let out = state.report_translate_error(EP, Iova(0x8000), Access::Read, &err);
        assert_eq!(out, FaultDelivery::Queued);
        d.mem.read_slice(&mut rec, GuestAddress(b)).unwrap();
        assert_eq!(
            (rec[0], rec[4], rec[5]),
            (VIRTIO_IOMMU_FAULT_R_DOMAIN, 1, 1)
        );
        assert_eq!(
            d.mem.read_obj::<u32>(GuestAddress(b + 24)).unwrap(),
            0xAAAA_AAAA
        );
        let other = RequesterId::from_bdf(0, 0x10);
        assert_eq!(
            state.report_fault(other, None, 0, 0),
            FaultDelivery::DroppedNoBuffer
        );
        let short = event_buffer(&mut d, 16);
        assert_eq!(
            state.report_fault(EP, None, 0, 0),
            FaultDelivery::DroppedBadBuffer
        );
        assert_eq!(
            d.mem.read_obj::<u64>(GuestAddress(short)).unwrap(),
            0xAAAA_AAAA_AAAA_AAAA
        );
        assert_eq!(d.evt.next_used(&d.mem), Some((1, 24)));
        assert_eq!(
            d.evt.next_used(&d.mem),
            Some((2, 0)),
            "bad buffer returned empty"
        );
        let stats = state.stats();
        assert_eq!((stats.faults_reported(), stats.faults_dropped()), (2, 2));
        assert!(d.dev.reset());
        assert_eq!(
            state.report_fault(EP, None, 0, 0),
            FaultDelivery::DroppedInactive
        );
    }
}
