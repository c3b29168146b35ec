//! Hostile-guest fuzzing of the virtio-iommu request parser and executor (proptest, bounded so
//! it runs in a few seconds): arbitrary bytes and arbitrary sequences of valid-looking requests
//! never panic, the reply always fits the writable part, and the model invariants hold after
//! every request (mappings aligned, disjoint, outside reserved regions and translatable; domains
//! exist only while they have endpoints; the mapping count matches; UNMAP events cover exactly
//! what was removed).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use iommu::virtio::protocol::*;
use iommu::virtio::{handle, Request, Response, VirtioIommuSettings, DEFAULT_FEATURES};
use iommu::{
    DmaTranslate, DomainId, Domains, DomainsConfig, IommuEvent, Iova, IovaRange, Permissions,
    RequesterId,
};

const TAIL_LEN: usize = 4;
const ENDPOINTS: u32 = 3;

fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn head(t: u8) -> VirtioIommuReqHead {
    VirtioIommuReqHead {
        type_: t,
        reserved: [0; 3],
    }
}

/// A request shaped like what a driver sends, with fields drawn from small pools so that
/// requests hit each other (same domains, overlapping ranges) and from extreme values.
#[derive(Debug, Clone)]
enum Op {
    Attach {
        domain: u32,
        ep: u32,
        flags: u32,
    },
    Detach {
        domain: u32,
        ep: u32,
    },
    Map {
        domain: u32,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
    },
    Unmap {
        domain: u32,
        start: u64,
        end: u64,
    },
    Probe {
        ep: u32,
    },
    Garbage(Vec<u8>),
}

impl Op {
    fn bytes(&self) -> Vec<u8> {
        match *self {
            Op::Attach { domain, ep, flags } => VirtioIommuReqAttach {
                head: head(VIRTIO_IOMMU_T_ATTACH),
                domain: U32::new(domain),
                endpoint: U32::new(ep),
                flags: U32::new(flags),
                reserved: [0; 4],
            }
            .as_bytes()
            .to_vec(),
            Op::Detach { domain, ep } => VirtioIommuReqDetach {
                head: head(VIRTIO_IOMMU_T_DETACH),
                domain: U32::new(domain),
                endpoint: U32::new(ep),
                reserved: [0; 8],
            }
            .as_bytes()
            .to_vec(),
            Op::Map {
                domain,
                start,
                end,
                phys,
                flags,
            } => VirtioIommuReqMap {
                head: head(VIRTIO_IOMMU_T_MAP),
                domain: U32::new(domain),
                virt_start: U64::new(start),
                virt_end: U64::new(end),
                phys_start: U64::new(phys),
                flags: U32::new(flags),
            }
            .as_bytes()
            .to_vec(),
            Op::Unmap { domain, start, end } => VirtioIommuReqUnmap {
                head: head(VIRTIO_IOMMU_T_UNMAP),
                domain: U32::new(domain),
                virt_start: U64::new(start),
                virt_end: U64::new(end),
                reserved: [0; 4],
            }
            .as_bytes()
            .to_vec(),
            Op::Probe { ep } => VirtioIommuReqProbe {
                head: head(VIRTIO_IOMMU_T_PROBE),
                endpoint: U32::new(ep),
                reserved: [0; 64],
            }
            .as_bytes()
            .to_vec(),
            Op::Garbage(ref b) => b.clone(),
        }
    }
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..64).prop_map(|p| p * 0x1000),
        2 => (0u64..64).prop_map(|p| p * 0x1000 + 0xfff),
        1 => Just(0xfee0_0000u64),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 0xfff),
        1 => Just((1u64 << 48) - 1),
        1 => any::<u64>(),
    ]
}

/// Mostly page-aligned ranges of 1-16 pages in a small window, so requests overlap.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        6 => (0u64..48, 1u64..16).prop_map(|(p, n)| (p * 0x1000, (p + n) * 0x1000 - 1)),
        1 => (0u64..48, 1u64..16).prop_map(|(p, n)| (p * 0x1000, (p + n) * 0x1000)),
        2 => (addr(), addr()),
    ]
}

fn domain() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0u32..4, 1 => Just(u32::MAX)]
}

fn endpoint() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0u32..ENDPOINTS + 1, 1 => any::<u32>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (domain(), endpoint(), prop_oneof![6 => Just(0u32), 1 => Just(1), 1 => any::<u32>()])
            .prop_map(|(domain, ep, flags)| Op::Attach { domain, ep, flags }),
        1 => (domain(), endpoint()).prop_map(|(domain, ep)| Op::Detach { domain, ep }),
        6 => (domain(), range(), addr(), prop_oneof![6 => 1u32..8, 1 => any::<u32>()]).prop_map(
            |(domain, (start, end), phys, flags)| Op::Map {
                domain,
                start,
                end,
                phys,
                flags
            }
        ),
        4 => (domain(), range()).prop_map(|(domain, (start, end))| Op::Unmap {
            domain,
            start,
            end
        }),
        1 => endpoint().prop_map(|ep| Op::Probe { ep }),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Op::Garbage),
    ]
}

struct Model {
    domains: Domains,
    settings: VirtioIommuSettings,
    acked: u64,
}

impl Model {
    fn new(acked: u64) -> Self {
        let mut domains = Domains::new(DomainsConfig::default());
        for ep in 0..ENDPOINTS {
            domains
                .add_endpoint(RequesterId::from_endpoint_id(ep))
                .unwrap();
        }
        Model {
            domains,
            settings: VirtioIommuSettings::default(),
            acked,
        }
    }

    fn mappings(&self, d: DomainId) -> Vec<(IovaRange, u64)> {
        self.domains.domain(d).map_or(Vec::new(), |dom| {
            dom.address_space()
                .iter()
                .map(|m| (m.range(), m.gpa().0))
                .collect()
        })
    }
}

/// The reply's shape: bounded, tail at the end, status iff written.
fn check_reply(resp: &Response, writable: usize) -> Result<(), TestCaseError> {
    prop_assert!(resp.reply.len() <= writable);
    prop_assert_eq!(resp.status.is_some(), !resp.reply.is_empty());
    if let Some(status) = resp.status {
        prop_assert!(resp.reply.len() >= TAIL_LEN);
        let tail = &resp.reply[resp.reply.len() - TAIL_LEN..];
        prop_assert_eq!(tail, &[status, 0, 0, 0][..]);
        prop_assert!(status <= S_NOMEM);
        if status != S_OK {
            prop_assert!(resp.events.is_empty(), "failed request emitted events");
        }
    }
    Ok(())
}

/// Invariants of the whole model.
fn check_model(m: &Model) -> Result<(), TestCaseError> {
    let g = m.settings.granule();
    let mut total = 0;
    for ep in 0..ENDPOINTS {
        let rid = RequesterId::from_endpoint_id(ep);
        let Some(d) = m.domains.endpoint_domain(rid) else {
            continue;
        };
        let dom = m.domains.domain(d);
        prop_assert!(dom.is_some(), "endpoint attached to a missing domain");
        prop_assert!(dom.unwrap().endpoints().any(|e| e == rid));
        for (range, gpa) in m.mappings(d) {
            // MMIO mappings translate too; permissions may be NONE, so ask for nothing.
            let t = m
                .domains
                .translate(rid, Iova(range.start()), 1, Permissions::No);
            if let Ok(t) = t {
                prop_assert_eq!(t.fragments[0].0 .0, gpa);
            }
        }
    }
    for id in [0, 1, 2, 3, u32::MAX] {
        let Some(dom) = m.domains.domain(DomainId(id)) else {
            continue;
        };
        prop_assert!(dom.endpoints().count() > 0, "empty domain {id} kept");
        let maps = m.mappings(DomainId(id));
        total += maps.len();
        for w in maps.windows(2) {
            prop_assert!(w[0].0.end() < w[1].0.start(), "overlap {:?}", w);
        }
        for (range, gpa) in maps {
            prop_assert_eq!(range.start() % g, 0);
            prop_assert_eq!(gpa % g, 0);
            prop_assert_eq!(range.end().wrapping_add(1) % g, 0);
            prop_assert!(m.settings.effective_input_range().contains_range(range));
            for r in m.domains.reserved_regions(RequesterId::from_endpoint_id(0)) {
                prop_assert!(!r.range.intersects(range));
            }
        }
    }
    prop_assert_eq!(m.domains.total_mappings(), total);
    Ok(())
}

/// Checks what an UNMAP changed: removed = mappings inside the range; the events cover them.
fn check_unmap(
    before: &[(IovaRange, u64)],
    after: &[(IovaRange, u64)],
    range: IovaRange,
    resp: &Response,
) -> Result<(), TestCaseError> {
    if resp.status != Some(S_OK) {
        prop_assert_eq!(before, after, "failed UNMAP changed the domain");
        return Ok(());
    }
    let kept: Vec<_> = before
        .iter()
        .filter(|(r, _)| !range.contains_range(*r))
        .copied()
        .collect();
    prop_assert_eq!(&kept, after);
    let removed: Vec<_> = before
        .iter()
        .filter(|(r, _)| range.contains_range(*r))
        .collect();
    for ev in &resp.events {
        match ev {
            IommuEvent::Unmap {
                range: ev_range, ..
            } => {
                for (r, _) in &removed {
                    prop_assert!(ev_range.contains_range(*r));
                }
                prop_assert!(range.contains_range(*ev_range));
            }
            other => prop_assert!(false, "UNMAP emitted {:?}", other),
        }
    }
    Ok(())
}

fn run(m: &mut Model, op: &Op, writable: usize) -> Result<(), TestCaseError> {
    let req = op.bytes();
    let unmap = match *op {
        Op::Unmap { domain, start, end } => IovaRange::new(start, end)
            .ok()
            .map(|r| (DomainId(domain), r, m.mappings(DomainId(domain)))),
        _ => None,
    };
    let resp = handle(&mut m.domains, &m.settings, m.acked, &req, writable);
    check_reply(&resp, writable)?;
    if Request::parse(&req).is_err() {
        prop_assert_eq!(&resp, &Response::default());
    }
    if let Some((d, range, before)) = unmap {
        check_unmap(&before, &m.mappings(d), range, &resp)?;
    }
    if let (Op::Map { flags, .. }, Some(S_OK)) = (op, resp.status) {
        let mmio = flags & VIRTIO_IOMMU_MAP_F_MMIO != 0;
        prop_assert!(resp.events.len() <= ENDPOINTS as usize);
        prop_assert!(!mmio || resp.events.is_empty());
    }
    check_model(m)
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn arbitrary_request_sequences_keep_the_model_consistent(
        ops in proptest::collection::vec((op(), prop_oneof![6 => Just(4usize), 1 => 0usize..8, 1 => 500usize..600]), 1..40),
        acked in prop_oneof![6 => Just(DEFAULT_FEATURES), 1 => any::<u64>()],
    ) {
        let mut m = Model::new(acked);
        for (op, writable) in &ops {
            run(&mut m, op, *writable)?;
        }
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_head_never_panic(
        type_ in 0u8..8,
        body in proptest::collection::vec(any::<u8>(), 0..128),
        writable in prop_oneof![0usize..8, 0usize..4096, Just(usize::MAX)],
    ) {
        let mut m = Model::new(DEFAULT_FEATURES);
        let mut req = vec![type_];
        req.extend_from_slice(&body);
        let resp = handle(&mut m.domains, &m.settings, m.acked, &req, writable);
        check_reply(&resp, writable)?;
        // PROBE with a huge writable part must not allocate it all.
        prop_assert!(resp.reply.len() <= m.settings.probe_size as usize + TAIL_LEN);
        check_model(&m)?;
    }
}
