//! [`VirtioIommuDevice`]: the virtio-iommu [`VirtioDevice`].

use std::sync::Arc;

use iommu::domain::DomainsConfig;
use iommu::virtio::protocol::{
    VirtioIommuConfig, VIRTIO_ID_IOMMU, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_DOMAIN_RANGE,
    VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_PROBE,
};
use iommu::virtio::VirtioIommuSettings;
use zerocopy::IntoBytes;

use super::event::{EventQueue, EVENTQ_INDEX};
use super::handler::{RequestQueue, RequestWorker, REQUESTQ_INDEX};
use super::{IommuState, VirtioIommuDeviceError, VirtioIommuStats};
use crate::virtio::device::VIRTIO_F_VERSION_1;
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
                log::warn!("virtio-iommu: ignoring config write: {e}");
                return;
            }
        };
        let update = self.state.begin_update();
        let ((), events) = update.apply(|d| ((), d.set_global_bypass(bypass)));
        if let Err(e) = update.deliver(&events) {
            log::warn!("virtio-iommu: bypass={bypass}: a translation consumer failed: {e}");
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
        let bytes = cfg.as_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o));
            *out = at.copied().unwrap_or(0);
        }
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
        let worker = RequestWorker::spawn(RequestQueue {
            state: Arc::clone(&self.state),
            mem: ctx.mem,
            queue: rq,
            kick: rkick,
            interrupt: ctx.interrupt,
            acked: self.acked,
        });
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
            log::warn!("virtio-iommu: reset: a translation consumer failed: {e}");
        }
        true
    }
}

impl Drop for VirtioIommuDevice {
    fn drop(&mut self) {
        self.stop();
    }
}
