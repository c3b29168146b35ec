//! The `iovmm` command-line tool: parse options, run the VM, map the outcome
//! to an exit code.

use std::process::ExitCode;

use clap::Parser;
use vmm::cli::Cli;
use vmm::{VmExit, Vmm};

fn describe(exit: &VmExit) -> (u8, Option<String>) {
    match exit {
        VmExit::PowerOff => (0, None),
        VmExit::ExitPort(0) => (0, None),
        VmExit::ExitPort(code) => (
            (*code as u8).max(1),
            Some(format!(
                "guest reported failure code {code} on the exit port"
            )),
        ),
        VmExit::Reset => (
            2,
            Some("guest requested a reset; iovmm does not reboot guests".into()),
        ),
        VmExit::Stopped => (3, Some("VM stopped by request".into())),
        VmExit::Halted { vcpu, rip } => (
            4,
            Some(format!(
                "vCPU {vcpu} halted with interrupts disabled at RIP {rip:#x}"
            )),
        ),
        VmExit::GuestCrash { vcpu, rip } => (
            4,
            Some(format!(
                "guest crashed (triple fault) on vCPU {vcpu} at RIP {rip:#x}"
            )),
        ),
        VmExit::InternalError {
            vcpu,
            suberror,
            rip,
        } => (
            5,
            Some(format!(
                "KVM internal error (suberror {suberror}) on vCPU {vcpu} at guest RIP {rip:#x}: \
                 the hypervisor could not emulate the guest's instruction"
            )),
        ),
        VmExit::RunFailed { vcpu, errno } => (
            5,
            Some(format!(
                "KVM_RUN failed on vCPU {vcpu}: {}",
                std::io::Error::from_raw_os_error(*errno)
            )),
        ),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .format_timestamp_micros()
        .init();
    let result = cli
        .to_config()
        .map_err(vmm::VmmError::from)
        .and_then(|cfg| {
            let mut vmm = Vmm::start(&cfg)?;
            vmm.wait()
        });
    match result {
        Ok(exit) => {
            let (code, msg) = describe(&exit);
            if let Some(m) = msg {
                eprintln!("iovmm: {m}");
            }
            ExitCode::from(code)
        }
        Err(e) => {
            eprint!("iovmm: error: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprint!(": {s}");
                src = s.source();
            }
            eprintln!();
            ExitCode::from(1)
        }
    }
}
