//! A real external vhost-user backend for tests: DPDK `dpdk-testpmd` with the
//! vhost PMD (`--vdev net_vhost0,iface=SOCK,iommu-support=1`), run without
//! hugepages in rxonly forwarding mode and driven through its interactive
//! prompt. As a server it creates the socket; as a client
//! ([`Testpmd::start_client`], `client=1`) it connects to iovmm's socket
//! (`server=on`) and, when the connection ends, connects again every second.
//!
//! Both testpmd lcores are pinned to CPU 0 (`--lcores=0@0,1@0`), so on a
//! two-core machine the guest keeps a core to itself while testpmd polls.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommu::sync::lock;

/// The testpmd binary (Debian package dpdk-dev).
pub const TESTPMD: &str = "dpdk-testpmd";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Fixture errors.
#[derive(Debug, thiserror::Error)]
pub enum TestpmdError {
    /// testpmd could not be started.
    #[error("cannot run {TESTPMD}; install it with `sudo sh resources/install-deps.sh` (package dpdk-dev)")]
    Spawn(#[source] std::io::Error),
    /// testpmd did not become ready.
    #[error(
        "{TESTPMD} did not create its vhost-user socket within {START_TIMEOUT:?}; output:\n{0}"
    )]
    NotReady(String),
    /// A command could not be sent.
    #[error("cannot talk to {TESTPMD}")]
    Io(#[source] std::io::Error),
    /// The statistics output was not understood.
    #[error("cannot parse {TESTPMD} port statistics from:\n{0}")]
    Stats(String),
}

/// Port counters of testpmd's port 0 (the vhost PMD port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received from the guest.
    pub rx_packets: u64,
    /// Bytes received from the guest.
    pub rx_bytes: u64,
    /// Frames sent to the guest.
    pub tx_packets: u64,
}

/// testpmd's forwarding counters summed over all ports since forwarding started (the
/// "Accumulated forward statistics for all ports" block of `show fwd stats all`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdStats {
    /// Frames the ports received.
    pub rx_packets: u64,
    /// Frames the ports sent.
    pub tx_packets: u64,
    /// Frames the forwarding engine freed because the TX queue did not take them within its
    /// retries (`fwd_dropped`), plus the ports' own TX errors.
    pub tx_dropped: u64,
}

/// A running dpdk-testpmd serving one vhost-user socket.
pub struct Testpmd {
    child: Child,
    stdin: ChildStdin,
    output: Arc<Mutex<String>>,
    socket: PathBuf,
    /// The socket is iovmm's (`client=1`): testpmd neither creates nor removes it.
    client: bool,
}

impl std::fmt::Debug for Testpmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testpmd")
            .field("socket", &self.socket)
            .finish()
    }
}

fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "iovmm-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Copies raw output chunks (the `testpmd> ` prompt has no newline).
fn spawn_reader(mut out: impl Read + Send + 'static, buf: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = out.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let mut b = lock(&buf);
            b.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
}

impl Testpmd {
    /// Starts testpmd with a vhost-user server socket at `socket`
    /// (`iommu` = the PMD's `iommu-support`), in rxonly mode, and starts forwarding.
    pub fn start(socket: &Path, iommu: bool) -> Result<Self, TestpmdError> {
        Self::start_forwarding(socket, iommu, "rxonly")
    }

    /// Like [`Testpmd::start`] with another forwarding mode (`macswap`, `io`,
    /// `txonly`); the single port forwards to itself (`--port-topology=loop`).
    pub fn start_forwarding(socket: &Path, iommu: bool, mode: &str) -> Result<Self, TestpmdError> {
        let _ = std::fs::remove_file(socket);
        Self::spawn(socket, iommu, mode, false)
    }

    /// testpmd as the vhost-user *client* of `socket` (`client=1`): iovmm listens there
    /// (`server=on`). testpmd retries the connection every second until iovmm listens, and
    /// again after a disconnect. It is ready once its prompt is up, connected or not.
    pub fn start_client(socket: &Path, iommu: bool, mode: &str) -> Result<Self, TestpmdError> {
        Self::spawn(socket, iommu, mode, true)
    }

    /// Like [`Testpmd::start`] (rxonly) with `queues` queue pairs: `queues=N` on the vhost
    /// vdev (it offers multiqueue; iovmm's `--vhost-user net,...,queues=N`) and
    /// `--rxq=N --txq=N`; the one forwarding lcore polls every queue.
    pub fn start_queues(socket: &Path, iommu: bool, queues: u16) -> Result<Self, TestpmdError> {
        let _ = std::fs::remove_file(socket);
        Self::spawn_queues(socket, iommu, "rxonly", false, queues.max(1))
    }

    fn spawn(socket: &Path, iommu: bool, mode: &str, client: bool) -> Result<Self, TestpmdError> {
        Self::spawn_queues(socket, iommu, mode, client, 1)
    }

    fn spawn_queues(
        socket: &Path,
        iommu: bool,
        mode: &str,
        client: bool,
        queues: u16,
    ) -> Result<Self, TestpmdError> {
        let vdev = format!(
            "net_vhost0,iface={},iommu-support={}{}{}",
            socket.display(),
            u8::from(iommu),
            if client { ",client=1" } else { "" },
            if queues > 1 {
                format!(",queues={queues}")
            } else {
                String::new()
            }
        );
        let rxq = format!("--rxq={queues}");
        let txq = format!("--txq={queues}");
        let prefix = unique_prefix();
        // testpmd prints statistics with stdio, fully buffered on a pipe: unbuffer it.
        let mut child = Command::new("stdbuf")
            .args(["-o0", "-e0", TESTPMD])
            .args(["--lcores=0@0,1@0", "--no-huge", "-m", "256", "--no-pci"])
            .args([
                "--file-prefix",
                &prefix,
                "--vdev",
                &vdev,
                "--log-level",
                "lib.vhost.config:info",
            ])
            .args([
                "--",
                "-i",
                &format!("--forward-mode={mode}"),
                "--port-topology=loop",
                "--total-num-mbufs=8192",
            ])
            .args(if queues > 1 { vec![rxq, txq] } else { vec![] })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(TestpmdError::Spawn)?;
        let output = Arc::new(Mutex::new(String::new()));
        if let Some(o) = child.stdout.take() {
            spawn_reader(o, output.clone());
        }
        if let Some(e) = child.stderr.take() {
            spawn_reader(e, output.clone());
        }
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| TestpmdError::Io(std::io::Error::other("testpmd stdin not piped")))?;
        let mut pmd = Testpmd {
            child,
            stdin,
            output,
            socket: socket.to_path_buf(),
            client,
        };
        pmd.wait_ready()?;
        pmd.command("start")?;
        Ok(pmd)
    }

    fn wait_ready(&mut self) -> Result<(), TestpmdError> {
        let t = Instant::now();
        while t.elapsed() < START_TIMEOUT {
            let ready = self.output().contains("testpmd>") && (self.client || self.socket.exists());
            if ready {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(TestpmdError::NotReady(self.output()))
    }

    /// Everything testpmd printed so far.
    pub fn output(&self) -> String {
        lock(&self.output).clone()
    }

    /// Sends one interactive command.
    pub fn command(&mut self, cmd: &str) -> Result<(), TestpmdError> {
        writeln!(self.stdin, "{cmd}").map_err(TestpmdError::Io)?;
        self.stdin.flush().map_err(TestpmdError::Io)
    }

    /// Reads port 0's counters.
    pub fn port_stats(&mut self) -> Result<PortStats, TestpmdError> {
        let before = self.output().len();
        self.command("show port stats 0")?;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let out = self.output();
            if let Some(stats) = parse_port_stats(&out[before..]) {
                return Ok(stats);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(TestpmdError::Stats(self.output()[before..].to_string()))
    }

    /// Packets port 0 received on each of its first `queues` RX queues: the per-stream
    /// blocks of `show fwd stats all` (printed when there are more streams than ports; they
    /// outlive the vhost device, unlike its extended statistics).
    pub fn rx_queue_packets(&mut self, queues: usize) -> Result<Vec<u64>, TestpmdError> {
        let before = self.output().len();
        self.command("show fwd stats all")?;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            let out = self.output();
            let text = &out[before..];
            if text.contains("Accumulated forward statistics for all ports") {
                let per: Option<Vec<u64>> = (0..queues)
                    .map(|q| {
                        let i = text.find(&format!("RX Port= 0/Queue= {q} "))?;
                        field(&text[i..], "RX-packets:")
                    })
                    .collect();
                return per.ok_or_else(|| TestpmdError::Stats(text.to_string()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(TestpmdError::Stats(self.output()[before..].to_string()))
    }

    /// The forwarding counters since forwarding started ([`FwdStats`]).
    pub fn fwd_stats(&mut self) -> Result<FwdStats, TestpmdError> {
        let before = self.output().len();
        self.command("show fwd stats all")?;
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Some(stats) = parse_fwd_stats(&self.output()[before..]) {
                return Ok(stats);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(TestpmdError::Stats(self.output()[before..].to_string()))
    }

    /// The socket path testpmd serves (or connects to, as a client).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills testpmd at once (SIGKILL, as a crashing switch dies): its vhost-user connection
    /// ends without any goodbye. Returns once the process is gone.
    pub fn kill(&mut self) -> Result<(), TestpmdError> {
        self.child.kill().map_err(TestpmdError::Io)?;
        self.child.wait().map_err(TestpmdError::Io)?;
        Ok(())
    }

    /// Waits until testpmd's output contains `text` (e.g. the vhost library's
    /// "new device" line), at most `timeout`.
    pub fn wait_output(&self, text: &str, timeout: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.output().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

fn field(text: &str, name: &str) -> Option<u64> {
    let i = text.find(name)?;
    text[i + name.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Parses the block printed by `show port stats 0`.
pub fn parse_port_stats(text: &str) -> Option<PortStats> {
    // The block ends with the throughput lines; wait for them so the counters are complete.
    let start = text.find("NIC statistics for port")?;
    let block = &text[start..];
    block.find("Tx-pps:")?;
    Some(PortStats {
        rx_packets: field(block, "RX-packets:")?,
        rx_bytes: field(block, "RX-bytes:")?,
        tx_packets: field(block, "TX-packets:")?,
    })
}

/// Parses the accumulated block of `show fwd stats all` (or of `stop`), once its TX line is
/// complete.
pub fn parse_fwd_stats(text: &str) -> Option<FwdStats> {
    let start = text.find("Accumulated forward statistics for all ports")?;
    let block = &text[start..];
    let tx = block.find("TX-total:")?;
    block[tx..].find('\n')?;
    Some(FwdStats {
        rx_packets: field(block, "RX-packets:")?,
        tx_packets: field(block, "TX-packets:")?,
        tx_dropped: field(block, "TX-dropped:")?,
    })
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        let _ = self.command("quit");
        let t = Instant::now();
        let mut exited = false;
        while t.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.client {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = "testpmd> show port stats 0\n\
  ######################## NIC statistics for port 0  ########################\n\
  RX-packets: 1000       RX-missed: 0          RX-bytes:  1514000\n\
  RX-errors: 0\n\
  RX-nombuf:  0         \n\
  TX-packets: 3          TX-errors: 0          TX-bytes:  180\n\
\n\
  Throughput (since last show)\n\
  Rx-pps:            0          Rx-bps:            0\n\
  Tx-pps:            0          Tx-bps:            0\n\
  ############################################################################\n";

    #[test]
    fn port_stats_block_is_parsed() {
        let s = parse_port_stats(SAMPLE).unwrap();
        assert_eq!(
            s,
            PortStats {
                rx_packets: 1000,
                rx_bytes: 1_514_000,
                tx_packets: 3
            }
        );
    }

    #[test]
    fn incomplete_stats_block_is_not_parsed() {
        let cut = &SAMPLE[..SAMPLE.find("Throughput").unwrap()];
        assert_eq!(parse_port_stats(cut), None);
        assert_eq!(parse_port_stats("RX-packets: 5"), None);
    }

    const FWD_SAMPLE: &str = "testpmd> show fwd stats all\n\
\n\
  ---------------------- Forward statistics for port 0  ----------------------\n\
  RX-packets: 500            RX-dropped: 0             RX-total: 500\n\
  TX-packets: 497            TX-dropped: 3             TX-total: 500\n\
  ----------------------------------------------------------------------------\n\
\n\
  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n\
  RX-packets: 500            RX-dropped: 0             RX-total: 500\n\
  TX-packets: 497            TX-dropped: 3             TX-total: 500\n\
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++\n";

    #[test]
    fn fwd_stats_block_is_parsed() {
        let want = FwdStats {
            rx_packets: 500,
            tx_packets: 497,
            tx_dropped: 3,
        };
        assert_eq!(parse_fwd_stats(FWD_SAMPLE), Some(want));
        let cut = &FWD_SAMPLE[..FWD_SAMPLE.rfind("TX-total: 500").unwrap()];
        assert_eq!(parse_fwd_stats(cut), None);
        // The per-port block alone is not the accumulated one.
        let port = &FWD_SAMPLE[..FWD_SAMPLE.find("+++").unwrap()];
        assert_eq!(parse_fwd_stats(port), None);
    }

    #[test]
    fn testpmd_starts_and_reports_zero_counters() {
        let sock = std::env::temp_dir().join(format!("iovmm-pmd-{}.sock", std::process::id()));
        let mut pmd = Testpmd::start(&sock, true).unwrap();
        assert!(pmd.socket().exists());
        assert_eq!(pmd.port_stats().unwrap(), PortStats::default());
        assert_eq!(pmd.fwd_stats().unwrap(), FwdStats::default());
        drop(pmd);
        assert!(!sock.exists());
    }
}
