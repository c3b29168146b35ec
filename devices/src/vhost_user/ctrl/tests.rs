#![allow(clippy::unwrap_used)]

use super::*;
use crate::viommu::testing::MapViommu;

const SIZE: u16 = 8;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const CMD: u64 = 0x4000;
const STATUS: u64 = 0x5000;
const INDIRECT: u64 = 0x6000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
}

fn ring(event_idx: bool) -> CtrlRing {
    CtrlRing {
        size: SIZE,
        desc: DESC,
        avail: AVAIL,
        used: USED,
        event_idx,
        next_avail: 0,
        next_used: 0,
    }
}

fn desc(m: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    m.write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
        .unwrap();
}

/// Post `head` as the next avail entry (avail index `idx` after it).
fn post(m: &GuestMemoryMmap, head: u16, idx: u16) {
    let slot = u64::from((idx - 1) % SIZE);
    m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
        .unwrap();
    m.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
}

/// A three-descriptor VQ_PAIRS_SET command (header, data, status) at head 0.
fn pairs_set(m: &GuestMemoryMmap, pairs: u16) {
    m.write_slice(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET], GuestAddress(CMD))
        .unwrap();
    m.write_obj(pairs, GuestAddress(CMD + 2)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    desc(m, DESC, 0, CMD, 2, DESC_F_NEXT, 1);
    desc(m, DESC, 1, CMD + 2, 2, DESC_F_NEXT, 2);
    desc(m, DESC, 2, STATUS, 1, DESC_F_WRITE, 0);
}

fn used(m: &GuestMemoryMmap, slot: u64) -> (u16, u32, u32) {
    let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
    let id: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap();
    let len: u32 = m.read_obj(GuestAddress(USED + 8 + 8 * slot)).unwrap();
    (idx, id, len)
}

struct Run {
    applied: Vec<u16>,
    errors: Vec<CtrlError>,
    result: Result<bool, CtrlError>,
}

fn run(r: &mut CtrlRing, dma: &Dma, max: u16, ok: bool) -> Run {
    let mut applied = Vec::new();
    let mut errors = Vec::new();
    let result = r.process(
        dma,
        max,
        &mut |n| {
            applied.push(n);
            ok
        },
        &mut |e| errors.push(e.clone()),
    );
    Run {
        applied,
        errors,
        result,
    }
}

#[test]
fn vq_pairs_set_enables_the_pairs_and_is_acked_ok() {
    let m = mem();
    pairs_set(&m, 2);
    post(&m, 0, 1);
    let mut r = ring(false);
    let out = run(&mut r, &Dma::new(m.clone(), None), 4, true);
    assert_eq!(out.result, Ok(true));
    assert_eq!(out.applied, vec![2]);
    assert!(out.errors.is_empty());
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), NET_OK);
    assert_eq!(used(&m, 0), (1, 0, 1));
    // Nothing new: no interrupt, nothing applied.
    let again = run(&mut r, &Dma::new(m.clone(), None), 4, true);
    assert_eq!(again.result, Ok(false));
    assert!(again.applied.is_empty());
}

#[test]
fn out_of_range_pairs_unknown_commands_and_failures_get_err() {
    let m = mem();
    let dma = Dma::new(m.clone(), None);
    let mut r = ring(false);
    for (i, (pairs, ok)) in [(0u16, true), (5, true), (3, false)]
        .into_iter()
        .enumerate()
    {
        pairs_set(&m, pairs);
        let idx = u16::try_from(i + 1).unwrap();
        post(&m, 0, idx);
        let out = run(&mut r, &dma, 4, ok);
        assert_eq!(out.result, Ok(true));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            NET_ERR,
            "{pairs}"
        );
        assert_eq!(used(&m, i as u64), (idx, 0, 1));
    }
    // Class RX (0), command PROMISC: not served.
    pairs_set(&m, 1);
    m.write_slice(&[0, 0], GuestAddress(CMD)).unwrap();
    post(&m, 0, 4);
    let out = run(&mut r, &dma, 4, true);
    assert!(out.applied.is_empty());
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), NET_ERR);
    assert_eq!(
        command_status(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1], 4, &mut |_| true),
        NET_ERR
    );
    assert_eq!(
        command_status(&[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 1, 0, 0], 4, &mut |_| true),
        NET_ERR
    );
}

#[test]
fn indirect_commands_are_served() {
    let m = mem();
    pairs_set(&m, 3);
    desc(&m, INDIRECT, 0, CMD, 4, DESC_F_NEXT, 1);
    desc(&m, INDIRECT, 1, STATUS, 1, DESC_F_WRITE, 0);
    desc(&m, DESC, 5, INDIRECT, 32, DESC_F_INDIRECT, 0);
    post(&m, 5, 1);
    let mut r = ring(false);
    let out = run(&mut r, &Dma::new(m.clone(), None), 4, true);
    assert_eq!((out.result, out.applied), (Ok(true), vec![3]));
    assert_eq!(used(&m, 0), (1, 5, 1));
}

#[test]
fn bad_chains_are_returned_empty_and_the_queue_goes_on() {
    let m = mem();
    let dma = Dma::new(m.clone(), None);
    let mut r = ring(false);
    // A loop.
    desc(&m, DESC, 0, CMD, 2, DESC_F_NEXT, 0);
    post(&m, 0, 1);
    // next out of range.
    desc(&m, DESC, 1, CMD, 2, DESC_F_NEXT, 99);
    post(&m, 1, 2);
    // No status byte.
    desc(&m, DESC, 2, CMD, 4, 0, 0);
    post(&m, 2, 3);
    // Nested indirect / indirect with NEXT / empty indirect.
    desc(&m, INDIRECT, 0, INDIRECT, 16, DESC_F_INDIRECT, 0);
    desc(&m, DESC, 3, INDIRECT, 16, DESC_F_INDIRECT, 0);
    post(&m, 3, 4);
    desc(&m, DESC, 4, INDIRECT, 16, DESC_F_INDIRECT | DESC_F_NEXT, 0);
    post(&m, 4, 5);
    // A command past guest RAM, and one whose status is past it.
    desc(&m, DESC, 5, u64::MAX - 1, 4, DESC_F_NEXT, 6);
    desc(&m, DESC, 6, STATUS, 1, DESC_F_WRITE, 0);
    post(&m, 5, 6);
    desc(&m, DESC, 7, 0x10_0000, 1, DESC_F_WRITE, 0);
    post(&m, 7, 7);
    let out = run(&mut r, &dma, 4, true);
    assert_eq!(out.result, Ok(true));
    assert!(out.applied.is_empty());
    assert_eq!(out.errors.len(), 7, "{:?}", out.errors);
    assert!(matches!(out.errors[0], CtrlError::ChainTooLong));
    assert!(matches!(
        out.errors[1],
        CtrlError::DescIndex { index: 99, .. }
    ));
    assert_eq!(out.errors[2], CtrlError::NoStatus);
    assert!(matches!(out.errors[3], CtrlError::Indirect { .. }));
    assert!(matches!(out.errors[4], CtrlError::Indirect { .. }));
    assert!(matches!(out.errors[5], CtrlError::Memory { .. }));
    assert!(matches!(out.errors[6], CtrlError::Memory { .. }));
    for (slot, head) in [0u32, 1, 2, 3, 4, 5, 7].into_iter().enumerate() {
        assert_eq!(used(&m, slot as u64), (7, head, 0));
    }
    // A good command afterwards still works.
    pairs_set(&m, 2);
    post(&m, 0, 8);
    let out = run(&mut r, &dma, 4, true);
    assert_eq!((out.result, out.applied), (Ok(true), vec![2]));
}

#[test]
fn a_broken_ring_stops_the_queue() {
    let m = mem();
    let dma = Dma::new(m.clone(), None);
    let mut r = ring(false);
    post(&m, SIZE, 1);
    assert!(matches!(
        run(&mut r, &dma, 4, true).result,
        Err(CtrlError::DescIndex { .. })
    ));
    let mut r = ring(false);
    m.write_obj(SIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
    assert_eq!(
        run(&mut r, &dma, 4, true).result,
        Err(CtrlError::AvailIndex(SIZE + 1))
    );
}

#[test]
fn interrupts_follow_the_drivers_suppression() {
    let m = mem();
    let dma = Dma::new(m.clone(), None);
    // Without event index: VRING_AVAIL_F_NO_INTERRUPT.
    let mut r = ring(false);
    m.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
        .unwrap();
    pairs_set(&m, 1);
    post(&m, 0, 1);
    assert_eq!(run(&mut r, &dma, 4, true).result, Ok(false));
    // With event index: used_event, and avail_event is published.
    m.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    let mut r = ring(true);
    r.next_avail = 1;
    r.next_used = 1;
    m.write_obj(5u16, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
        .unwrap();
    post(&m, 0, 2);
    assert_eq!(run(&mut r, &dma, 4, true).result, Ok(false));
    let avail_event: u16 = m
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
        .unwrap();
    assert_eq!(avail_event, 2);
    m.write_obj(2u16, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
        .unwrap();
    post(&m, 0, 3);
    assert_eq!(run(&mut r, &dma, 4, true).result, Ok(true));
}

#[test]
fn behind_a_viommu_buffers_are_iovas_checked_for_their_access() {
    let m = mem();
    pairs_set(&m, 2);
    post(&m, 0, 1);
    let v = Arc::new(MapViommu::default());
    // The ring and the command read-only except the used ring; IOVA = GPA + 1 MiB.
    let off = 0x10_0000u64;
    let rid = RequesterId::from_bdf(0, 0x10);
    v.map(DESC + off, 0x2000, DESC, Permissions::Read);
    v.map(USED + off, 0x1000, USED, Permissions::ReadWrite);
    v.map(CMD + off, 0x1000, CMD, Permissions::Read);
    // The status byte is mapped read-only: it cannot be written.
    v.map(STATUS + off, 0x1000, STATUS, Permissions::Read);
    for i in 0..3 {
        let d = DESC + 16 * i;
        let a: u64 = m.read_obj(GuestAddress(d)).unwrap();
        m.write_obj(a + off, GuestAddress(d)).unwrap();
    }
    let viommu: Arc<dyn Viommu> = v.clone();
    let dma = Dma::new(m.clone(), Some((viommu, rid)));
    let mut r = CtrlRing {
        desc: DESC + off,
        avail: AVAIL + off,
        used: USED + off,
        ..ring(false)
    };
    let out = run(&mut r, &dma, 4, true);
    // The command is applied, its status cannot be written: used length 0.
    assert_eq!(out.applied, vec![2]);
    assert_eq!(
        out.errors,
        vec![CtrlError::Translate {
            iova: STATUS + off,
            len: 1,
            access: Permissions::Write
        }]
    );
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    assert_eq!(used(&m, 0), (1, 0, 0));
    // An unmapped avail ring is a ring error.
    v.remove(AVAIL + off);
    post(&m, 0, 2);
    assert!(matches!(
        run(&mut r, &dma, 4, true).result,
        Err(CtrlError::Translate { .. })
    ));
}
