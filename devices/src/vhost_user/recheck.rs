//! Which recorded translations an unmap notification really changed.
//!
//! vIOMMU invalidations are often wider than what changed: a VT-d
//! page-selective invalidation covers an aligned power-of-two block (two
//! pages at 0x7000 need a 64 KiB mask), caching-mode invalidations follow
//! every map, device-TLB invalidations are blocks too, and domain or global
//! flushes cover everything. Forwarding such a block as one INVALIDATE makes
//! DPDK drop the vrings inside it (`is_vring_iotlb` → `vring_invalidate`),
//! which can leave a queue disabled for good. So the bridge re-translates
//! what it sent ([`super::installed::Installed`]) inside the notified range
//! and invalidates only the parts that are gone, map elsewhere, or changed
//! permission. Keeping an identical translation is safe: the back end holds
//! exactly what the vIOMMU says now.

use iommu::{Extent, TranslateError};

use super::installed::Segment;

/// Most translations done for one notification; past it the rest of the
/// notified segments is treated as changed (over-invalidation is safe).
pub const MAX_LOOKUPS: usize = 4096;

/// Most INVALIDATEs sent for one notification; more changed runs are
/// collapsed into one INVALIDATE spanning them all.
pub const MAX_RUNS: usize = 64;

/// Unmapped IOVAs are re-checked a page at a time.
const PAGE: u64 = 4096;

/// One part of a vring (descriptor table, driver or device area) as IOVAs,
/// inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringArea {
    /// The queue index.
    pub queue: usize,
    /// First IOVA.
    pub start: u64,
    /// Last IOVA.
    pub end: u64,
}

impl VringArea {
    /// The three areas of split virtqueue `queue` with `size` entries, sized
    /// like DPDK's `is_vring_iotlb_split` (plus the event-index word).
    pub fn split_ring(queue: usize, size: u16, desc: u64, avail: u64, used: u64) -> Vec<Self> {
        let n = u64::from(size);
        [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)]
            .into_iter()
            .filter(|(_, len)| *len > 0)
            .map(|(start, len)| VringArea {
                queue,
                start,
                end: start.saturating_add(len - 1),
            })
            .collect()
    }

    /// Whether `[start, end]` overlaps the area.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// Whether the recorded `seg` still holds at `iova`, and up to which IOVA
/// that answer stays the same.
fn classify(seg: &Segment, iova: u64, now: Result<Extent, TranslateError>) -> (u64, bool) {
    match now {
        Ok(ext) if ext.iova.contains(iova) => {
            let same =
                ext.perm == seg.perm && ext.gpa_of(iova).map(|g| g.0) == Some(seg.gpa_of(iova));
            (ext.iova.end(), !same)
        }
        Ok(_) | Err(TranslateError::Unmapped { .. } | TranslateError::PermissionDenied { .. }) => {
            (iova | (PAGE - 1), true)
        }
        // The requester has no translation context at all.
        Err(_) => (seg.end, true),
    }
}

/// Changed runs collected in IOVA order. A run is merged into the previous
/// one unless a kept translation or a vring lies between them.
struct Runs<'a> {
    runs: Vec<(u64, u64)>,
    kept_since_last: bool,
    rings: &'a [VringArea],
}

impl Runs<'_> {
    fn changed(&mut self, start: u64, end: u64) {
        let rings = self.rings;
        match self.runs.last_mut() {
            Some(last)
                if !self.kept_since_last
                    && (last.1 + 1 == start
                        || !rings.iter().any(|r| r.overlaps(last.1 + 1, start - 1))) =>
            {
                last.1 = end;
            }
            _ => self.runs.push((start, end)),
        }
        self.kept_since_last = false;
    }
}

/// The IOVA runs of `segs` (recorded translations clipped to a notified
/// range, in IOVA order) whose translation `now` reports as gone or
/// different; `now(iova)` is the vIOMMU's current extent at `iova`.
pub fn changed_runs(
    segs: &[Segment],
    rings: &[VringArea],
    mut now: impl FnMut(u64) -> Result<Extent, TranslateError>,
) -> Vec<(u64, u64)> {
    let mut out = Runs {
        runs: Vec::new(),
        kept_since_last: false,
        rings,
    };
    let mut lookups = 0;
    for seg in segs {
        let mut iova = seg.start;
        loop {
            let (last, changed) = if lookups < MAX_LOOKUPS {
                lookups += 1;
                classify(seg, iova, now(iova))
            } else {
                (seg.end, true)
            };
            let last = last.clamp(iova, seg.end);
            if changed {
                out.changed(iova, last);
            } else {
                out.kept_since_last = true;
            }
            if last == seg.end {
                break;
            }
            iova = last + 1;
        }
    }
    collapse(out.runs)
}

/// The parts of `segs` that no longer translate as recorded, every one of
/// them (no lookup cap, no collapsing): the audit behind
/// `IotlbBridge::stale_translations`.
pub fn stale_parts(
    segs: &[Segment],
    mut now: impl FnMut(u64) -> Result<Extent, TranslateError>,
) -> Vec<(u64, u64)> {
    let mut stale: Vec<(u64, u64)> = Vec::new();
    for seg in segs {
        let mut iova = seg.start;
        loop {
            let (last, changed) = classify(seg, iova, now(iova));
            let last = last.clamp(iova, seg.end);
            if changed {
                match stale.last_mut() {
                    Some(run) if run.1.checked_add(1) == Some(iova) => run.1 = last,
                    _ => stale.push((iova, last)),
                }
            }
            if last == seg.end {
                break;
            }
            iova = last + 1;
        }
    }
    stale
}

/// At most [`MAX_RUNS`] runs: beyond that one run spans them all.
fn collapse(runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    match (runs.first(), runs.last()) {
        (Some(first), Some(last)) if runs.len() > MAX_RUNS => vec![(first.0, last.1)],
        _ => runs,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iommu::{Iova, IovaRange, Permissions};
    use vm_memory::GuestAddress;

    const RW: Permissions = Permissions::ReadWrite;

    fn seg(start: u64, end: u64, gpa: u64) -> Segment {
        Segment {
            start,
            end,
            gpa,
            perm: RW,
        }
    }

    /// Page-sized extents: IOVA page p maps to `map(p)`.
    fn pages(
        map: impl Fn(u64) -> Option<(u64, Permissions)>,
    ) -> impl FnMut(u64) -> Result<Extent, TranslateError> {
        move |iova| {
            let page = iova & !0xfff;
            let (gpa, perm) = map(page).ok_or(TranslateError::Unmapped { iova: Iova(iova) })?;
            Ok(Extent {
                iova: IovaRange::from_start_len(page, 0x1000).unwrap(),
                gpa: GuestAddress(gpa),
                perm,
            })
        }
    }

    #[test]
    fn only_pages_that_changed_are_reported() {
        // Identity-mapped 0x0..0x10000 was sent; now 0x7000 is gone, 0x8000
        // maps elsewhere, 0x9000 lost write permission.
        let now = pages(|p| match p {
            0x7000 => None,
            0x8000 => Some((0x50_0000, RW)),
            0x9000 => Some((0x9000, Permissions::Read)),
            p => Some((p, RW)),
        });
        let got = changed_runs(&[seg(0, 0xffff, 0)], &[], now);
        assert_eq!(got, vec![(0x7000, 0x9fff)]);
    }

    #[test]
    fn a_kept_page_or_a_ring_splits_runs_and_gaps_do_not() {
        let now = pages(|p| (p != 0x1000 && p != 0x3000 && p != 0x8000).then_some((p, RW)));
        let segs = [seg(0x1000, 0x3fff, 0x1000), seg(0x8000, 0x8fff, 0x8000)];
        // 0x2000 is kept: two runs. 0x4000..0x7fff is not recorded: merged.
        assert_eq!(
            changed_runs(&segs, &[], now),
            vec![(0x1000, 0x1fff), (0x3000, 0x8fff)]
        );
        let ring = VringArea {
            queue: 1,
            start: 0x5000,
            end: 0x5fff,
        };
        let now = pages(|p| (p != 0x1000 && p != 0x3000 && p != 0x8000).then_some((p, RW)));
        assert_eq!(
            changed_runs(&segs, &[ring], now),
            vec![(0x1000, 0x1fff), (0x3000, 0x3fff), (0x8000, 0x8fff)]
        );
    }

    #[test]
    fn no_context_means_the_whole_segment_changed() {
        let now = |_| {
            Err(TranslateError::NotAttached {
                rid: iommu::RequesterId::from_bdf(0, 8),
            })
        };
        let got = changed_runs(&[seg(0x1000, 0x40_0fff, 0)], &[], now);
        assert_eq!(got, vec![(0x1000, 0x40_0fff)]);
    }

    #[test]
    fn lookups_and_runs_are_bounded() {
        let mut calls = 0;
        let now = |iova: u64| {
            calls += 1;
            // Every other page kept: one run per changed page.
            pages(|p| ((p >> 12) % 2 == 0).then_some((p, RW)))(iova)
        };
        let got = changed_runs(&[seg(0, 0x1000_0000 - 1, 0)], &[], now);
        assert_eq!(calls, MAX_LOOKUPS);
        assert_eq!(got, vec![(0x1000, 0x1000_0000 - 1)]);
    }

    #[test]
    fn split_ring_areas_cover_dpdks_lengths() {
        let a = VringArea::split_ring(0, 256, 0x4000, 0x5000, 0x6000);
        assert_eq!(
            a.iter().map(|a| (a.start, a.end)).collect::<Vec<_>>(),
            vec![(0x4000, 0x4fff), (0x5000, 0x5205), (0x6000, 0x6805)]
        );
        assert!(a[1].overlaps(0x5205, 0x6000) && !a[1].overlaps(0x5206, 0x5fff));
    }
}
