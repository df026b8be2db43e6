//! `udp-floor`: the kernel's CPU per sent datagram on this machine, the floor under a
//! forwarder's CPU per forwarded packet (see `loadtest::floor`).
//!
//! ```text
//! cargo run --release -p loadtest --bin udp-floor -- --dests 150 --runs 3
//! ```
//! prints, for each sender (a socket per destination; one socket with `sendmmsg`) and each
//! receiver (spinning; an event loop that sleeps when idle), the sender's CPU µs per datagram in
//! each run and their median.

use clap::Parser;
use loadtest::floor::{run, FloorConfig, Receiver, Sender};

#[derive(Parser, Debug)]
#[command(about = "The kernel's CPU per sent UDP datagram over loopback: a forwarder's floor")]
struct Args {
    /// Destinations (subscribers): one datagram to each per round.
    #[arg(long, default_value_t = 150)]
    dests: usize,
    /// Datagram size in bytes (a video packet with SRTP's tag: ~1,200).
    #[arg(long, default_value_t = 1200)]
    len: usize,
    /// Rounds (publisher packets) per run.
    #[arg(long, default_value_t = 2000)]
    rounds: usize,
    /// Runs of each combination; the median is printed.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// CPU for the sender (the gateway's, in loadtest/baseline.sh: 0).
    #[arg(long, default_value_t = 0)]
    sender_cpu: usize,
    /// CPU for the receiver (the load tester's: 1).
    #[arg(long, default_value_t = 1)]
    receiver_cpu: usize,
    /// KB of other memory the sender touches per round, as a forwarder's own work between
    /// sends does (its cost alone is measured apart and subtracted).
    #[arg(long, default_value_t = 0)]
    touch_kb: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "{} destinations, {}-byte datagrams, {} rounds per run, sender on CPU {}, receiver on CPU {}, {} KB of other memory touched per round",
        args.dests, args.len, args.rounds, args.sender_cpu, args.receiver_cpu, args.touch_kb
    );
    println!("{:<34} {:<26} {:>10}  runs", "sender", "receiver", "µs/dgram");
    for (sender, sender_name) in
        [(Sender::PerSocket, "socket per destination, sendto"), (Sender::Batched, "one socket, sendmmsg per round")]
    {
        for (receiver, receiver_name) in [(Receiver::Spin, "spinning"), (Receiver::EventLoop, "event loop (sleeps)")] {
            let cfg = FloorConfig {
                dests: args.dests,
                len: args.len,
                rounds: args.rounds,
                sender,
                receiver,
                sender_cpu: Some(args.sender_cpu),
                receiver_cpu: Some(args.receiver_cpu),
                touch_kb: args.touch_kb,
            };
            let mut runs = Vec::new();
            for _ in 0..args.runs.max(1) {
                let r = run(&cfg)?;
                if r.received < r.sent {
                    eprintln!("note: {} of {} datagrams were dropped by the kernel", r.sent - r.received, r.sent);
                }
                runs.push(r.us_per_datagram());
            }
            let mut sorted = runs.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted[sorted.len() / 2];
            let list: Vec<String> = runs.iter().map(|v| format!("{v:.2}")).collect();
            println!("{sender_name:<34} {receiver_name:<26} {median:>10.2}  [{}]", list.join(", "));
        }
    }
    Ok(())
}
