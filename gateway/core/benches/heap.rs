//! Heap held by the media engine per subscribed stream (issue: memory per subscriber), measured
//! with dhat on the simulation: one publisher (VP8 at ~1.5 Mbit/s in 50 frames/s, Opus) and N
//! subscribers, 10 s of media in virtual time (longer than the retransmission history,
//! `media.rtx_history_ms`), then the bytes still live that were allocated inside `gateway_core` or str0m on behalf of the engine,
//! told apart from the simulated peers' own allocations by the allocation's stack.
//!
//!     cargo bench -p gateway-core --bench heap            # N = 50 and 200
//!     HEAP_SUBSCRIBERS=100 cargo bench -p gateway-core --bench heap
//!     HEAP_RTX_MS=3000 cargo bench -p gateway-core --bench heap   # media.rtx_history_ms (1000)
//!
//! Prints the live heap (engine and simulated peers together) and writes
//! `$TMPDIR/dhat-heap-<N>.json` for each N (dhat's viewer, or any script, splits the live bytes
//! at the end by allocation stack: frames in `gateway/core/src` outside `sim.rs` are the
//! engine's, `test-peer`/`sim.rs` the peers'). Byte counts do not depend on the machine's load.
//! Findings are in docs/performance.md ("Memory per subscribed stream").

use std::time::Duration;

use gateway_core::sim::{LayerSpec, Sim};
use gateway_core::CoreConfig;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// ~1.5 Mbit/s at 50 frames/s.
const FRAME_BYTES: usize = 3_750;

fn room(subscribers: usize) -> Sim {
    let rtx_ms = std::env::var("HEAP_RTX_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let cfg = CoreConfig { rtx_history: Duration::from_millis(rtx_ms), ..CoreConfig::default() };
    let mut sim = Sim::new(7, cfg);
    let p = sim.add_peer("pub");
    sim.publish_layers(p, &[LayerSpec { rid: None, frame_bytes: FRAME_BYTES }]);
    assert!(sim.run_until(Duration::from_secs(10), |s| s.peers[p].connected));
    let subs: Vec<usize> = (0..subscribers).map(|i| sim.add_peer(&format!("s{i}"))).collect();
    for &s in &subs {
        sim.subscribe(s);
    }
    let all = subs.clone();
    assert!(sim.run_until(Duration::from_secs(30), move |s| all.iter().all(|&i| s.peers[i].connected)));
    sim.stream_for(p, Duration::from_secs(10));
    sim
}

fn main() {
    let counts: Vec<usize> = match std::env::var("HEAP_SUBSCRIBERS") {
        Ok(v) => v.split(',').map(|n| n.trim().parse().expect("HEAP_SUBSCRIBERS: numbers")).collect(),
        Err(_) => vec![50, 200],
    };
    for &n in &counts {
        let profiler = dhat::Profiler::builder()
            .trim_backtraces(None)
            .file_name(std::env::temp_dir().join(format!("dhat-heap-{n}.json")))
            .build();
        let sim = room(n);
        let stats = dhat::HeapStats::get();
        println!("{n} subscribers: {} bytes live in {} blocks (engine and peers)", stats.curr_bytes, stats.curr_blocks);
        // The profile's end is now, with the room still live.
        drop(profiler);
        drop(sim);
    }
}
