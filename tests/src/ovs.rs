//! Open vSwitch with DPDK (Debian `openvswitch-switch-dpdk`, OVS 3.1 on DPDK 22.11) as a
//! test fixture: a private `ovsdb-server` and `ovs-vswitchd-dpdk` in a directory of their own
//! (database, sockets, logs), a netdev bridge with `dpdkvhostuserclient` ports (OVS is the
//! vhost-user client, iovmm the server: `server=on`), OpenFlow rules, port counters, and a
//! restart of the switch. Nothing of the host's own OVS (`/var/run/openvswitch`,
//! `/etc/openvswitch`) is used.
//!
//! DPDK in OVS needs hugepages (`--no-huge` conflicts with the `--in-memory` OVS always passes
//! to EAL), so [`Ovs::start`] makes sure [`HUGEPAGES`] 2 MiB pages are free and a hugetlbfs is
//! mounted, and gives back the pages it added when dropped. It configures
//! `dpdk-init=true`, `dpdk-socket-mem`, `dpdk-extra="--no-pci --iova-mode=va"` (no NIC, no
//! VFIO) and `vhost-iommu-support=true` (OVS offers ACCESS_PLATFORM only then, and only on
//! `dpdkvhostuserclient` ports). Every `ovs-vsctl` call waits for ovs-vswitchd to apply it.
//!
//! Counters are read live from OpenFlow port statistics ([`Ovs::port_counters`]), never from the
//! database's `statistics` column: ovs-vswitchd writes that only every `stats-update-interval`
//! (5 s at least, `ovs-vswitchd.conf.db(5)`), and a port whose vhost device went away loses its
//! standard counters there too, so a test that waits on it for traffic of less than 5 s can wait
//! forever. After a restart the database still holds what the killed process wrote last
//! (`link_state=up`, `dpdk_initialized=true`): [`Ovs::wait_running`] asks the running process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use thiserror::Error;

/// The DPDK build of ovs-vswitchd (the package does not make it the default alternative).
pub const VSWITCHD_DPDK: &str = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk";
/// The database schema.
pub const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
/// 2 MiB hugepages the switch needs free (`dpdk-socket-mem` = 512 MiB).
pub const HUGEPAGES: u64 = 300;
const SOCKET_MEM_MB: u64 = 512;
/// Seconds an `ovs-vsctl` call (or `wait-until`) may take.
const VSCTL_TIMEOUT: u32 = 60;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Fixture errors.
#[derive(Debug, Error)]
pub enum OvsError {
    /// A program of the package is missing.
    #[error("{0} is not installed: install openvswitch-switch-dpdk (`sudo sh resources/install-deps.sh --with-ovs`)")]
    NotInstalled(String),
    /// Hugepages could not be reserved or hugetlbfs mounted.
    #[error("cannot provide {HUGEPAGES} free 2 MiB hugepages and a hugetlbfs mount: {0}")]
    Hugepages(String),
    /// A program could not be started.
    #[error("cannot run {0}")]
    Spawn(String, #[source] std::io::Error),
    /// A command failed.
    #[error("`{cmd}` failed ({status}): {output}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
    },
    /// ovs-vswitchd did not initialise DPDK.
    #[error("ovs-vswitchd-dpdk did not initialise DPDK; its log ends with:\n{0}")]
    DpdkInit(String),
    /// The fixture directory could not be prepared.
    #[error("cannot prepare {0:?}")]
    Dir(PathBuf, #[source] std::io::Error),
}

/// Why OVS-DPDK cannot run here, if it cannot (missing programs); `None` when it can try.
pub fn unavailable() -> Option<String> {
    for p in [VSWITCHD_DPDK, SCHEMA] {
        if !Path::new(p).exists() {
            return Some(OvsError::NotInstalled(p.into()).to_string());
        }
    }
    for p in ["ovsdb-server", "ovsdb-tool", "ovs-vsctl", "ovs-ofctl"] {
        if which(p).is_none() {
            return Some(OvsError::NotInstalled(p.into()).to_string());
        }
    }
    None
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> Result<String, OvsError> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| OvsError::Spawn(line.clone(), e))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(text);
    }
    Err(OvsError::Command {
        cmd: line,
        status: out.status.to_string(),
        output: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    })
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Hugepages and a hugetlbfs mount; what was added is given back by [`Hugepages::restore`].
#[derive(Debug, Default)]
struct Hugepages {
    /// `nr_hugepages` before the fixture raised it.
    before: Option<u64>,
    /// The mount point the fixture created.
    mounted: Option<PathBuf>,
}

impl Hugepages {
    fn provide() -> Result<Self, OvsError> {
        let mut hp = Hugepages::default();
        let free = meminfo("HugePages_Free:").unwrap_or(0);
        if free < HUGEPAGES {
            let nr = read_u64(NR_HUGEPAGES).unwrap_or(0);
            let want = nr + (HUGEPAGES - free);
            std::fs::write(NR_HUGEPAGES, want.to_string()).map_err(|e| {
                OvsError::Hugepages(format!("writing {want} to {NR_HUGEPAGES}: {e}"))
            })?;
            hp.before = Some(nr);
            let got = meminfo("HugePages_Free:").unwrap_or(0);
            if got < HUGEPAGES {
                hp.restore();
                return Err(OvsError::Hugepages(format!(
                    "only {got} free after asking for {want} (memory too fragmented or limited)"
                )));
            }
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
        {
            let dir = PathBuf::from("/dev/hugepages");
            std::fs::create_dir_all(&dir)
                .map_err(|e| OvsError::Hugepages(format!("creating {dir:?}: {e}")))?;
            run(Command::new("mount")
                .args(["-t", "hugetlbfs", "nodev"])
                .arg(&dir))
            .map_err(|e| OvsError::Hugepages(e.to_string()))?;
            hp.mounted = Some(dir);
        }
        Ok(hp)
    }

    fn restore(&mut self) {
        if let Some(dir) = self.mounted.take() {
            let _ = run(Command::new("umount").arg(&dir));
        }
        if let Some(nr) = self.before.take() {
            let _ = std::fs::write(NR_HUGEPAGES, nr.to_string());
        }
    }
}

/// A private OVS-DPDK instance; dropping it stops both daemons and removes its directory.
#[derive(Debug)]
pub struct Ovs {
    dir: PathBuf,
    ovsdb: Option<Child>,
    vswitchd: Option<Child>,
    hugepages: Hugepages,
}

impl Ovs {
    /// Starts ovsdb-server and ovs-vswitchd-dpdk with their files in `dir` (created, emptied).
    pub fn start(dir: &Path) -> Result<Self, OvsError> {
        if let Some(why) = unavailable() {
            return Err(OvsError::NotInstalled(why));
        }
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| OvsError::Dir(dir.into(), e))?;
        let mut ovs = Ovs {
            dir: dir.to_path_buf(),
            ovsdb: None,
            vswitchd: None,
            hugepages: Hugepages::provide()?,
        };
        let db = dir.join("conf.db");
        run(Command::new("ovsdb-tool")
            .arg("create")
            .arg(&db)
            .arg(SCHEMA))?;
        let remote = format!("--remote=punix:{}", ovs.db_socket().display());
        ovs.ovsdb = Some(ovs.spawn(
            "ovsdb-server",
            &[
                db.to_string_lossy().as_ref(),
                &remote,
                &ovs.file_arg("--unixctl", "ovsdb-server.ctl"),
                &ovs.file_arg("--log-file", "ovsdb-server.log"),
            ],
        )?);
        ovs.wait_db_socket()?;
        ovs.vsctl_no_wait(&["init"])?;
        let extra = "other_config:dpdk-extra=--no-pci --iova-mode=va".to_string();
        let mem = format!("other_config:dpdk-socket-mem={SOCKET_MEM_MB}");
        ovs.vsctl_no_wait(&[
            "set",
            "Open_vSwitch",
            ".",
            "other_config:dpdk-init=true",
            &mem,
            &extra,
            "other_config:vhost-iommu-support=true",
        ])?;
        ovs.start_vswitchd()?;
        Ok(ovs)
    }

    /// Waits until ovsdb-server listens (its socket exists), like the testpmd fixture waits
    /// for its socket: ovs-vsctl gives up at once on a missing socket file.
    fn wait_db_socket(&mut self) -> Result<(), OvsError> {
        let t = std::time::Instant::now();
        while !self.db_socket().exists() {
            let exited = self.ovsdb.as_mut().map(|c| c.try_wait());
            if t.elapsed() > std::time::Duration::from_secs(10)
                || matches!(exited, Some(Ok(Some(_))))
            {
                let log =
                    std::fs::read_to_string(self.dir.join("ovsdb-server.out")).unwrap_or_default();
                return Err(OvsError::Command {
                    cmd: "ovsdb-server".into(),
                    status: "no database socket".into(),
                    output: log,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    fn file_arg(&self, opt: &str, name: &str) -> String {
        format!("{opt}={}", self.dir.join(name).display())
    }

    fn db_socket(&self) -> PathBuf {
        self.dir.join("db.sock")
    }

    /// The fixture's directory (database, logs, management sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn command(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(prog);
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR"] {
            c.env(var, &self.dir);
        }
        c
    }

    fn spawn(&self, prog: &str, args: &[&str]) -> Result<Child, OvsError> {
        let name = Path::new(prog)
            .file_name()
            .map_or_else(|| prog.into(), |n| n.to_string_lossy());
        let log = std::fs::File::create(self.dir.join(format!("{name}.out")))
            .map_err(|e| OvsError::Dir(self.dir.clone(), e))?;
        let err = log
            .try_clone()
            .map_err(|e| OvsError::Dir(self.dir.clone(), e))?;
        self.command(prog)
            .args(args)
            .arg("--no-chdir")
            .arg(self.file_arg("--pidfile", &format!("{name}.pid")))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| OvsError::Spawn(prog.into(), e))
    }

    /// Starts ovs-vswitchd-dpdk and waits until it initialised DPDK.
    fn start_vswitchd(&mut self) -> Result<(), OvsError> {
        let db = format!("unix:{}", self.db_socket().display());
        let child = self.spawn(
            VSWITCHD_DPDK,
            &[
                &db,
                &self.file_arg("--unixctl", "ovs-vswitchd.ctl"),
                &self.file_arg("--log-file", "ovs-vswitchd.log"),
            ],
        )?;
        self.vswitchd = Some(child);
        let ready = self.vsctl(&["wait-until", "Open_vSwitch", ".", "dpdk_initialized=true"]);
        ready.map_err(|_| OvsError::DpdkInit(self.log_tail(20)))?;
        Ok(())
    }

    /// Kills ovs-vswitchd (SIGKILL, like a crash) and starts it again on the same database:
    /// its bridges and ports come back and its vhost-user clients connect again. The database's
    /// `dpdk_initialized` is still `true` from the killed process, so this may return before the
    /// new one set up its bridges: wait for the ports with [`Ovs::wait_running`].
    pub fn restart_vswitchd(&mut self) -> Result<(), OvsError> {
        if let Some(mut c) = self.vswitchd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start_vswitchd()
    }

    /// The last `lines` lines of ovs-vswitchd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("ovs-vswitchd.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `ovs-vsctl` against this instance (waits until ovs-vswitchd applied the change).
    pub fn vsctl(&self, args: &[&str]) -> Result<String, OvsError> {
        run(self
            .command("ovs-vsctl")
            .arg(format!("--db=unix:{}", self.db_socket().display()))
            .arg(format!("--timeout={VSCTL_TIMEOUT}"))
            .args(args))
    }

    fn vsctl_no_wait(&self, args: &[&str]) -> Result<String, OvsError> {
        let mut all = vec!["--no-wait"];
        all.extend_from_slice(args);
        self.vsctl(&all)
    }

    /// `ovs-ofctl` against this instance's bridges.
    pub fn ofctl(&self, args: &[&str]) -> Result<String, OvsError> {
        run(self.command("ovs-ofctl").args(args))
    }

    /// A userspace (netdev) bridge.
    pub fn add_bridge(&self, bridge: &str) -> Result<(), OvsError> {
        self.vsctl(&[
            "add-br",
            bridge,
            "--",
            "set",
            "bridge",
            bridge,
            "datapath_type=netdev",
        ])?;
        Ok(())
    }

    /// A `dpdkvhostuserclient` port: OVS connects to `server` (iovmm's `server=on` socket) and
    /// reconnects after a disconnect.
    pub fn add_vhost_client_port(
        &self,
        bridge: &str,
        port: &str,
        server: &Path,
    ) -> Result<(), OvsError> {
        let path = format!("options:vhost-server-path={}", server.display());
        self.vsctl(&[
            "add-port",
            bridge,
            port,
            "--",
            "set",
            "Interface",
            port,
            "type=dpdkvhostuserclient",
            &path,
        ])?;
        Ok(())
    }

    /// Replaces the bridge's flows with one rule per direction: `a` ↔ `b`.
    pub fn cross_connect(&self, bridge: &str, a: &str, b: &str) -> Result<(), OvsError> {
        self.ofctl(&["del-flows", bridge])?;
        self.ofctl(&[
            "add-flow",
            bridge,
            &format!("in_port={a},actions=output:{b}"),
        ])?;
        self.ofctl(&[
            "add-flow",
            bridge,
            &format!("in_port={b},actions=output:{a}"),
        ])?;
        Ok(())
    }

    /// The port's counters as ovs-vswitchd has them now, from OpenFlow port statistics
    /// (`ovs-ofctl -O OpenFlow14 dump-ports`; see [`parse_dump_ports`] for the keys). Not the
    /// database's `statistics` column: ovs-vswitchd writes that only every
    /// `stats-update-interval` (at least 5 s), so it lags the traffic by up to 5 s. The standard
    /// counters are missing while the port's vhost device is not running (OVS reports them as
    /// unknown then); OVS's own drop counters (`ovs_tx_failure_drops`, ...) are always there.
    pub fn port_counters(
        &self,
        bridge: &str,
        port: &str,
    ) -> Result<BTreeMap<String, u64>, OvsError> {
        let text = self.ofctl(&["-O", "OpenFlow14", "dump-ports", bridge, port])?;
        Ok(parse_dump_ports(&text))
    }

    /// Waits until OVS's vhost device of `port` runs (its counters are known; that needs the
    /// device connected, its queues set up and OVS's reconfiguration done), for at most 60 s.
    /// Unlike the database's `link_state`, which a killed ovs-vswitchd leaves at `up`, this is
    /// what the running process sees.
    pub fn wait_running(&self, bridge: &str, port: &str) -> Result<(), OvsError> {
        let t = std::time::Instant::now();
        loop {
            let counters = self.port_counters(bridge, port);
            if matches!(&counters, Ok(c) if c.contains_key("tx_packets")) {
                return Ok(());
            }
            if t.elapsed() > std::time::Duration::from_secs(VSCTL_TIMEOUT.into()) {
                return Err(OvsError::Command {
                    cmd: format!("waiting for {port}'s vhost device to run"),
                    status: "timed out".into(),
                    output: format!("{counters:?}\n{}", self.log_tail(20)),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Parses `ovs-ofctl -O OpenFlow14 dump-ports` for one port: the standard counters as
/// `rx_packets`, `rx_bytes`, `rx_dropped`, `rx_errors`, `tx_packets`, `tx_bytes`, `tx_dropped`,
/// `tx_errors` (unknown ones, printed `?`, are left out), and the "CUSTOM Statistics" under their
/// own names (`ovs_tx_failure_drops`, `rx_q0_good_packets`, ...). The RFC 2819 size buckets are
/// skipped.
pub fn parse_dump_ports(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.contains("rfc2819") {
            continue;
        }
        let line = match line.split_once(": ") {
            Some((head, rest)) if head.starts_with("port ") => rest,
            _ => line,
        };
        let (dir, rest) = match line.split_once(' ') {
            Some((d @ ("rx" | "tx"), rest)) => (Some(d), rest),
            _ => (None, line),
        };
        for kv in rest.split(',') {
            let Some((k, v)) = kv.trim().split_once('=') else {
                continue;
            };
            let Ok(v) = v.trim().parse::<u64>() else {
                continue;
            };
            let key = match (dir, k.trim()) {
                (Some(d), k) => {
                    let name = match k {
                        "pkts" => "packets",
                        "drop" => "dropped",
                        "errs" => "errors",
                        other => other,
                    };
                    format!("{d}_{name}")
                }
                (None, k) => k.to_string(),
            };
            out.insert(key, v);
        }
    }
    out
}

impl Drop for Ovs {
    fn drop(&mut self) {
        for c in [self.vswitchd.take(), self.ovsdb.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        self.hugepages.restore();
        if std::env::var_os("IOVMM_KEEP_OVS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What OVS 3.1 printed for a running `dpdkvhostuserclient` port (custom counters cut).
    const DUMP: &str = "OFPST_PORT reply (OF1.4) (xid=0x4): 1 ports
  port  1: rx pkts=840, bytes=215040, drop=0, errs=?, frame=?, over=?, crc=?
           tx pkts=3, bytes=768, drop=7, errs=?, coll=?
           duration=9.333s
           rx rfc2819 1_to_64_packets=0, 256_to_511_packets=840, broadcast_packets=840,
           tx rfc2819 1_to_64_packets=0, 256_to_511_packets=3,
           CUSTOM Statistics
                      ovs_tx_retries=0, ovs_tx_failure_drops=7, ovs_tx_mtu_exceeded_drops=0,
                      rx_q0_good_packets=840, tx_q0_iotlb_misses=1,
";

    #[test]
    fn dump_ports_parse() {
        let m = parse_dump_ports(DUMP);
        assert_eq!(m.get("rx_packets"), Some(&840));
        assert_eq!(m.get("rx_bytes"), Some(&215_040));
        assert_eq!(m.get("rx_dropped"), Some(&0));
        assert_eq!(m.get("tx_packets"), Some(&3));
        assert_eq!(m.get("tx_dropped"), Some(&7));
        assert_eq!(m.get("ovs_tx_failure_drops"), Some(&7));
        assert_eq!(m.get("rx_q0_good_packets"), Some(&840));
        assert_eq!(m.get("tx_q0_iotlb_misses"), Some(&1));
        // Unknown counters (`errs=?`), the duration and the RFC 2819 size buckets are left out.
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        let want = [
            "ovs_tx_failure_drops",
            "ovs_tx_mtu_exceeded_drops",
            "ovs_tx_retries",
            "rx_bytes",
            "rx_dropped",
            "rx_packets",
            "rx_q0_good_packets",
            "tx_bytes",
            "tx_dropped",
            "tx_packets",
            "tx_q0_iotlb_misses",
        ];
        assert_eq!(keys, want);
    }

    #[test]
    fn a_port_whose_device_is_down_has_only_ovs_counters() {
        let down = "  port  2: rx pkts=?, bytes=?, drop=?, errs=?, frame=?, over=?, crc=?
           tx pkts=?, bytes=?, drop=?, errs=?, coll=?
           CUSTOM Statistics
                      ovs_tx_retries=0, ovs_tx_failure_drops=12,
";
        let m = parse_dump_ports(down);
        assert!(!m.contains_key("tx_packets") && !m.contains_key("rx_packets"));
        assert_eq!(m.get("ovs_tx_failure_drops"), Some(&12));
        assert!(parse_dump_ports("").is_empty());
    }
}
