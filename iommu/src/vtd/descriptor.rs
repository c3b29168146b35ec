//! Legacy (128-bit) queued-invalidation descriptors: decoding with reserved-bit checks, the
//! scopes shared with register-based invalidation (CCMD, IOTLB/IVA), and the address-range
//! math of page-selective (AM) and device-TLB (S bit) invalidations.

use super::invalidation::InvalidationError;
use super::regs::MAMV;
use super::tables::Context;
use super::WaitCompletion;
use crate::types::IovaRange;

/// Scope of a context-cache invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextScope {
    /// Every context entry.
    Global,
    /// The entries of one domain.
    Domain(u16),
    /// One device (SID with the low FM function bits ignored).
    Device {
        /// Domain id (informational).
        did: u16,
        /// Source id.
        sid: u16,
        /// Function mask (0..=3).
        fm: u8,
    },
}

impl ContextScope {
    pub(crate) fn selects(self, sid: u16, ctx: &Context) -> bool {
        match self {
            ContextScope::Global => true,
            ContextScope::Domain(did) => ctx.did == did,
            ContextScope::Device { sid: s, fm, .. } => {
                let ignore = fm_ignored_bits(fm);
                sid & !ignore == s & !ignore
            }
        }
    }

    /// The source ids a device-selective scope names (1, 2, 4 or 8 functions); empty for the
    /// other scopes.
    pub fn device_sids(self) -> Vec<u16> {
        let ContextScope::Device { sid, fm, .. } = self else {
            return Vec::new();
        };
        let ignore = fm_ignored_bits(fm);
        (0..=ignore)
            .filter(|f| f & !ignore == 0)
            .map(|f| (sid & !ignore) | f)
            .collect()
    }
}

/// The function-number bits of a SID that context-cache function mask `fm` ignores.
fn fm_ignored_bits(fm: u8) -> u16 {
    [0, 0b100, 0b110, 0b111][usize::from(fm & 3)]
}

/// Scope of an IOTLB invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbScope {
    /// Everything.
    Global,
    /// One domain.
    Domain(u16),
    /// `2^am` pages at `addr` in one domain.
    Page {
        /// Domain id.
        did: u16,
        /// Address (bits 63:12 of the descriptor).
        addr: u64,
        /// Address mask.
        am: u8,
        /// Invalidation hint (only leaves changed); ignored since only leaves are cached.
        ih: bool,
    },
}

/// A decoded descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// Type 1.
    ContextCache(ContextScope),
    /// Type 2.
    Iotlb(IotlbScope),
    /// Type 3.
    DeviceTlb {
        /// Source id of the device.
        sid: u16,
        /// The range to invalidate, decoded from ADDR and S.
        range: IovaRange,
        /// Max invalidations pending (0 = 32); informational.
        max_pending: u8,
    },
    /// Type 4: `None` = global, else (index, mask).
    InterruptEntryCache(Option<(u16, u8)>),
    /// Type 5.
    Wait(WaitCompletion),
}

/// Unit features the parser needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorCaps {
    /// ECAP.DT.
    pub device_tlb: bool,
}

/// `[addr, addr + 2^am pages)` with `addr` aligned down to that size; the full 64-bit range
/// when the size reaches 2^64.
pub fn psi_range(addr: u64, am: u8) -> IovaRange {
    aligned_range(addr, 12 + u32::from(am))
}

/// The device-TLB invalidation range: one page for S=0; for S=1, with k one bits from address bit 12
/// upwards, 2^(k+1) pages aligned to that size (the full range when that reaches 2^64).
pub fn device_tlb_range(addr: u64, size_bit: bool) -> IovaRange {
    if !size_bit {
        return aligned_range(addr, 12);
    }
    let ones = (addr >> 12).trailing_ones();
    aligned_range(addr, 12 + ones + 1)
}

fn aligned_range(addr: u64, shift: u32) -> IovaRange {
    if shift >= 64 {
        return IovaRange::FULL;
    }
    let mask = (1u64 << shift) - 1;
    IovaRange::new(addr & !mask, addr | mask).unwrap_or(IovaRange::FULL)
}

/// Decodes and validates one legacy descriptor.
pub fn parse_descriptor(
    qw0: u64,
    qw1: u64,
    caps: DescriptorCaps,
) -> Result<Descriptor, InvalidationError> {
    let desc_type = (qw0 & 0xf) as u8 | (((qw0 >> 9) & 7) as u8) << 4;
    let (rsv0, rsv1): (u64, u64) = match desc_type {
        1 => (0xfffc_0000_0000_f1c0, u64::MAX),
        2 => (0xffff_ffff_0000_f100, 0xf80),
        3 => (0x000f_0000_ffe0_01f0, 0xffe),
        4 => (0xffff_0000_07ff_f1e0, u64::MAX),
        5 => (0x0000_0000_ffff_f100, 0x3),
        _ => return Err(InvalidationError::UnknownType { desc_type }),
    };
    if qw0 & rsv0 != 0 || qw1 & rsv1 != 0 {
        return Err(InvalidationError::Reserved {
            desc_type,
            qw0,
            qw1,
        });
    }
    let granularity = ((qw0 >> 4) & 3) as u8;
    let did = (qw0 >> 16) as u16;
    match desc_type {
        1 => context_scope(
            granularity,
            did,
            (qw0 >> 32) as u16,
            ((qw0 >> 48) & 3) as u8,
        )
        .map(Descriptor::ContextCache),
        2 => iotlb_scope(granularity, did, qw1).map(Descriptor::Iotlb),
        3 if !caps.device_tlb => Err(InvalidationError::DeviceTlbUnsupported),
        3 => Ok(Descriptor::DeviceTlb {
            sid: (qw0 >> 32) as u16,
            range: device_tlb_range(qw1 & !0xfff, qw1 & 1 != 0),
            max_pending: ((qw0 >> 16) & 0x1f) as u8,
        }),
        4 => Ok(Descriptor::InterruptEntryCache(
            (qw0 & 0x10 != 0).then_some(((qw0 >> 32) as u16, ((qw0 >> 27) & 0x1f) as u8)),
        )),
        _ => Ok(Descriptor::Wait(WaitCompletion {
            status: (qw0 & 0x20 != 0).then_some((qw1 & !3, (qw0 >> 32) as u32)),
            interrupt: qw0 & 0x10 != 0,
            fence: qw0 & 0x40 != 0,
        })),
    }
}

/// The scope of a context-cache request with granularity `g` (CCMD.CIRG or descriptor G).
pub fn context_scope(g: u8, did: u16, sid: u16, fm: u8) -> Result<ContextScope, InvalidationError> {
    match g {
        1 => Ok(ContextScope::Global),
        2 => Ok(ContextScope::Domain(did)),
        3 => Ok(ContextScope::Device { did, sid, fm }),
        _ => Err(InvalidationError::Granularity { desc_type: 1 }),
    }
}

/// The scope of an IOTLB request with granularity `g`; `addr_word` is the descriptor's high
/// qword or the IVA register (ADDR 63:12, IH 6, AM 5:0).
pub fn iotlb_scope(g: u8, did: u16, addr_word: u64) -> Result<IotlbScope, InvalidationError> {
    match g {
        1 => Ok(IotlbScope::Global),
        2 => Ok(IotlbScope::Domain(did)),
        3 => {
            let am = (addr_word & 0x3f) as u8;
            if am > MAMV {
                return Err(InvalidationError::MaskTooLarge { am, mamv: MAMV });
            }
            Ok(IotlbScope::Page {
                did,
                addr: addr_word & !0xfff,
                am,
                ih: addr_word & 0x40 != 0,
            })
        }
        _ => Err(InvalidationError::Granularity { desc_type: 2 }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vtd::testutil::{cc_desc, devtlb_desc, iec_desc, iotlb_desc, wait_desc};

    fn range(start: u64, end: u64) -> IovaRange {
        IovaRange::new(start, end).unwrap()
    }

    const DT: DescriptorCaps = DescriptorCaps { device_tlb: true };

    fn parse((qw0, qw1): (u64, u64)) -> Result<Descriptor, InvalidationError> {
        parse_descriptor(qw0, qw1, DT)
    }

    #[test]
    fn parses_every_legacy_descriptor_type() {
        assert_eq!(
            parse(cc_desc(3, 4, 0x0108, 2)),
            Ok(Descriptor::ContextCache(ContextScope::Device {
                did: 4,
                sid: 0x0108,
                fm: 2
            }))
        );
        assert_eq!(
            parse(cc_desc(1, 0, 0, 0)),
            Ok(Descriptor::ContextCache(ContextScope::Global))
        );
        assert_eq!(
            parse(iotlb_desc(3, 9, 0x5000, 2, true)),
            Ok(Descriptor::Iotlb(IotlbScope::Page {
                did: 9,
                addr: 0x5000,
                am: 2,
                ih: true
            }))
        );
        assert_eq!(
            parse(iotlb_desc(2, 9, 0, 0, false)),
            Ok(Descriptor::Iotlb(IotlbScope::Domain(9)))
        );
        assert_eq!(
            parse(devtlb_desc(0x10, 0x3000, false)),
            Ok(Descriptor::DeviceTlb {
                sid: 0x10,
                range: range(0x3000, 0x3fff),
                max_pending: 0
            })
        );
        assert_eq!(
            parse(iec_desc(None)),
            Ok(Descriptor::InterruptEntryCache(None))
        );
        assert_eq!(
            parse(iec_desc(Some((0x20, 3)))),
            Ok(Descriptor::InterruptEntryCache(Some((0x20, 3))))
        );
        assert_eq!(
            parse(wait_desc(true, true, 2, 0x8004)),
            Ok(Descriptor::Wait(WaitCompletion {
                status: Some((0x8004, 2)),
                interrupt: true,
                fence: false
            }))
        );
    }

    #[test]
    fn drain_bits_and_pfsid_are_accepted() {
        let (qw0, qw1) = iotlb_desc(2, 1, 0, 0, false);
        assert!(parse((qw0 | 0xc0, qw1)).is_ok(), "DW/DR");
        let (qw0, qw1) = devtlb_desc(1, 0, false);
        assert!(
            parse((qw0 | 0xf000 | 0xfff << 52 | 5 << 16, qw1)).is_ok(),
            "PFSID, MIP"
        );
    }

    #[test]
    fn unknown_types_and_reserved_bits_are_rejected() {
        for t in [0u64, 6, 7, 8, 9, 0xf] {
            assert!(
                matches!(parse((t, 0)), Err(InvalidationError::UnknownType { .. })),
                "{t}"
            );
        }
        assert!(matches!(
            parse((2 | 1 << 4 | 1 << 9, 0)),
            Err(InvalidationError::UnknownType { .. })
        ));
        let reserved = [
            (cc_desc(1, 0, 0, 0).0 | 1 << 60, 0),
            (cc_desc(1, 0, 0, 0).0, 1),
            (iotlb_desc(1, 0, 0, 0, false).0 | 1 << 40, 0),
            (iotlb_desc(3, 0, 0, 0, false).0, 0x80),
            (devtlb_desc(0, 0, false).0, 2),
            (iec_desc(None).0 | 1 << 20, 0),
            (wait_desc(true, false, 0, 0).0 | 1 << 12, 0),
            (wait_desc(true, false, 0, 0).0, 1),
        ];
        for (qw0, qw1) in reserved {
            assert!(
                matches!(parse((qw0, qw1)), Err(InvalidationError::Reserved { .. })),
                "{qw0:#x} {qw1:#x}"
            );
        }
    }

    #[test]
    fn bad_granularity_mask_and_missing_dt_are_rejected() {
        assert!(matches!(
            parse(cc_desc(0, 0, 0, 0)),
            Err(InvalidationError::Granularity { .. })
        ));
        assert!(matches!(
            parse(iotlb_desc(0, 0, 0, 0, false)),
            Err(InvalidationError::Granularity { .. })
        ));
        assert_eq!(
            parse(iotlb_desc(3, 1, 0, 19, false)),
            Err(InvalidationError::MaskTooLarge { am: 19, mamv: 18 })
        );
        let (qw0, qw1) = devtlb_desc(1, 0, false);
        assert_eq!(
            parse_descriptor(qw0, qw1, DescriptorCaps { device_tlb: false }),
            Err(InvalidationError::DeviceTlbUnsupported)
        );
    }

    #[test]
    fn device_scope_names_masked_functions() {
        let scope = |sid, fm| ContextScope::Device { did: 0, sid, fm };
        assert_eq!(scope(0x0a, 0).device_sids(), vec![0x0a]);
        assert_eq!(scope(0x0a, 1).device_sids(), vec![0x0a, 0x0e]);
        assert_eq!(
            scope(0x0b, 3).device_sids(),
            (0x08..=0x0f).collect::<Vec<u16>>()
        );
        assert!(ContextScope::Global.device_sids().is_empty());
    }

    #[test]
    fn psi_range_math() {
        assert_eq!(psi_range(0x5000, 0), range(0x5000, 0x5fff));
        assert_eq!(psi_range(0x5000, 2), range(0x4000, 0x7fff), "aligned down");
        assert_eq!(psi_range(0x4000_0000, 18), range(0x4000_0000, 0x7fff_ffff));
        assert_eq!(
            psi_range(0xffff_ffff_ffff_f000, 0),
            range(0xffff_ffff_ffff_f000, u64::MAX)
        );
        assert_eq!(
            psi_range(0xffff_ffff_ffff_f000, 51),
            range(1 << 63, u64::MAX)
        );
        assert_eq!(psi_range(0x1234_5000, 52), IovaRange::FULL);
        assert_eq!(psi_range(0x1234_5000, 63), IovaRange::FULL);
    }

    #[test]
    fn device_tlb_size_encoding() {
        assert_eq!(device_tlb_range(0x5000, false), range(0x5000, 0x5fff));
        assert_eq!(
            device_tlb_range(0x4000, true),
            range(0x4000, 0x5fff),
            "no ones: 2 pages"
        );
        // Linux's mask m: addr |= (1 << (12 + m - 1)) - 1, here m = 2 (4 pages).
        assert_eq!(
            device_tlb_range(0x8000 | 0x1fff, true),
            range(0x8000, 0xbfff)
        );
        assert_eq!(
            device_tlb_range(0x7fff_ffff_ffff_f000, true),
            IovaRange::FULL
        );
        assert_eq!(
            device_tlb_range(0xffff_ffff_ffff_f000, true),
            IovaRange::FULL
        );
    }
}
