//! Arbitrary datagrams at a READY publish connection, from the authenticated peer's address (so
//! they reach DTLS/SRTP/RTCP parsing) and from a stranger: never a panic. The first byte's low
//! bit picks the gateway's socket mode: a socket per connection, or one socket shared by every
//! connection (`media.mux`), where the engine first finds each datagram's connection itself.
#![no_main]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use gateway_core::sim::Sim;
use gateway_core::CoreConfig;
use libfuzzer_sys::fuzz_target;

fn fresh(shared: bool) -> (Sim, usize) {
    let mut sim = Sim::new(1, CoreConfig::default());
    if shared {
        sim.share_one_port();
    }
    let p = sim.add_peer("pub");
    sim.publish(p);
    assert!(sim.run_until(Duration::from_secs(5), |s| s.peers[p].connected));
    sim.send_media(p, 5);
    sim.run_for(Duration::from_millis(50));
    (sim, p)
}

static WORLDS: [Mutex<Option<(Sim, usize)>>; 2] = [Mutex::new(None), Mutex::new(None)];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else { return };
    let shared = mode & 1 == 1;
    let mut guard = WORLDS[usize::from(shared)].lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|(sim, p)| sim.peers[*p].key.is_none_or(|k| !sim.engine.has_connection(k))) {
        *guard = Some(fresh(shared));
    }
    let (sim, p) = guard.as_mut().unwrap();
    let key = sim.peers[*p].key.unwrap();
    let peer = sim.peers[*p].addr;
    let stranger = SocketAddr::from(([10, 9, 9, 9], 9999));
    // Length-prefixed datagrams; the top bit of the prefix picks the sender.
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        let (dgram, next) = tail.split_at(len);
        let from = if head & 0x80 == 0 { peer } else { stranger };
        if shared {
            sim.inject_shared(from, dgram);
        } else {
            sim.inject(key, from, dgram);
        }
        rest = next;
    }
    sim.run_for(Duration::from_millis(5));
});
