//! The IOTLB thread against a seqpacket socket playing the kernel.

use std::os::fd::{AsRawFd, OwnedFd};

use super::*;
use crate::vhost_kernel::channel::{DropAll, VhostFdChannel};
use crate::vhost_kernel::io::{seqpacket_pair, FdIotlb};
use crate::vhost_kernel::msg::{decode_v2, encode_v2, raw_payload, VHOST_MSG_V2_SIZE};
use crate::vhost_user::miss::TranslatingHandler;

const UADDR: u64 = 0x7f00_0000_0000;

/// IOVAs below 1 MiB translate read-only, one page per UPDATE.
fn translate(iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
    if iova >= 0x10_0000 {
        return Err(MissError::Unmapped { iova });
    }
    if perm != IotlbPerm::ReadOnly {
        return Err(MissError::PermissionDenied { iova, wanted: perm });
    }
    let page = iova & !0xfff;
    Ok(IotlbMsg::update(
        page,
        0x1000,
        UADDR + page,
        IotlbPerm::ReadOnly,
    ))
}

/// A handler that records what the server asked of it.
#[derive(Default)]
struct Recorder {
    access_fails: Mutex<Vec<(u64, IotlbPerm)>>,
    refused: Mutex<Vec<RefusedRequest>>,
}

impl MissHandler for Recorder {
    fn answer_miss(&self, iova: u64, _perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        Err(MissError::Unmapped { iova })
    }
    fn on_access_fail(&self, iova: u64, perm: IotlbPerm) {
        lock(&self.access_fails).push((iova, perm));
    }
    fn on_refused_request(&self, request: RefusedRequest) {
        lock(&self.refused).push(request);
    }
}

/// A server whose misses are translated by [`translate`] and answered
/// through the vhost fd itself, and the "kernel" end of the fd.
fn translating_server() -> (IotlbServer, OwnedFd) {
    let (srv, kernel, _io) = translating_server_io();
    (srv, kernel)
}

/// [`translating_server`], and the fd as the device keeps it.
fn translating_server_io() -> (IotlbServer, OwnedFd, Arc<dyn IotlbIo>) {
    let (ours, kernel) = seqpacket_pair().unwrap();
    let io: Arc<dyn IotlbIo> = Arc::new(FdIotlb::new(ours));
    let drop_all: DropAll = Box::new(|| Ok(()));
    let channel = Arc::new(VhostFdChannel::new(io.clone(), drop_all));
    let handler = Arc::new(TranslatingHandler::new(translate, channel));
    (
        IotlbServer::new(io.clone(), handler, "test vhost-net"),
        kernel,
        io,
    )
}

fn kernel_sends(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: `bytes` is valid for its length; `fd` is open.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// The next message the front end wrote, waiting up to [`TEST_WAIT`].
fn kernel_receives(fd: &OwnedFd) -> Option<IotlbMsg> {
    let mut p = [PollFd::readable(fd)];
    if poll_fds(&mut p, Some(TEST_WAIT)).unwrap() == 0 {
        return None;
    }
    let mut buf = [0u8; 128];
    // SAFETY: `buf` is writable for its length; `fd` is open.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(n, VHOST_MSG_V2_SIZE as isize);
    match decode_v2(&buf[..VHOST_MSG_V2_SIZE]).unwrap() {
        KernelMsg::Iotlb(m) => Some(m),
        KernelMsg::Batch(b) => panic!("front end sent batch marker {b}"),
    }
}

fn nothing_written(fd: &OwnedFd) -> bool {
    let mut p = [PollFd::readable(fd)];
    poll_fds(&mut p, Some(Duration::ZERO)).unwrap() == 0
}

fn miss(iova: u64, perm: IotlbPerm) -> [u8; VHOST_MSG_V2_SIZE] {
    encode_v2(&IotlbMsg::miss(iova, perm))
}

#[test]
fn a_miss_is_answered_with_an_update_on_the_same_fd() {
    let (mut srv, kernel) = translating_server();
    kernel_sends(&kernel, &miss(0x3456, IotlbPerm::ReadOnly));
    assert_eq!(srv.serve_one().unwrap(), Some(Handled::Miss { ok: true }));
    let up = kernel_receives(&kernel).unwrap();
    assert_eq!(
        up,
        IotlbMsg::update(0x3000, 0x1000, UADDR + 0x3000, IotlbPerm::ReadOnly)
    );
    assert_eq!(srv.serve_one().unwrap(), None, "nothing else queued");
    assert_eq!(srv.counters().snapshot().messages, 1);
}

#[test]
fn a_refused_miss_gets_no_update() {
    let (mut srv, kernel) = translating_server();
    kernel_sends(&kernel, &miss(0x20_0000, IotlbPerm::ReadOnly));
    kernel_sends(&kernel, &miss(0x1000, IotlbPerm::WriteOnly));
    assert_eq!(srv.serve_one().unwrap(), Some(Handled::Miss { ok: false }));
    assert_eq!(srv.serve_one().unwrap(), Some(Handled::Miss { ok: false }));
    assert!(nothing_written(&kernel), "a refused miss is never answered");
}

#[test]
fn access_fail_and_front_end_types_are_reported_not_served() {
    let (ours, kernel) = seqpacket_pair().unwrap();
    let rec = Arc::new(Recorder::default());
    let io: Arc<dyn IotlbIo> = Arc::new(FdIotlb::new(ours));
    let mut srv = IotlbServer::new(io, rec.clone(), "t");
    let mut fail = IotlbMsg::miss(0x9000, IotlbPerm::WriteOnly);
    fail.msg_type = IotlbType::AccessFail as u8;
    kernel_sends(&kernel, &encode_v2(&fail));
    kernel_sends(&kernel, &encode_v2(&IotlbMsg::invalidate(0, 0x1000)));
    let mut batch = IotlbMsg::invalidate(0, 0);
    batch.msg_type = 5;
    let mut raw = encode_v2(&IotlbMsg::invalidate(0, 1));
    raw[8..40].copy_from_slice(raw_payload(&batch));
    kernel_sends(&kernel, &raw);
    assert_eq!(srv.serve_one().unwrap(), Some(Handled::AccessFail));
    assert_eq!(srv.serve_one().unwrap(), Some(Handled::Unexpected));
    assert_eq!(srv.serve_one().unwrap(), Some(Handled::Unexpected));
    assert_eq!(
        *lock(&rec.access_fails),
        vec![(0x9000, IotlbPerm::WriteOnly)]
    );
    assert_eq!(
        *lock(&rec.refused),
        vec![
            RefusedRequest::Unsupported(3),
            RefusedRequest::Unsupported(5)
        ]
    );
    let s = srv.counters().snapshot();
    assert_eq!((s.messages, s.unexpected, s.malformed), (3, 2, 0));
}

#[test]
fn a_malformed_message_is_a_typed_error() {
    let (mut srv, kernel) = translating_server();
    kernel_sends(&kernel, &[0u8; 80]);
    match srv.serve_one() {
        Err(ServerError::Malformed { source, .. }) => {
            assert!(source.to_string().contains("malformed"), "{source}")
        }
        other => panic!("expected a malformed-message error, got {other:?}"),
    }
    assert_eq!(srv.counters().snapshot().malformed, 1);
}

#[test]
fn the_thread_serves_misses_and_ends_with_the_error_of_a_bad_message() {
    // The device keeps its own handle of the fd (`_io`).
    let (srv, kernel, _io) = translating_server_io();
    let counters = srv.counters();
    let t = srv.spawn("test-vhost-net-iotlb", None).unwrap();
    kernel_sends(&kernel, &miss(0x5000, IotlbPerm::ReadOnly));
    let up = kernel_receives(&kernel).expect("UPDATE written by the thread");
    assert_eq!(up.iova, 0x5000);
    let mut bad = miss(0x6000, IotlbPerm::ReadOnly);
    bad[4] = 1; // ASID 1
    kernel_sends(&kernel, &bad);
    assert!(
        t.wait_ended(TEST_WAIT),
        "the thread must stop on a malformed message"
    );
    let why = t.failure().unwrap();
    assert!(
        why.contains("malformed") && why.contains("address space 1"),
        "{why}"
    );
    // Later misses are not answered: the device's queues stall, nothing crashes.
    kernel_sends(&kernel, &miss(0x7000, IotlbPerm::ReadOnly));
    assert!(nothing_written(&kernel));
    assert_eq!(counters.snapshot().malformed, 1);
    t.stop();
}

#[test]
fn stopping_the_thread_is_not_a_failure() {
    let (srv, _kernel) = translating_server();
    let t = srv.spawn("test-vhost-net-iotlb", None).unwrap();
    assert!(!t.wait_ended(Duration::from_millis(50)));
    assert_eq!(t.failure(), None);
    t.stop();
}

#[test]
fn a_closed_fd_ends_the_thread_with_a_read_error() {
    let (srv, kernel) = translating_server();
    let t = srv.spawn("test-vhost-net-iotlb", None).unwrap();
    drop(kernel);
    assert!(t.wait_ended(TEST_WAIT));
    assert!(t.failure().unwrap().contains("reading the vhost fd failed"));
}
