//! A `SIGSYS` handler that says which call a filter blocked, then lets the signal kill the
//! process as it would have without the handler.

use std::io;

use super::CURRENT;

/// Offset of `si_syscall` in the kernel's `siginfo_t` for `SIGSYS` on 64-bit targets:
/// three `int`s, padding to 16, then `_sigsys { void *_call_addr; int _syscall; ... }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// A message built without allocating (the handler runs in signal context).
struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut v = n.unsigned_abs();
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

fn message(nr: i32, kind: &str) -> Msg {
    let mut m = Msg {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"iovmm: seccomp blocked system call ");
    m.push_num(nr);
    m.push(b" on the ");
    m.push(kind.as_bytes());
    m.push(b" thread; the process stops. Rerun with --seccomp log to see every such call.\n");
    m
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t; for SIGSYS its union holds `_sigsys`,
        // whose `_syscall` int lives at SI_SYSCALL_OFFSET (aligned, inside the 128-byte struct).
        unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read()
        }
    };
    let kind = CURRENT.with(|c| c.get()).map_or("unfiltered", |k| k.name());
    let m = message(nr, kind);
    // SAFETY: write(2), getpid, gettid and tgkill are async-signal-safe, take no pointers
    // except `m.buf`, valid for `m.len` bytes, and every filter allows them. SIGSYS is
    // blocked while this handler runs and SA_RESETHAND restored the default action, so the
    // signal raised here ends the process with SIGSYS as soon as the handler returns.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

/// Installs (process-wide) the `SIGSYS` handler that names the blocked call and the thread
/// kind before the process dies, unless the process already has a `SIGSYS` handler of its
/// own. Returns whether the reporter is installed.
pub fn install_sigsys_reporter() -> io::Result<bool> {
    // SAFETY: sigaction is called with valid pointers to zero-initialised (valid) structs; the
    // handler only does async-signal-safe work.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        let ours = on_sigsys as *const () as libc::sighandler_t;
        if old.sa_sigaction == ours {
            return Ok(true);
        }
        if old.sa_sigaction != libc::SIG_DFL {
            return Ok(false);
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ours;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn message_names_the_call_and_the_thread_kind() {
        let m = message(41, "vcpu");
        let s = std::str::from_utf8(&m.buf[..m.len]).unwrap();
        assert!(s.starts_with("iovmm: seccomp blocked system call 41 on the vcpu thread;"));
        assert!(s.ends_with('\n'));
        let m = message(-1, "x");
        assert!(std::str::from_utf8(&m.buf[..m.len])
            .unwrap()
            .contains("call -1 on"));
    }

    #[test]
    fn long_messages_are_truncated_not_overflowed() {
        let long = "k".repeat(1000);
        let m = message(i32::MIN, &long);
        assert_eq!(m.len, m.buf.len());
        assert!(m
            .buf
            .starts_with(b"iovmm: seccomp blocked system call -2147483648 on the kkk"));
    }
}
