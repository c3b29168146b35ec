//! The main-socket server loop of the test back end.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use devices::vhost_user::wire::{
    encode_ack, encode_u64_frame, Header, IotlbMsg, IotlbType, HEADER_SIZE, PROTOCOL_F_BACKEND_REQ,
    PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_IOTLB_MSG,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use iommu::error::chain;
use iommu::sync::lock;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::iotlb::IotlbEntry;
use super::memory::{parse_mem_table, MemTable, MAX_REGIONS};
use super::{BackendError, Counters, RecordedMsg, Shared, VringState, MAX_RECORDS};

/// Front-end request codes handled here.
mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
}

/// Largest queue size accepted.
const MAX_QUEUE_SIZE: u32 = 1024;
/// Protocol features offered.
pub const OFFERED_PROTOCOL: u64 = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_BACKEND_REQ;

/// Virtio features offered: VERSION_1, protocol features and optionally
/// ACCESS_PLATFORM (no indirect descriptors, no event index, no MRG_RXBUF).
pub fn offered_features(access_platform: bool) -> u64 {
    let ap = if access_platform {
        VIRTIO_F_ACCESS_PLATFORM
    } else {
        0
    };
    VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | ap
}

/// One message off the wire.
struct Msg {
    hdr: Header,
    payload: Vec<u8>,
    files: Vec<File>,
}

/// What a handler wants sent back.
enum Reply {
    /// Nothing beyond the optional reply-ack (0 = success).
    Ack(u64),
    /// A u64 reply (GET_* requests).
    U64(u64),
    /// A vring-state reply (GET_VRING_BASE).
    State(u32, u32),
    /// A reply with this payload (GET_CONFIG).
    Bytes(Vec<u8>),
}

fn recv_msg(stream: &UnixStream) -> Result<Msg, BackendError> {
    let mut raw = [0u8; HEADER_SIZE];
    let mut fds = [-1; MAX_REGIONS];
    let mut iov = [libc::iovec {
        iov_base: raw.as_mut_ptr().cast(),
        iov_len: raw.len(),
    }];
    // SAFETY: the iovec points at `raw`, which may take arbitrary bytes.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| BackendError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    // SAFETY: the first `nfds` entries are fresh descriptors now owned here.
    let files: Vec<File> = fds[..nfds]
        .iter()
        .map(|fd| unsafe { File::from_raw_fd(*fd) })
        .collect();
    if n == 0 {
        return Err(BackendError::Disconnected);
    }
    let mut r = stream;
    r.read_exact(&mut raw[n..]).map_err(eof_is_disconnect)?;
    let hdr = Header::decode(&raw)?;
    let mut payload = vec![0u8; hdr.size as usize];
    r.read_exact(&mut payload).map_err(eof_is_disconnect)?;
    Ok(Msg {
        hdr,
        payload,
        files,
    })
}

fn eof_is_disconnect(e: std::io::Error) -> BackendError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => BackendError::Disconnected,
        _ => BackendError::Io(e),
    }
}

fn u64_payload(m: &Msg) -> Result<u64, BackendError> {
    let raw: [u8; 8] = m.payload.as_slice().try_into().map_err(|_| {
        BackendError::BadMessage(format!("request {} needs an 8-byte payload", m.hdr.request))
    })?;
    Ok(u64::from_ne_bytes(raw))
}

/// (index, num) of a vring-state payload, index checked.
fn state_payload(m: &Msg) -> Result<(usize, u32), BackendError> {
    let v = u64_payload(m)?;
    let index = (v & 0xffff_ffff) as usize;
    let max = super::QUEUE_NUM * super::MAX_QUEUE_PAIRS;
    if index >= max {
        return Err(BackendError::BadMessage(format!(
            "vring index {index} >= {max}"
        )));
    }
    Ok((index, (v >> 32) as u32))
}

impl Shared {
    fn record(&self, m: &Msg) {
        Counters::bump(&self.counters.messages);
        let mut r = lock(&self.records);
        if r.len() < MAX_RECORDS {
            r.push(RecordedMsg {
                request: m.hdr.request,
                flags: m.hdr.flags,
                payload: m.payload.clone(),
                nfds: m.files.len(),
            });
        }
    }

    fn dispatch(&self, m: Msg) -> Result<Reply, BackendError> {
        match m.hdr.request {
            req::GET_FEATURES => Ok(Reply::U64(self.offered_virtio())),
            req::GET_CONFIG => Ok(Reply::Bytes(self.blk_get_config(&m.payload))),
            req::SET_FEATURES => self.set_features(u64_payload(&m)?),
            req::SET_OWNER => {
                lock(&self.neg).owner = true;
                Ok(Reply::Ack(0))
            }
            req::RESET_OWNER => {
                self.reset();
                Ok(Reply::Ack(0))
            }
            req::SET_MEM_TABLE => self.set_mem_table(&m),
            req::SET_VRING_NUM | req::SET_VRING_BASE | req::SET_VRING_ENABLE => {
                self.vring_state(&m)
            }
            req::SET_VRING_ADDR => self.vring_addr(&m.payload),
            req::GET_VRING_BASE => self.get_vring_base(&m),
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => self.vring_fd(m),
            req::GET_PROTOCOL_FEATURES => Ok(Reply::U64(self.offered_protocol())),
            req::SET_PROTOCOL_FEATURES => self.set_protocol(u64_payload(&m)?),
            req::GET_QUEUE_NUM => Ok(Reply::U64(self.vrings.len() as u64)),
            req::SET_BACKEND_REQ_FD => self.set_backend_req_fd(m),
            VHOST_USER_IOTLB_MSG => self.iotlb_msg(&m),
            other => Err(BackendError::BadMessage(format!(
                "unsupported request {other}"
            ))),
        }
    }

    /// Virtio features offered (net, or blk with its device features).
    fn offered_virtio(&self) -> u64 {
        offered_features(self.config.access_platform) | self.blk_features()
    }

    fn set_features(&self, f: u64) -> Result<Reply, BackendError> {
        let offered = self.offered_virtio();
        if f & !offered != 0 {
            return Err(BackendError::BadMessage(format!(
                "features {f:#x} not offered ({offered:#x})"
            )));
        }
        lock(&self.neg).features = f;
        // Like Linux vhost: a (re)negotiation starts with an empty IOTLB
        // (unless told to misbehave and keep it).
        if !self.config.misbehave.keep_iotlb_on_features {
            lock(&self.iotlb).clear();
        }
        Ok(Reply::Ack(0))
    }

    fn vring(&self, index: usize) -> Result<std::sync::MutexGuard<'_, VringState>, BackendError> {
        self.lock_vring(index)
            .ok_or_else(|| BackendError::BadMessage(format!("vring index {index}")))
    }

    fn offered_protocol(&self) -> u64 {
        (OFFERED_PROTOCOL | self.blk_protocol()) & !self.config.misbehave.withhold_protocol
    }

    fn set_protocol(&self, f: u64) -> Result<Reply, BackendError> {
        if f & !self.offered_protocol() != 0 {
            return Err(BackendError::BadMessage(format!(
                "protocol features {f:#x} not offered"
            )));
        }
        lock(&self.neg).protocol = f;
        Ok(Reply::Ack(0))
    }

    fn set_mem_table(&self, m: &Msg) -> Result<Reply, BackendError> {
        let regions = parse_mem_table(&m.payload, m.files.len())?;
        let table = MemTable::map(&regions, &m.files)?;
        *lock(&self.mem) = Arc::new(table);
        Ok(Reply::Ack(0))
    }

    fn vring_state(&self, m: &Msg) -> Result<Reply, BackendError> {
        let (index, num) = state_payload(m)?;
        let mut v = self.vring(index)?;
        match m.hdr.request {
            req::SET_VRING_NUM => {
                if num == 0 || num > MAX_QUEUE_SIZE || !num.is_power_of_two() {
                    return Err(BackendError::BadMessage(format!("queue size {num}")));
                }
                v.num = num as u16;
            }
            req::SET_VRING_BASE => {
                v.last_avail = num as u16;
                v.used_idx = num as u16;
            }
            _ => v.enabled = num != 0,
        }
        Ok(Reply::Ack(0))
    }

    fn vring_addr(&self, p: &[u8]) -> Result<Reply, BackendError> {
        if p.len() != 40 {
            return Err(BackendError::BadMessage(format!(
                "SET_VRING_ADDR with {} bytes",
                p.len()
            )));
        }
        let u = |o: usize| {
            p.get(o..o + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_ne_bytes)
                .unwrap_or(0)
        };
        let index = (u(0) & 0xffff_ffff) as usize;
        let mut v = self.vring(index)?;
        // Layout: index u32, flags u32, desc, used, avail, log (u64 each).
        (v.desc, v.used, v.avail) = (u(8), u(16), u(24));
        Ok(Reply::Ack(0))
    }

    fn get_vring_base(&self, m: &Msg) -> Result<Reply, BackendError> {
        let (index, _) = state_payload(m)?;
        let mut v = self.vring(index)?;
        v.started = false;
        v.kick = None;
        Ok(Reply::State(index as u32, u32::from(v.last_avail)))
    }

    fn vring_fd(&self, mut m: Msg) -> Result<Reply, BackendError> {
        let v = u64_payload(&m)?;
        let index = (v & 0xff) as usize;
        let nofd = v & 0x100 != 0;
        let file = match (nofd, m.files.len()) {
            (true, 0) => None,
            (false, 1) => m.files.pop(),
            (_, n) => {
                return Err(BackendError::BadMessage(format!(
                    "{n} fds with vring flag {v:#x}"
                )))
            }
        };
        let mut vr = self.vring(index)?;
        match m.hdr.request {
            req::SET_VRING_KICK => {
                vr.kick = file.map(Arc::new);
                vr.started = true;
                drop(vr);
                self.wake_datapath();
            }
            req::SET_VRING_CALL => vr.call = file,
            _ => {}
        }
        Ok(Reply::Ack(0))
    }

    fn set_backend_req_fd(&self, mut m: Msg) -> Result<Reply, BackendError> {
        let file = match (m.files.pop(), m.files.len()) {
            (Some(f), 0) => f,
            _ => {
                return Err(BackendError::BadMessage(
                    "SET_BACKEND_REQ_FD needs exactly one fd".into(),
                ))
            }
        };
        let stream = UnixStream::from(OwnedFd::from(file));
        if self.config.misbehave.bogus_backend_msg {
            let mut bogus = Header::request(1, 0, true);
            bogus.flags = 0x2;
            let mut w = &stream;
            w.write_all(&bogus.encode())?;
        }
        *lock(&self.backend_chan) = Some(stream);
        Ok(Reply::Ack(0))
    }

    fn iotlb_msg(&self, m: &Msg) -> Result<Reply, BackendError> {
        if self.config.misbehave.nack_iotlb && !self.spared() {
            return Ok(Reply::Ack(1));
        }
        let received = std::time::Instant::now();
        let msg = IotlbMsg::decode(m.hdr.request, &invalidate_fields_cleared(&m.payload))?;
        let mut tlb = lock(&self.iotlb);
        match msg.kind()? {
            IotlbType::Update => {
                let e = IotlbEntry {
                    iova: msg.iova,
                    size: msg.size,
                    uaddr: msg.uaddr,
                    perm: msg.permission()?,
                };
                let in_mem = lock(&self.mem).uaddr_to_host(msg.uaddr).is_some();
                if !in_mem || !tlb.insert(e) {
                    return Err(BackendError::BadMessage(format!(
                        "UPDATE {msg:x?} not inside guest memory"
                    )));
                }
                Counters::bump(&self.counters.iotlb_updates);
                lock(&self.miss_timer).update(e.iova, e.size, received);
                self.iotlb_cv.notify_all();
            }
            IotlbType::Invalidate => {
                let dropped = tlb.invalidate(msg.iova, msg.size) as u64;
                Counters::bump(&self.counters.iotlb_invalidates);
                self.counters
                    .iotlb_entries_invalidated
                    .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
                // The invariant, checked the moment it must hold: nothing of
                // the range is translatable any more (not one byte of it).
                if tlb.overlaps(msg.iova, msg.size) {
                    log::error!(
                        "INVALIDATE {:#x}+{:#x} left a translation",
                        msg.iova,
                        msg.size
                    );
                    Counters::bump(&self.counters.invalidate_violations);
                }
                // Wake misses waiting for an UPDATE: this may have dropped it.
                self.iotlb_cv.notify_all();
            }
            other => {
                return Err(BackendError::BadMessage(format!(
                    "IOTLB type {other:?} from the front end"
                )))
            }
        }
        Ok(Reply::Ack(0))
    }

    /// Whether the message being handled is spared the IOTLB misbehaviours.
    fn spared(&self) -> bool {
        self.sparing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether an Ack reply is sent for this header.
    fn wants_ack(&self, hdr: &Header) -> bool {
        let reply_ack = lock(&self.neg).protocol & PROTOCOL_F_REPLY_ACK != 0;
        // IOTLB_MSG is always answered when asked (QEMU always asks).
        hdr.need_reply() && (reply_ack || hdr.request == VHOST_USER_IOTLB_MSG)
    }

    fn send_reply(
        &self,
        stream: &UnixStream,
        hdr: &Header,
        reply: Reply,
    ) -> Result<(), BackendError> {
        let mis = &self.config.misbehave;
        let iotlb = hdr.request == VHOST_USER_IOTLB_MSG && !self.spared();
        if iotlb && mis.never_ack_iotlb {
            return Ok(());
        }
        if iotlb && mis.oversized_reply {
            let mut w = stream;
            w.write_all(&Header::reply(hdr.request, 0x10_0000).encode())?;
            return Ok(());
        }
        let frame = match reply {
            Reply::Ack(_) if !self.wants_ack(hdr) => return Ok(()),
            Reply::Ack(v) => {
                let request = if mis.bogus_reply && hdr.request == VHOST_USER_IOTLB_MSG {
                    40
                } else {
                    hdr.request
                };
                encode_ack(request, v)
            }
            Reply::U64(v) => encode_u64_frame(Header::reply(hdr.request, 0), v),
            Reply::State(i, n) => {
                let v = u64::from(i) | (u64::from(n) << 32);
                encode_u64_frame(Header::reply(hdr.request, 0), v)
            }
            Reply::Bytes(p) => {
                let size = u32::try_from(p.len()).unwrap_or(u32::MAX);
                let mut w = stream;
                w.write_all(&Header::reply(hdr.request, size).encode())?;
                w.write_all(&p)?;
                return Ok(());
            }
        };
        if !mis.ack_delay.is_zero() {
            std::thread::sleep(mis.ack_delay);
        }
        let mut w = stream;
        w.write_all(&frame)?;
        Ok(())
    }
}

/// Offsets in `struct vhost_iotlb_msg`: uaddr (8 bytes), perm, type.
const IOTLB_UADDR: usize = 16;
const IOTLB_TYPE: usize = 25;

/// An IOTLB payload with the uaddr and perm of an INVALIDATE zeroed: QEMU
/// sends them uninitialised (stack bytes), so they carry no meaning and
/// must not make the message invalid. Other types are returned unchanged.
fn invalidate_fields_cleared(payload: &[u8]) -> Vec<u8> {
    let mut p = payload.to_vec();
    if p.get(IOTLB_TYPE) == Some(&(IotlbType::Invalidate as u8)) {
        p[IOTLB_UADDR..IOTLB_TYPE].fill(0);
    }
    p
}

/// Serve one connection until it closes; the state is reset afterwards.
pub(crate) fn serve_connection(shared: &Shared, stream: UnixStream) -> Result<(), BackendError> {
    *lock(&shared.current) = stream.try_clone().ok();
    let res = serve_inner(shared, &stream);
    *lock(&shared.current) = None;
    shared.reset();
    shared
        .connections_ended
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    match &res {
        Err(BackendError::Disconnected) | Ok(()) => {
            log::info!("front end disconnected: {:?}", shared.counters.snapshot());
            Ok(())
        }
        Err(e) => {
            log::warn!("connection closed: {e}", e = chain(&e));
            res
        }
    }
}

fn serve_inner(shared: &Shared, stream: &UnixStream) -> Result<(), BackendError> {
    let mut iotlb_seen = false;
    loop {
        let m = recv_msg(stream)?;
        shared.record(&m);
        let is_iotlb = m.hdr.request == VHOST_USER_IOTLB_MSG;
        let spare = is_iotlb && !iotlb_seen && shared.config.misbehave.spare_first_iotlb;
        iotlb_seen |= is_iotlb;
        shared
            .sparing
            .store(spare, std::sync::atomic::Ordering::Relaxed);
        if let Some(limit) = shared.config.misbehave.disconnect_after {
            if shared.counters.snapshot().messages >= limit {
                log::info!("misbehaving: disconnecting after {limit} messages");
                return Ok(());
            }
        }
        let invalidate = m.hdr.request == VHOST_USER_IOTLB_MSG
            && m.payload.get(IOTLB_TYPE) == Some(&(IotlbType::Invalidate as u8));
        let mis = &shared.config.misbehave;
        if invalidate && !spare && mis.disconnect_on_invalidate {
            log::info!("misbehaving: disconnecting on an IOTLB INVALIDATE");
            return Ok(());
        }
        let hdr = m.hdr;
        let reply = match shared.dispatch(m) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("refusing request {}: {e}", hdr.request, e = chain(&e));
                Counters::bump(&shared.counters.bad_messages);
                Reply::Ack(1)
            }
        };
        if invalidate && !spare && mis.never_ack_invalidate {
            continue;
        }
        shared.send_reply(stream, &hdr, reply)?;
    }
}

/// Accept and serve connections one at a time until the listener fails.
pub(crate) fn accept_loop(shared: &Shared, listener: &UnixListener) -> Result<(), BackendError> {
    loop {
        let (stream, _) = listener.accept()?;
        if shared.stop.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let _ = serve_connection(shared, stream);
        if shared.stop.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::vhost_user::wire::IotlbPerm;

    #[test]
    fn invalidate_with_garbage_uaddr_and_perm_decodes() {
        // As QEMU sends it: only iova, size and type set, the rest stack bytes.
        let mut raw = IotlbMsg::invalidate(0x4000, 0x1000).encode();
        raw[IOTLB_UADDR..IOTLB_TYPE]
            .copy_from_slice(&[0xa5, 0x5a, 0xa5, 0x5a, 0, 0, 0, 0x7f, 0xee]);
        assert!(IotlbMsg::decode(VHOST_USER_IOTLB_MSG, &raw).is_err());
        let msg = IotlbMsg::decode(VHOST_USER_IOTLB_MSG, &invalidate_fields_cleared(&raw));
        let msg = msg.unwrap_or_else(|e| panic!("cleared INVALIDATE refused: {e}"));
        assert_eq!((msg.iova, msg.size, msg.uaddr), (0x4000, 0x1000, 0));
        assert_eq!(msg.kind().ok(), Some(IotlbType::Invalidate));
    }

    #[test]
    fn other_iotlb_messages_keep_their_fields() {
        let up = IotlbMsg::update(0x4000, 0x1000, 0x7f00_0000_0000, IotlbPerm::ReadOnly).encode();
        assert_eq!(invalidate_fields_cleared(&up), up.to_vec());
        let mut bad = up;
        bad[IOTLB_TYPE - 1] = 0xee;
        assert!(IotlbMsg::decode(VHOST_USER_IOTLB_MSG, &invalidate_fields_cleared(&bad)).is_err());
        assert_eq!(invalidate_fields_cleared(&[3u8; 4]), vec![3u8; 4]);
    }
}
