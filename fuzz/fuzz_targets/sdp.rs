//! Arbitrary SDP through the publish path (offer) and the subscribe path (answer): errors, never
//! panics, and a refused connection releases everything (the engine forgets it). One engine
//! serves every input (a fresh room each time), as in the server.
#![no_main]

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use gateway_core::{ConnKey, ConnectionSpec, CoreConfig, Engine, NewConnection, Output};
use signaling_api::protocol::Role;
use libfuzzer_sys::fuzz_target;

fn spec(key: u64, room: &str, role: Role) -> NewConnection {
    NewConnection {
        key: ConnKey(key),
        local: SocketAddr::from(([127, 0, 0, 1], 40000 + (key % 20000) as u16)),
        spec: ConnectionSpec {
            connection_id: format!("c_{key}"),
            room_id: room.into(),
            participant_id: format!("p{key}"),
            role,
        },
    }
}

static ENGINE: Mutex<Option<(Engine, u64)>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let now = Instant::now();
    let mut guard = ENGINE.lock().unwrap_or_else(|e| e.into_inner());
    let (engine, n) = guard.get_or_insert_with(|| (Engine::new(CoreConfig::default()), 0));
    *n += 1;
    let room = format!("r{n}");
    let (publisher, subscriber) = (*n * 2, *n * 2 + 1);
    engine.create_room(&room);

    // As a publish offer, then as a renegotiation of a connection that accepted it.
    if engine.publish(now, spec(publisher, &room, Role::Publish), &text).is_ok() {
        let _ = engine.republish(now, &format!("c_{publisher}"), &text);
    } else {
        assert!(!engine.has_connection(ConnKey(publisher)), "a refused offer leaves no connection");
    }

    // As the answer to a subscribe offer, and as a candidate.
    engine.subscribe(now, spec(subscriber, &room, Role::Subscribe)).expect("subscribe in a fresh room");
    let _ = engine.answer(now, &format!("c_{subscriber}"), &text);
    let _ = engine.add_candidate(now, &format!("c_{subscriber}"), &text);
    engine.close_room(now, &room, "done");
    while let Some(out) = engine.poll_output() {
        if let Output::Closed { key, .. } = out {
            assert!(!engine.has_connection(key));
        }
    }
    assert_eq!(engine.connection_count(), 0, "closing the room ended everything");
    assert_eq!(engine.room_count(), 0);
});
