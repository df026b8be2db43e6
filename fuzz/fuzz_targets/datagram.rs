//! Arbitrary datagrams at a READY publish connection, from the authenticated peer's address (so
//! they reach DTLS/SRTP/RTCP parsing) and from a stranger: never a panic.
#![no_main]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use gateway_core::sim::Sim;
use gateway_core::CoreConfig;
use libfuzzer_sys::fuzz_target;

fn fresh() -> (Sim, usize) {
    let mut sim = Sim::new(1, CoreConfig::default());
    let p = sim.add_peer("pub");
    sim.publish(p);
    assert!(sim.run_until(Duration::from_secs(5), |s| s.peers[p].connected));
    sim.send_media(p, 5);
    sim.run_for(Duration::from_millis(50));
    (sim, p)
}

static WORLD: Mutex<Option<(Sim, usize)>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = WORLD.lock().unwrap_or_else(|e| e.into_inner());
    if guard.as_ref().is_none_or(|(sim, p)| sim.peers[*p].key.is_none_or(|k| !sim.engine.has_connection(k))) {
        *guard = Some(fresh());
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
        sim.inject(key, from, dgram);
        rest = next;
    }
    sim.run_for(Duration::from_millis(5));
});
