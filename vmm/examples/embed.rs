//! Embedding iovmm: start a VM behind a virtio-iommu with a vhost-user net
//! device, read its IOTLB counters while it runs, stop it, and check that
//! its back end holds no translation the guest removed.
//!
//! ```sh
//! cargo run --example embed -- KERNEL SOCKET [CMDLINE]
//! ```
//!
//! `SOCKET` is a listening vhost-user back end with IOTLB support (e.g.
//! `dpdk-testpmd --vdev net_vhost0,iface=SOCKET,iommu-support=1,client=0`
//! or the project's `iovmm-test-backend`). The configuration is the same
//! typed `VmConfig` the CLI's `--config` file holds.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vmm::{VmConfig, VmExit, Vmm};

fn config(kernel: PathBuf, socket: PathBuf, cmdline: String) -> Result<VmConfig, String> {
    let json = serde_json::json!({
        "kernel": kernel,
        "cmdline": cmdline,
        "memory": "256M",
        "iommu": { "kind": "virtio" },
        "vhost_user": [{ "kind": "net", "socket": socket, "iommu": true }],
    });
    let config: VmConfig = serde_json::from_value(json).map_err(|e| e.to_string())?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn run(config: &VmConfig) -> Result<(), String> {
    let mut vm = Vmm::start(config).map_err(|e| format!("start: {e}"))?;
    // An orchestrator would watch the VM here (`vm.counters()`, `vm.pause()`,
    // ...) and end it with `vm.shutdown()`: the ACPI power button, then a
    // forced stop. This example lets the guest run for up to 10 s.
    let exit = vm
        .wait_timeout(Duration::from_secs(10))
        .map_err(|e| format!("wait: {e}"))?;
    println!("exit: {exit:?}");
    let counters = serde_json::to_string_pretty(&vm.counters()).map_err(|e| e.to_string())?;
    println!("{counters}");
    for dev in vm.vhost_user_devices() {
        let s = dev.stats();
        let stale = dev.stale_translations();
        println!(
            "{}: {} misses, {} UPDATEs, {} INVALIDATEs; translations the guest removed that the back end may still hold: {stale:x?}",
            dev.bdf, s.bridge.misses, s.iotlb.updates, s.iotlb.invalidations
        );
        if !stale.is_empty() {
            return Err("the security invariant did not hold".into());
        }
    }
    if exit == VmExit::Stopped {
        println!("(the guest was still running after 10 s and was stopped)");
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(kernel), Some(socket)) = (args.next(), args.next()) else {
        eprintln!("usage: embed KERNEL SOCKET [CMDLINE]");
        return ExitCode::from(2);
    };
    let cmdline = args.next().unwrap_or_else(|| "console=ttyS0".into());
    match config(kernel.into(), socket.into(), cmdline).and_then(|c| run(&c)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::FAILURE
        }
    }
}
