//! `iovmm-test-backend`: iovmm's IOTLB-aware vhost-user virtio-net back end
//! (virtio-blk on a disk image with `--blk FILE`), a test tool. Listens on a
//! Unix socket and serves one front end at a time.
//!
//! Prints the counters (`CountersSnapshot` debug format) to stdout each time
//! a connection ends and, with `--once`, exits after the first connection.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use devices::vhost_user::wire::IotlbPerm;
use integration_tests::backend::blk::BlkConfig;
use integration_tests::backend::rxgen::RxGen;
use integration_tests::backend::{BackendConfig, Misbehaviour, TestBackend};
use iommu::error::chain;

/// IOTLB-aware vhost-user virtio-net test back end.
#[derive(Debug, Parser)]
#[command(name = "iovmm-test-backend")]
struct Args {
    /// Unix socket path to listen on.
    #[arg(long)]
    socket: PathBuf,
    /// Do not offer VIRTIO_F_ACCESS_PLATFORM.
    #[arg(long)]
    no_iommu: bool,
    /// Set NEED_REPLY on IOTLB misses.
    #[arg(long)]
    miss_need_reply: bool,
    /// Milliseconds to wait for an UPDATE after a miss.
    #[arg(long, default_value_t = 2000)]
    miss_timeout_ms: u64,
    /// Append TX frames (u32 length + bytes) to this file.
    #[arg(long)]
    sink: Option<PathBuf>,
    /// RX frame to inject, as hex; may be repeated.
    #[arg(long = "rx-hex")]
    rx_hex: Vec<String>,
    /// Delay every reply by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    ack_delay_ms: u64,
    /// Close the connection after this many messages.
    #[arg(long)]
    disconnect_after: Option<u64>,
    /// Send a malformed frame on the back-end channel once it is set up.
    #[arg(long)]
    bogus_backend_msg: bool,
    /// Answer IOTLB messages with a reply for the wrong request.
    #[arg(long)]
    bogus_reply: bool,
    /// Answer IOTLB messages with a non-zero ack.
    #[arg(long)]
    nack_iotlb: bool,
    /// Protocol feature bits not to offer (e.g. 8 = REPLY_ACK, 32 = BACKEND_REQ).
    #[arg(long, default_value_t = 0)]
    withhold_protocol: u64,
    /// Generate this many RX sequence frames (`rxgen::seq_frame`).
    #[arg(long, default_value_t = 0)]
    rx_frames: u64,
    /// Size of generated RX frames (bytes without the virtio-net header).
    #[arg(long, default_value_t = 1000)]
    rx_size: usize,
    /// Generated RX frames per second (0 = as fast as the guest posts buffers).
    #[arg(long, default_value_t = 0)]
    rx_rate: u64,
    /// Send every TX frame back on RX with its MACs swapped.
    #[arg(long)]
    loopback: bool,
    /// Complete chains whose buffer faults (length 0) instead of stopping the queue.
    #[arg(long)]
    complete_faulted: bool,
    /// Misbehave: ask for this permission (ro, wo, rw) on every buffer access.
    #[arg(long, value_parser = parse_perm)]
    buffer_perm: Option<IotlbPerm>,
    /// Misbehave: keep the IOTLB across SET_FEATURES.
    #[arg(long)]
    keep_iotlb_on_features: bool,
    /// Serve virtio-blk on this disk image instead of virtio-net (its size,
    /// rounded down to 512 bytes, is the capacity).
    #[arg(long, value_name = "FILE")]
    blk: Option<PathBuf>,
    /// Net queue pairs served (1..=16; GET_QUEUE_NUM reports 2 queues per pair).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    queues: u16,
    /// Exit after the first connection ends.
    #[arg(long)]
    once: bool,
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() & 1 != 0 {
        return Err(format!("odd-length hex frame {s:?}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("bad hex {s:?}: {e}")))
        .collect()
}

fn parse_perm(s: &str) -> Result<IotlbPerm, String> {
    match s {
        "ro" => Ok(IotlbPerm::ReadOnly),
        "wo" => Ok(IotlbPerm::WriteOnly),
        "rw" => Ok(IotlbPerm::ReadWrite),
        _ => Err(format!("permission {s:?} is not ro, wo or rw")),
    }
}

fn config(a: &Args) -> BackendConfig {
    BackendConfig {
        access_platform: !a.no_iommu,
        miss_need_reply: a.miss_need_reply,
        miss_timeout: Duration::from_millis(a.miss_timeout_ms),
        sink: a.sink.clone(),
        misbehave: Misbehaviour {
            ack_delay: Duration::from_millis(a.ack_delay_ms),
            disconnect_after: a.disconnect_after,
            bogus_backend_msg: a.bogus_backend_msg,
            bogus_reply: a.bogus_reply,
            nack_iotlb: a.nack_iotlb,
            withhold_protocol: a.withhold_protocol,
            buffer_perm: a.buffer_perm,
            keep_iotlb_on_features: a.keep_iotlb_on_features,
            ..Default::default()
        },
        rx_gen: (a.rx_frames > 0).then_some(RxGen {
            frames: a.rx_frames,
            size: a.rx_size,
            rate: a.rx_rate,
        }),
        loopback: a.loopback,
        complete_faulted: a.complete_faulted,
        queue_pairs: usize::from(a.queues),
        blk: a.blk.clone().map(BlkConfig::new),
    }
}

fn main() {
    env_logger::init();
    let args = Args::parse();
    let frames: Result<Vec<_>, _> = args.rx_hex.iter().map(|h| parse_hex(h)).collect();
    let frames = match frames {
        Ok(f) => f,
        Err(e) => {
            eprintln!("iovmm-test-backend: {e}");
            std::process::exit(2);
        }
    };
    let handle = match TestBackend::listen(&args.socket, config(&args)) {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "iovmm-test-backend: cannot listen on {}: {e}",
                args.socket.display(),
                e = chain(&e)
            );
            std::process::exit(1);
        }
    };
    for f in frames {
        handle.inject_rx(f);
    }
    let mut seen = 0;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let ended = handle.connections_ended();
        if ended > seen {
            seen = ended;
            println!("{:?}", handle.counters());
            if args.queues > 1 {
                let per: Vec<String> = handle
                    .tx_frames_per_pair()
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("tx_pair{i}: {n}"))
                    .collect();
                println!("TxPerPair {{ {} }}", per.join(", "));
            }
            if let Some(b) = handle.blk_counters() {
                println!("{b:?}");
            }
            if args.once {
                return;
            }
        }
    }
}
