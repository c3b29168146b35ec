//! `iovmm-tap-peer`: counts and checks the frames an L2 guest sends through
//! vhost-net on a tap, sends frames the guest receives, and prints one
//! `TAP-PEER {json}` line on SIGTERM/SIGINT (see
//! `integration_tests::nested::tap_peer`).

use clap::Parser;
use integration_tests::nested::tap_peer::{run, PeerConfig};

/// The far end of a vhost-net device's tap.
#[derive(Debug, Parser)]
#[command(name = "iovmm-tap-peer")]
struct Args {
    /// The tap (it must exist and be up).
    #[arg(long)]
    tap: String,
    /// Length of the guest netbench's UDP frames (their payload is checked).
    #[arg(long, default_value_t = 256)]
    udp_size: usize,
    /// Sequence frames to send into the guest once the tap has a carrier.
    #[arg(long, default_value_t = 0)]
    rx_frames: u64,
    /// Their size in bytes (22..=1514).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(22..=1514))]
    rx_size: u16,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let cfg = PeerConfig {
        tap: a.tap,
        udp_size: a.udp_size,
        rx_frames: a.rx_frames,
        rx_size: usize::from(a.rx_size),
    };
    match run(&cfg) {
        Ok(s) => {
            let json = serde_json::to_string(&s).unwrap_or_else(|e| format!("\"{e}\""));
            println!("TAP-PEER {json}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iovmm-tap-peer: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
