//! The DMA layer's counters in a `net-tx` or `dma-map` result line, and the per-DMA costs a
//! benchmark derives from them.

use super::{GuestError, GuestResult, IommuMode};

/// What the guest's DMA layer did during a run (see `tests/guest/dma.h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaStats {
    /// The effective mode (VT-d caching mode turns lazy into strict, like Linux).
    pub mode: IommuMode,
    /// The vIOMMU driver: `virtio-iommu`, `vt-d` or `none`.
    pub viommu: String,
    /// `dma_map` calls (rings and buffers).
    pub maps: u64,
    /// `dma_unmap` calls.
    pub unmaps: u64,
    /// Lazy-mode batch flushes.
    pub flushes: u64,
    /// virtio-iommu requests, or VT-d queued descriptors including wait descriptors.
    pub iommu_reqs: u64,
    /// Synchronous round trips to the vIOMMU (request kicks waited for / VT-d wait descriptors).
    pub iommu_syncs: u64,
    /// Guest TSC cycles spent in `dma_map`.
    pub map_cycles: u64,
    /// Guest TSC cycles spent in `dma_unmap` (flushes it triggered included).
    pub unmap_cycles: u64,
    /// Guest TSC cycles spent in lazy flushes.
    pub flush_cycles: u64,
    /// The DMA device has a PCIe ATS capability.
    pub ats_capable: bool,
    /// The guest enabled ATS on it.
    pub ats_enabled: bool,
}

fn field(r: &GuestResult, key: &'static str) -> Result<u64, GuestError> {
    r.u64(key).ok_or(GuestError::MissingField(key))
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den != 0).then(|| num as f64 / den as f64)
}

impl DmaStats {
    /// Reads the counters from a result line.
    pub fn from_result(r: &GuestResult) -> Result<Self, GuestError> {
        let mode = r
            .str("iommu_mode")
            .and_then(IommuMode::parse)
            .ok_or(GuestError::MissingField("iommu_mode"))?;
        let viommu = r.str("viommu").ok_or(GuestError::MissingField("viommu"))?;
        Ok(DmaStats {
            mode,
            viommu: viommu.to_string(),
            maps: field(r, "maps")?,
            unmaps: field(r, "unmaps")?,
            flushes: field(r, "flushes")?,
            iommu_reqs: field(r, "iommu_reqs")?,
            iommu_syncs: field(r, "iommu_syncs")?,
            map_cycles: field(r, "map_cycles")?,
            unmap_cycles: field(r, "unmap_cycles")?,
            flush_cycles: field(r, "flush_cycles")?,
            ats_capable: field(r, "ats_cap")? != 0,
            ats_enabled: field(r, "ats")? != 0,
        })
    }

    /// Mean guest TSC cycles per `dma_map` (None without maps).
    pub fn cycles_per_map(&self) -> Option<f64> {
        ratio(self.map_cycles, self.maps)
    }

    /// Mean guest TSC cycles per `dma_unmap`, flushes included (None without unmaps).
    pub fn cycles_per_unmap(&self) -> Option<f64> {
        ratio(self.unmap_cycles, self.unmaps)
    }

    /// vIOMMU requests or descriptors per unmap: the protocol cost of one buffer's life cycle.
    pub fn reqs_per_unmap(&self) -> Option<f64> {
        ratio(self.iommu_reqs, self.unmaps)
    }

    /// Nanoseconds per map and unmap together, given the TSC rate in kHz.
    pub fn nanos_per_dma(&self, tsc_khz: u64) -> Option<f64> {
        let cycles = self.cycles_per_map()? + self.cycles_per_unmap()?;
        (tsc_khz != 0).then(|| cycles * 1e6 / tsc_khz as f64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LINE: &str = r#"IOVMM-RESULT {"test":"dma-map","status":"ok","iommu_mode":"lazy","viommu":"vt-d","maps":100,"unmaps":80,"flushes":2,"iommu_reqs":6,"iommu_syncs":2,"map_cycles":5000,"unmap_cycles":16000,"flush_cycles":900,"ats_cap":1,"ats":0}"#;

    #[test]
    fn stats_are_read_from_the_result_line() {
        let s = GuestResult::parse_line(LINE).unwrap().dma_stats().unwrap();
        assert_eq!(s.mode, IommuMode::Lazy);
        assert_eq!(s.viommu, "vt-d");
        assert_eq!((s.maps, s.unmaps, s.flushes), (100, 80, 2));
        assert_eq!((s.iommu_reqs, s.iommu_syncs), (6, 2));
        assert_eq!(
            (s.map_cycles, s.unmap_cycles, s.flush_cycles),
            (5000, 16000, 900)
        );
        assert!(s.ats_capable && !s.ats_enabled);
    }

    #[test]
    fn per_dma_costs_divide_by_the_call_counts() {
        let s = GuestResult::parse_line(LINE).unwrap().dma_stats().unwrap();
        assert_eq!(s.cycles_per_map(), Some(50.0));
        assert_eq!(s.cycles_per_unmap(), Some(200.0));
        assert_eq!(s.reqs_per_unmap(), Some(0.075));
        // 250 cycles at 2.5 GHz = 100 ns.
        assert_eq!(s.nanos_per_dma(2_500_000), Some(100.0));
        assert_eq!(s.nanos_per_dma(0), None);
    }

    #[test]
    fn costs_are_none_without_calls() {
        let line = LINE.replace(r#""maps":100"#, r#""maps":0"#);
        let s = GuestResult::parse_line(&line).unwrap().dma_stats().unwrap();
        assert_eq!(s.cycles_per_map(), None);
        assert_eq!(s.nanos_per_dma(2_500_000), None);
    }

    #[test]
    fn missing_or_mistyped_fields_are_named() {
        let line = LINE.replace(r#","iommu_syncs":2"#, "");
        let err = GuestResult::parse_line(&line).unwrap().dma_stats();
        assert_eq!(err, Err(GuestError::MissingField("iommu_syncs")));
        let line = LINE.replace(r#""iommu_mode":"lazy""#, r#""iommu_mode":"fast""#);
        let err = GuestResult::parse_line(&line).unwrap().dma_stats();
        assert_eq!(err, Err(GuestError::MissingField("iommu_mode")));
    }
}
