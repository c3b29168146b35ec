//! Parsing and executing virtio-iommu requests against [`Domains`], with no queue I/O.
//!
//! A request chain has a device-readable part (head + body) and a device-writable part (the
//! 4-byte tail, preceded by `probe_size` property bytes for PROBE). The caller passes the
//! readable bytes and the writable length; [`handle`] returns the status, the events to deliver
//! *before* completing the request, and the bytes to write at the start of the writable part
//! (the used length is `reply.len()`; 0 means "returned unwritten", which the driver treats as a
//! failure).

use std::sync::Mutex;

use vm_memory::GuestAddress;
use zerocopy::byteorder::little_endian::{U16, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::protocol::*;
use super::VirtioIommuSettings;
use crate::address_space::{AddressSpaceError, Mapping};
use crate::domain::{DomainError, Domains};
use crate::notifier::IommuEvent;
use crate::ratelimit::RateLimit;
use crate::sync::lock;
use crate::types::{permissions, DomainId, IovaRange, RequesterId, ReservedKind};
use crate::{debug_limited, warn_limited};

const TAIL_LEN: usize = std::mem::size_of::<VirtioIommuReqTail>();
const RESV_MEM_LEN: usize = std::mem::size_of::<VirtioIommuProbeResvMem>();

/// Most log lines per second about the driver's requests (bad requests can come in a loop).
static LOG_BUDGET: Mutex<RateLimit> = Mutex::new(RateLimit::per_second(10));

/// Why a request could not be parsed. The buffer is then returned unwritten (used length 0):
/// without a parsed request the device cannot know where a status would go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No readable bytes at all.
    #[error("request has no readable head; the driver must put the request head first")]
    Empty,
    /// The head names no known request type.
    #[error("unknown request type {0}; valid types are 1 (ATTACH) to 5 (PROBE)")]
    UnknownType(u8),
    /// The readable part is shorter than the request type needs.
    #[error("{name} request has {got} readable bytes but needs {need}")]
    TooShort {
        /// Request name.
        name: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes supplied.
        got: usize,
    },
}

/// A parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// ATTACH `endpoint` to `domain`.
    Attach {
        /// Domain.
        domain: DomainId,
        /// Endpoint.
        endpoint: RequesterId,
        /// `VIRTIO_IOMMU_ATTACH_F_*`.
        flags: u32,
        /// Whether the reserved bytes were zero (the device must reject otherwise).
        reserved_zero: bool,
    },
    /// DETACH `endpoint` from `domain`.
    Detach {
        /// Domain.
        domain: DomainId,
        /// Endpoint.
        endpoint: RequesterId,
    },
    /// MAP `[virt_start, virt_end]` to `phys_start`.
    Map {
        /// Domain.
        domain: DomainId,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
        /// GPA of `virt_start`.
        phys_start: u64,
        /// `VIRTIO_IOMMU_MAP_F_*`.
        flags: u32,
    },
    /// UNMAP `[virt_start, virt_end]`.
    Unmap {
        /// Domain.
        domain: DomainId,
        /// First IOVA.
        virt_start: u64,
        /// Last IOVA (inclusive).
        virt_end: u64,
    },
    /// PROBE `endpoint`.
    Probe {
        /// Endpoint.
        endpoint: RequesterId,
    },
}

fn read<T: FromBytes>(bytes: &[u8], name: &'static str) -> Result<T, RequestError> {
    T::read_from_prefix(bytes)
        .map(|(value, _)| value)
        .map_err(|_| RequestError::TooShort {
            name,
            need: std::mem::size_of::<T>(),
            got: bytes.len(),
        })
}

impl Request {
    /// Parses the device-readable part of a request. Trailing bytes are ignored (room for
    /// future extensions), reserved head bytes are ignored as the spec requires.
    pub fn parse(bytes: &[u8]) -> Result<Request, RequestError> {
        let head = bytes.first().ok_or(RequestError::Empty)?;
        match *head {
            VIRTIO_IOMMU_T_ATTACH => {
                let r: VirtioIommuReqAttach = read(bytes, "ATTACH")?;
                Ok(Request::Attach {
                    domain: DomainId(r.domain.get()),
                    endpoint: RequesterId::from_endpoint_id(r.endpoint.get()),
                    flags: r.flags.get(),
                    reserved_zero: r.reserved == [0; 4],
                })
            }
            VIRTIO_IOMMU_T_DETACH => {
                let r: VirtioIommuReqDetach = read(bytes, "DETACH")?;
                Ok(Request::Detach {
                    domain: DomainId(r.domain.get()),
                    endpoint: RequesterId::from_endpoint_id(r.endpoint.get()),
                })
            }
            VIRTIO_IOMMU_T_MAP => {
                let r: VirtioIommuReqMap = read(bytes, "MAP")?;
                Ok(Request::Map {
                    domain: DomainId(r.domain.get()),
                    virt_start: r.virt_start.get(),
                    virt_end: r.virt_end.get(),
                    phys_start: r.phys_start.get(),
                    flags: r.flags.get(),
                })
            }
            VIRTIO_IOMMU_T_UNMAP => {
                let r: VirtioIommuReqUnmap = read(bytes, "UNMAP")?;
                Ok(Request::Unmap {
                    domain: DomainId(r.domain.get()),
                    virt_start: r.virt_start.get(),
                    virt_end: r.virt_end.get(),
                })
            }
            VIRTIO_IOMMU_T_PROBE => {
                let r: VirtioIommuReqProbe = read(bytes, "PROBE")?;
                Ok(Request::Probe {
                    endpoint: RequesterId::from_endpoint_id(r.endpoint.get()),
                })
            }
            other => Err(RequestError::UnknownType(other)),
        }
    }
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    /// The status written into the tail; `None` when the buffer is returned unwritten.
    pub status: Option<u8>,
    /// Events to deliver (and wait for) before the request is completed to the guest.
    pub events: Vec<IommuEvent>,
    /// Bytes to write at the start of the writable part; the used length is their count.
    pub reply: Vec<u8>,
}

impl Response {
    fn unwritten() -> Self {
        Self::default()
    }

    fn with_tail(status: u8, events: Vec<IommuEvent>, tail_offset: usize) -> Self {
        let mut reply = vec![0u8; tail_offset];
        reply.extend_from_slice(tail(status).as_bytes());
        Self {
            status: Some(status),
            events,
            reply,
        }
    }
}

fn tail(status: u8) -> VirtioIommuReqTail {
    VirtioIommuReqTail {
        status,
        reserved: [0; 3],
    }
}

/// Parses and executes one request. See [`execute`].
pub fn handle(
    domains: &mut Domains,
    settings: &VirtioIommuSettings,
    acked_features: u64,
    readable: &[u8],
    writable_len: usize,
) -> Response {
    match Request::parse(readable) {
        Ok(req) => execute(domains, settings, acked_features, &req, writable_len),
        Err(e) => {
            debug_limited!(
                lock(&LOG_BUDGET),
                "virtio-iommu: returning request unwritten: {e}"
            );
            Response::unwritten()
        }
    }
}

/// Executes a parsed request. Nothing changes when the writable part cannot hold the tail.
pub fn execute(
    domains: &mut Domains,
    settings: &VirtioIommuSettings,
    acked_features: u64,
    req: &Request,
    writable_len: usize,
) -> Response {
    if writable_len < TAIL_LEN {
        debug_limited!(
            lock(&LOG_BUDGET),
            "virtio-iommu: writable part of {writable_len} bytes has no room for the tail"
        );
        return Response::unwritten();
    }
    let ctx = Ctx {
        settings,
        acked: acked_features,
    };
    let result = match *req {
        Request::Attach {
            domain,
            endpoint,
            flags,
            reserved_zero,
        } => execute_attach(domains, &ctx, domain, endpoint, flags, reserved_zero),
        Request::Detach { domain, endpoint } => {
            if settings.domain_in_range(domain.0) {
                domains.detach(endpoint, domain).map_err(status_of)
            } else {
                Err(S_RANGE)
            }
        }
        Request::Map { .. } | Request::Unmap { .. } if !ctx.acked(VIRTIO_IOMMU_F_MAP_UNMAP) => {
            Err(S_UNSUPP)
        }
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => execute_map(
            domains,
            &ctx,
            domain,
            (virt_start, virt_end),
            phys_start,
            flags,
        ),
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => execute_unmap(domains, settings, domain, virt_start, virt_end),
        Request::Probe { endpoint } => {
            return execute_probe(domains, settings, endpoint, writable_len)
        }
    };
    match result {
        Ok(events) => Response::with_tail(S_OK, events, 0),
        Err(status) => Response::with_tail(status, Vec::new(), 0),
    }
}

/// What request execution needs to know besides the model: settings and acked features.
struct Ctx<'a> {
    settings: &'a VirtioIommuSettings,
    acked: u64,
}

impl Ctx<'_> {
    fn acked(&self, bit: u32) -> bool {
        self.acked & (1u64 << bit) != 0
    }
}

fn execute_attach(
    domains: &mut Domains,
    ctx: &Ctx<'_>,
    domain: DomainId,
    endpoint: RequesterId,
    flags: u32,
    reserved_zero: bool,
) -> Result<Vec<IommuEvent>, u8> {
    let known = if ctx.acked(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
        VIRTIO_IOMMU_ATTACH_F_BYPASS
    } else {
        0
    };
    if !reserved_zero || flags & !known != 0 {
        return Err(S_INVAL);
    }
    if !ctx.settings.domain_in_range(domain.0) {
        return Err(S_RANGE);
    }
    let bypass = flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
    domains.attach(endpoint, domain, bypass).map_err(status_of)
}

fn execute_map(
    domains: &mut Domains,
    ctx: &Ctx<'_>,
    domain: DomainId,
    (virt_start, virt_end): (u64, u64),
    phys_start: u64,
    flags: u32,
) -> Result<Vec<IommuEvent>, u8> {
    let settings = ctx.settings;
    let mut known = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    if ctx.acked(VIRTIO_IOMMU_F_MMIO) {
        known |= VIRTIO_IOMMU_MAP_F_MMIO;
    }
    if flags & !known != 0 {
        return Err(S_INVAL);
    }
    if !settings.domain_in_range(domain.0) {
        return Err(S_RANGE);
    }
    let range = IovaRange::new(virt_start, virt_end).map_err(|_| S_RANGE)?;
    let g = settings.granule();
    // The granule is a power of two. `virt_end + 1` wraps to 0 for a mapping reaching
    // 2^64 - 1, which is aligned.
    let aligned = |x: u64| x & (g - 1) == 0;
    if !aligned(virt_start) || !aligned(phys_start) || !aligned(virt_end.wrapping_add(1)) {
        return Err(S_RANGE);
    }
    if !settings.effective_input_range().contains_range(range) {
        return Err(S_RANGE);
    }
    let perm = permissions(
        flags & VIRTIO_IOMMU_MAP_F_READ != 0,
        flags & VIRTIO_IOMMU_MAP_F_WRITE != 0,
    );
    let mapping = Mapping::new(range, GuestAddress(phys_start), perm)
        .map_err(|_| S_RANGE)?
        .with_mmio(flags & VIRTIO_IOMMU_MAP_F_MMIO != 0);
    domains.map(domain, mapping).map_err(status_of)
}

fn execute_unmap(
    domains: &mut Domains,
    settings: &VirtioIommuSettings,
    domain: DomainId,
    virt_start: u64,
    virt_end: u64,
) -> Result<Vec<IommuEvent>, u8> {
    if !settings.domain_in_range(domain.0) {
        return Err(S_RANGE);
    }
    let range = IovaRange::new(virt_start, virt_end).map_err(|_| S_RANGE)?;
    domains.unmap(domain, range).map_err(status_of)
}

fn execute_probe(
    domains: &Domains,
    settings: &VirtioIommuSettings,
    endpoint: RequesterId,
    writable_len: usize,
) -> Response {
    if !settings.offers(VIRTIO_IOMMU_F_PROBE) {
        return Response::unwritten();
    }
    let probe_size = usize::try_from(settings.probe_size).unwrap_or(usize::MAX);
    let room = writable_len - TAIL_LEN;
    let tail_offset = probe_size.min(room);
    if domains.endpoints().get(endpoint).is_none() {
        return Response::with_tail(S_NOENT, Vec::new(), tail_offset);
    }
    if room < probe_size {
        return Response::with_tail(S_INVAL, Vec::new(), tail_offset);
    }
    let mut resp = Response::with_tail(S_OK, Vec::new(), probe_size);
    let mut offset = 0;
    for region in domains.reserved_regions(endpoint) {
        if offset + RESV_MEM_LEN > probe_size {
            warn_limited!(
                lock(&LOG_BUDGET),
                "virtio-iommu: probe_size {probe_size} too small for all reserved regions"
            );
            break;
        }
        let prop = resv_mem_property(region.range, region.kind);
        resp.reply[offset..offset + RESV_MEM_LEN].copy_from_slice(prop.as_bytes());
        offset += RESV_MEM_LEN;
    }
    resp
}

fn resv_mem_property(range: IovaRange, kind: ReservedKind) -> VirtioIommuProbeResvMem {
    let subtype = match kind {
        ReservedKind::Reserved => VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
        ReservedKind::Msi => VIRTIO_IOMMU_RESV_MEM_T_MSI,
    };
    VirtioIommuProbeResvMem {
        head: VirtioIommuProbeProperty {
            type_: U16::new(VIRTIO_IOMMU_PROBE_T_RESV_MEM),
            length: U16::new((RESV_MEM_LEN - 4) as u16),
        },
        subtype,
        reserved: [0; 3],
        start: U64::new(range.start()),
        end: U64::new(range.end()),
    }
}

/// The virtio-iommu status for a model error.
pub fn status_of(err: DomainError) -> u8 {
    match err {
        DomainError::UnknownEndpoint(_) | DomainError::UnknownDomain(_) => S_NOENT,
        DomainError::NotAttachedTo { .. }
        | DomainError::BypassMismatch { .. }
        | DomainError::BypassDomain(_)
        | DomainError::ReservedOverlap { .. } => S_INVAL,
        DomainError::TooManyEndpoints { .. }
        | DomainError::TooManyDomains { .. }
        | DomainError::TooManyMappings { .. } => S_NOMEM,
        DomainError::Mapping(m) => match m {
            AddressSpaceError::Overlap { .. } => S_INVAL,
            AddressSpaceError::WouldSplit { .. } | AddressSpaceError::GpaOverflow { .. } => S_RANGE,
            AddressSpaceError::TooManyMappings { .. } => S_NOMEM,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use zerocopy::byteorder::little_endian::U32;

    use super::*;
    use crate::domain::DomainsConfig;
    use crate::notifier::{IommuNotifier, NotifierFlags, NotifierSet, NotifyError, UnmapKind};
    use crate::translate::DmaTranslate;
    use crate::types::{Iova, Permissions};
    use crate::virtio::DEFAULT_FEATURES;

    const R: u32 = VIRTIO_IOMMU_MAP_F_READ;

    /// A device with endpoint 0 registered, driven like a driver that acked every default
    /// feature.
    struct Dev {
        domains: Domains,
        settings: VirtioIommuSettings,
        acked: u64,
    }

    impl Dev {
        fn new(settings: VirtioIommuSettings) -> Self {
            let mut domains = Domains::new(DomainsConfig::default());
            domains
                .add_endpoint(RequesterId::from_endpoint_id(0))
                .unwrap();
            Self {
                domains,
                settings,
                acked: DEFAULT_FEATURES,
            }
        }

        /// QEMU's test maps byte ranges such as [0, 4]; a byte granule makes them legal.
        fn byte_granule() -> Self {
            Self::new(VirtioIommuSettings {
                page_size_mask: u64::MAX,
                ..Default::default()
            })
        }

        fn send(&mut self, readable: &[u8]) -> Response {
            handle(
                &mut self.domains,
                &self.settings,
                self.acked,
                readable,
                TAIL_LEN,
            )
        }

        fn status(&mut self, readable: &[u8]) -> u8 {
            let resp = self.send(readable);
            assert_eq!(resp.reply.len(), TAIL_LEN);
            assert_eq!(
                &resp.reply[1..],
                &[0, 0, 0],
                "tail reserved bytes must be zero"
            );
            assert_eq!(Some(resp.reply[0]), resp.status);
            resp.reply[0]
        }

        fn attach(&mut self, domain: u32, ep: u32) -> u8 {
            self.status(&attach_req(domain, ep, 0))
        }

        fn detach(&mut self, domain: u32, ep: u32) -> u8 {
            self.status(&detach_req(domain, ep))
        }

        fn map(&mut self, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> u8 {
            self.status(&map_req(domain, start, end, phys, flags))
        }

        fn unmap(&mut self, domain: u32, start: u64, end: u64) -> u8 {
            self.status(&unmap_req(domain, start, end))
        }

        fn mappings(&self, domain: u32) -> Vec<(u64, u64)> {
            self.domains
                .domain(DomainId(domain))
                .map(|d| {
                    d.address_space()
                        .iter()
                        .map(|m| (m.range().start(), m.range().end()))
                        .collect()
                })
                .unwrap_or_default()
        }
    }

    fn head(type_: u8) -> VirtioIommuReqHead {
        VirtioIommuReqHead {
            type_,
            reserved: [0; 3],
        }
    }

    fn attach_req(domain: u32, endpoint: u32, flags: u32) -> Vec<u8> {
        VirtioIommuReqAttach {
            head: head(VIRTIO_IOMMU_T_ATTACH),
            domain: U32::new(domain),
            endpoint: U32::new(endpoint),
            flags: U32::new(flags),
            reserved: [0; 4],
        }
        .as_bytes()
        .to_vec()
    }

    fn detach_req(domain: u32, endpoint: u32) -> Vec<u8> {
        VirtioIommuReqDetach {
            head: head(VIRTIO_IOMMU_T_DETACH),
            domain: U32::new(domain),
            endpoint: U32::new(endpoint),
            reserved: [0; 8],
        }
        .as_bytes()
        .to_vec()
    }

    fn map_req(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
        VirtioIommuReqMap {
            head: head(VIRTIO_IOMMU_T_MAP),
            domain: U32::new(domain),
            virt_start: U64::new(start),
            virt_end: U64::new(end),
            phys_start: U64::new(phys),
            flags: U32::new(flags),
        }
        .as_bytes()
        .to_vec()
    }

    fn unmap_req(domain: u32, start: u64, end: u64) -> Vec<u8> {
        VirtioIommuReqUnmap {
            head: head(VIRTIO_IOMMU_T_UNMAP),
            domain: U32::new(domain),
            virt_start: U64::new(start),
            virt_end: U64::new(end),
            reserved: [0; 4],
        }
        .as_bytes()
        .to_vec()
    }

    fn probe_req(endpoint: u32) -> Vec<u8> {
        VirtioIommuReqProbe {
            head: head(VIRTIO_IOMMU_T_PROBE),
            endpoint: U32::new(endpoint),
            reserved: [0; 64],
        }
        .as_bytes()
        .to_vec()
    }

    #[test]
    fn qemu_attach_detach_status_matrix() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        assert_eq!(d.attach(0, 0), S_OK);
        assert_eq!(
            d.attach(0, 444),
            S_NOENT,
            "attach of a non-existing endpoint"
        );
        assert_eq!(d.detach(0, 1), S_NOENT, "detach of a non-existing endpoint");
        assert_eq!(d.attach(1, 0), S_OK, "move ep0 from domain 0 to domain 1");
        assert_eq!(d.detach(0, 0), S_INVAL, "ep0 is no longer in domain 0");
        assert_eq!(d.detach(1, 0), S_OK);
        assert_eq!(d.attach(1, 0), S_OK);
        assert_eq!(d.map(1, 0x0, 0xfff, 0xa1000, R), S_OK);
        assert_eq!(d.map(1, 0x2000, 0x2fff, 0xb1000, R), S_OK);
        assert_eq!(d.detach(1, 0), S_OK);
        assert!(
            d.domains.domain(DomainId(1)).is_none(),
            "empty domain is freed"
        );
    }

    #[test]
    fn qemu_map_unmap_status_matrix_and_spec_sequences() {
        let mut d = Dev::byte_granule();
        assert_eq!(d.attach(1, 0), S_OK);
        assert_eq!(d.map(0, 0, 0xfff, 0xa1000, R), S_NOENT);
        assert_eq!(d.map(1, 0, 0xfff, 0xa1000, R), S_OK);
        assert_eq!(d.map(1, 0, 0xffff, 0xb1000, R), S_INVAL, "overlap");
        assert_eq!(d.unmap(4, 0x10, 0xfff), S_NOENT);
        assert_eq!(d.unmap(1, 0x10, 0xfff), S_RANGE, "partial unmap");
        assert_eq!(d.unmap(1, 0, 0x1000), S_OK);
        // Spec example sequences.
        assert_eq!(d.unmap(1, 0, 4), S_OK); // (1)
        assert_eq!(d.map(1, 0, 9, 0xa1000, R), S_OK); // (2)
        assert_eq!(d.unmap(1, 0, 9), S_OK);
        assert_eq!(d.map(1, 0, 4, 0xb1000, R), S_OK); // (3)
        assert_eq!(d.map(1, 5, 9, 0xb2000, R), S_OK);
        assert_eq!(d.unmap(1, 0, 9), S_OK);
        assert_eq!(d.map(1, 0, 9, 0xc1000, R), S_OK); // (4)
        assert_eq!(d.unmap(1, 0, 4), S_RANGE);
        assert_eq!(d.unmap(1, 0, 10), S_OK);
        assert_eq!(d.map(1, 0, 4, 0xd1000, R), S_OK); // (5)
        assert_eq!(d.map(1, 5, 9, 0xd2000, R), S_OK);
        assert_eq!(d.unmap(1, 0, 4), S_OK);
        assert_eq!(d.unmap(1, 5, 9), S_OK);
        assert_eq!(d.map(1, 0, 4, 0xe2000, R), S_OK); // (6)
        assert_eq!(d.unmap(1, 0, 9), S_OK);
        assert_eq!(d.map(1, 0, 4, 0xf2000, R), S_OK); // (7)
        assert_eq!(d.map(1, 10, 14, 0xf3000, R), S_OK);
        assert_eq!(d.unmap(1, 0, 14), S_OK);
        assert_eq!(d.map(1, 10, 14, 0xf3000, R), S_OK);
        assert_eq!(d.map(1, 0, 4, 0xf2000, R), S_OK);
        assert_eq!(d.unmap(1, 0, 4), S_OK, "only unmaps [0,4]");
        assert_eq!(
            d.map(1, 10, 14, 0xf3000, R),
            S_INVAL,
            "[10,14] is still mapped"
        );
    }

    /// The seven UNMAP examples of the virtio spec, each from a blank address space, scaled
    /// to the default 4 KiB granule (unit `P`), checking the mappings left behind.
    #[test]
    fn seven_spec_unmap_examples_at_page_granule() {
        const P: u64 = 0x1000;
        let span = |a: u64, b: u64| (a * P, (b + 1) * P - 1);
        type Step = (&'static [(u64, u64)], (u64, u64), u8, &'static [(u64, u64)]);
        let examples: [Step; 7] = [
            (&[], (0, 4), S_OK, &[]),
            (&[(0, 9)], (0, 9), S_OK, &[]),
            (&[(0, 4), (5, 9)], (0, 9), S_OK, &[]),
            (&[(0, 9)], (0, 4), S_RANGE, &[(0, 9)]),
            (&[(0, 4), (5, 9)], (0, 4), S_OK, &[(5, 9)]),
            (&[(0, 4)], (0, 9), S_OK, &[]),
            (&[(0, 4), (10, 14)], (0, 14), S_OK, &[]),
        ];
        for (i, (maps, unmap, status, left)) in examples.iter().enumerate() {
            let mut d = Dev::new(VirtioIommuSettings::default());
            assert_eq!(d.attach(1, 0), S_OK);
            for &(a, b) in maps.iter() {
                let (s, e) = span(a, b);
                assert_eq!(d.map(1, s, e, 0x10_0000 + s, R), S_OK, "example {}", i + 1);
            }
            let (s, e) = span(unmap.0, unmap.1);
            assert_eq!(d.unmap(1, s, e), *status, "example {}", i + 1);
            let expect: Vec<(u64, u64)> = left.iter().map(|&(a, b)| span(a, b)).collect();
            assert_eq!(d.mappings(1), expect, "example {}", i + 1);
        }
    }

    #[test]
    fn map_checks_alignment_input_range_and_phys_overflow() {
        let settings = VirtioIommuSettings {
            input_range: IovaRange::new(0, 0xffff_ffff).unwrap(),
            ..Default::default()
        };
        let mut d = Dev::new(settings);
        assert_eq!(d.attach(1, 0), S_OK);
        assert_eq!(d.map(1, 0x10, 0x100f, 0, R), S_RANGE, "unaligned start");
        assert_eq!(d.map(1, 0x1000, 0x1fff, 0x10, R), S_RANGE, "unaligned phys");
        assert_eq!(d.map(1, 0x1000, 0x1ffe, 0, R), S_RANGE, "unaligned end + 1");
        assert_eq!(d.map(1, 0x2000, 0x1fff, 0, R), S_RANGE, "end before start");
        assert_eq!(
            d.map(1, 0xffff_f000, 0x1_0000_0fff, 0, R),
            S_RANGE,
            "beyond input range"
        );
        assert_eq!(
            d.map(1, 0x1000, 0x2fff, u64::MAX - 0xfff, R),
            S_RANGE,
            "GPA overflow"
        );
        assert_eq!(d.map(1, 0x1000, 0x1fff, 0, R), S_OK);
    }

    #[test]
    fn full_64_bit_map_is_legal_without_input_range() {
        let mut d = Dev::new(VirtioIommuSettings {
            features: DEFAULT_FEATURES & !(1 << VIRTIO_IOMMU_F_INPUT_RANGE),
            ..Default::default()
        });
        assert_eq!(d.attach(1, 0), S_OK);
        // The MSI window is reserved, so map the two halves around it (as Linux does).
        assert_eq!(
            d.map(1, 0, 0xfedf_ffff, 0, R | VIRTIO_IOMMU_MAP_F_WRITE),
            S_OK
        );
        assert_eq!(d.map(1, 0xfef0_0000, u64::MAX, 0xfef0_0000, R), S_OK);
        assert_eq!(d.unmap(1, 0, u64::MAX), S_OK);
        assert!(d.mappings(1).is_empty());
    }

    #[test]
    fn flags_validation() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        assert_eq!(d.attach(1, 0), S_OK);
        assert_eq!(d.map(1, 0, 0xfff, 0, 1 << 3), S_INVAL, "unknown MAP flag");
        d.acked &= !(1 << VIRTIO_IOMMU_F_MMIO);
        assert_eq!(
            d.map(1, 0, 0xfff, 0, VIRTIO_IOMMU_MAP_F_MMIO),
            S_INVAL,
            "MMIO not acked"
        );
        d.acked |= 1 << VIRTIO_IOMMU_F_MMIO;
        assert_eq!(d.map(1, 0, 0xfff, 0, VIRTIO_IOMMU_MAP_F_MMIO), S_OK);
        assert_eq!(
            d.status(&attach_req(2, 0, 1 << 1)),
            S_INVAL,
            "unknown ATTACH flag"
        );
        d.acked &= !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);
        assert_eq!(
            d.status(&attach_req(2, 0, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
            S_INVAL,
            "bypass flag without BYPASS_CONFIG"
        );
        assert_eq!(
            d.domains.endpoint_domain(RequesterId::from_endpoint_id(0)),
            Some(DomainId(1))
        );
    }

    #[test]
    fn reserved_fields() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        let mut att = attach_req(1, 0, 0);
        att[19] = 1;
        assert_eq!(d.status(&att), S_INVAL, "ATTACH reserved must be zero");
        assert_eq!(d.attach(1, 0), S_OK);
        let mut det = detach_req(1, 0);
        det[12] = 0xff;
        det[1] = 0xff; // head reserved: ignored too
        let mut unm = unmap_req(1, 0, 0xfff);
        unm[27] = 0xff;
        assert_eq!(d.status(&unm), S_OK, "UNMAP reserved is ignored");
        assert_eq!(d.status(&det), S_OK, "DETACH reserved is ignored");
    }

    #[test]
    fn domain_range_is_enforced() {
        let mut d = Dev::new(VirtioIommuSettings {
            domain_range: (1, 100),
            ..Default::default()
        });
        assert_eq!(d.attach(0, 0), S_RANGE);
        assert_eq!(d.attach(101, 0), S_RANGE);
        assert_eq!(d.attach(100, 0), S_OK);
        assert_eq!(d.map(200, 0, 0xfff, 0, R), S_RANGE);
        assert_eq!(d.unmap(200, 0, 0xfff), S_RANGE);
        assert_eq!(d.detach(200, 0), S_RANGE);
    }

    #[test]
    fn map_unmap_without_feature_is_unsupported() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        assert_eq!(d.attach(1, 0), S_OK);
        d.acked &= !(1 << VIRTIO_IOMMU_F_MAP_UNMAP);
        assert_eq!(d.map(1, 0, 0xfff, 0, R), S_UNSUPP);
        assert_eq!(d.unmap(1, 0, 0xfff), S_UNSUPP);
    }

    #[test]
    fn bypass_attach_with_feature_gives_identity_and_refuses_map() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        let bypass = VIRTIO_IOMMU_ATTACH_F_BYPASS;
        assert_eq!(d.status(&attach_req(1, 0, bypass)), S_OK);
        let rid = RequesterId::from_endpoint_id(0);
        let t = d
            .domains
            .translate(rid, Iova(0x5000), 8, Permissions::Write)
            .unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0x5000), 8)]);
        assert_eq!(d.map(1, 0, 0xfff, 0, R), S_INVAL);
        assert_eq!(d.unmap(1, 0, 0xfff), S_INVAL);
        assert_eq!(d.attach(1, 0), S_INVAL, "bypass flag must match the domain");
    }

    #[test]
    fn probe_reports_the_x86_msi_window_and_zero_fills() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        let writable = 512 + TAIL_LEN;
        let resp = handle(
            &mut d.domains,
            &d.settings,
            d.acked,
            &probe_req(0),
            writable,
        );
        assert_eq!(resp.status, Some(S_OK));
        assert_eq!(resp.reply.len(), writable);
        let prop = VirtioIommuProbeResvMem::read_from_prefix(&resp.reply)
            .unwrap()
            .0;
        assert_eq!(
            prop.head.type_.get() & VIRTIO_IOMMU_PROBE_T_MASK,
            VIRTIO_IOMMU_PROBE_T_RESV_MEM
        );
        assert_eq!(prop.head.length.get(), 20);
        assert_eq!(prop.subtype, VIRTIO_IOMMU_RESV_MEM_T_MSI);
        assert_eq!(
            (prop.start.get(), prop.end.get()),
            (0xFEE0_0000, 0xFEEF_FFFF)
        );
        assert!(resp.reply[RESV_MEM_LEN..512].iter().all(|&b| b == 0));
        assert_eq!(&resp.reply[512..], &[S_OK, 0, 0, 0]);
    }

    #[test]
    fn probe_errors() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        let resp = handle(&mut d.domains, &d.settings, d.acked, &probe_req(7), 516);
        assert_eq!(resp.status, Some(S_NOENT));
        assert_eq!(resp.reply[512], S_NOENT);
        let resp = handle(&mut d.domains, &d.settings, d.acked, &probe_req(0), 100);
        assert_eq!(
            resp.status,
            Some(S_INVAL),
            "properties shorter than probe_size"
        );
        assert_eq!(resp.reply.len(), 100);
        assert!(
            resp.reply[..96].iter().all(|&b| b == 0),
            "no property written"
        );
        assert_eq!(
            resp.reply[96], S_INVAL,
            "tail at the end of the writable part"
        );
        d.settings.features &= !(1 << VIRTIO_IOMMU_F_PROBE);
        let resp = handle(&mut d.domains, &d.settings, d.acked, &probe_req(0), 516);
        assert_eq!(
            resp,
            Response::default(),
            "PROBE not offered: returned unwritten"
        );
    }

    #[test]
    fn malformed_requests_are_returned_unwritten_without_side_effects() {
        let mut d = Dev::new(VirtioIommuSettings::default());
        assert_eq!(d.send(&[]), Response::default());
        assert_eq!(d.send(&[9, 0, 0, 0]), Response::default(), "unknown type");
        assert_eq!(
            d.send(&attach_req(1, 0, 0)[..19]),
            Response::default(),
            "short ATTACH"
        );
        let att = attach_req(1, 0, 0);
        let resp = handle(&mut d.domains, &d.settings, d.acked, &att, 3);
        assert_eq!(resp, Response::default(), "no room for the tail");
        assert_eq!(d.domains.domain_count(), 0, "nothing executed");
        assert_eq!(Request::parse(&[9]), Err(RequestError::UnknownType(9)));
        assert!(matches!(
            Request::parse(&unmap_req(1, 0, 1)[..20]),
            Err(RequestError::TooShort {
                name: "UNMAP",
                need: 28,
                got: 20
            })
        ));
    }

    #[test]
    fn unmap_events_reach_a_consumer_registered_through_the_fallback() {
        #[derive(Default)]
        struct Backend(Mutex<Vec<IommuEvent>>);
        impl IommuNotifier for Backend {
            fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError> {
                self.0.lock().unwrap().push(ev.clone());
                Ok(())
            }
        }
        let mut d = Dev::new(VirtioIommuSettings::default());
        let rid = RequesterId::from_endpoint_id(0);
        let mut set = NotifierSet::new(NotifierFlags::MAP | NotifierFlags::UNMAP);
        let backend = Arc::new(Backend::default());
        let (_, kind) = set
            .register_with_fallback(rid, NotifierFlags::NONE, backend.clone())
            .unwrap();
        assert_eq!(kind, UnmapKind::Iotlb, "virtio-iommu has no device TLB");
        for req in [
            attach_req(1, 0, 0),
            map_req(1, 0x4000, 0x5fff, 0x8000, R),
            unmap_req(1, 0, 0xffff),
        ] {
            let resp = d.send(&req);
            assert_eq!(resp.status, Some(S_OK));
            set.dispatch_all(&resp.events).unwrap();
        }
        let unmap = IommuEvent::Unmap {
            rid,
            range: IovaRange::new(0x4000, 0x5fff).unwrap(),
        };
        assert_eq!(backend.0.lock().unwrap().as_slice(), &[unmap]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_reply_fits(
            bytes in proptest::collection::vec(any::<u8>(), 0..96),
            type_ in 0u8..7,
            writable in 0usize..600,
        ) {
            let mut d = Dev::new(VirtioIommuSettings::default());
            let mut req = bytes;
            if let Some(first) = req.first_mut() {
                *first = type_;
            }
            let resp = handle(&mut d.domains, &d.settings, d.acked, &req, writable);
            prop_assert!(resp.reply.len() <= writable);
            prop_assert_eq!(resp.status.is_some(), !resp.reply.is_empty());
        }
    }
}
