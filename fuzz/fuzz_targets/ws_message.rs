//! The WebSocket message parser: never panics; whatever parses survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signaling_api::protocol::{ClientMessage, ServerMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<ClientMessage>(data) {
        let text = serde_json::to_string(&m).expect("a parsed message serializes");
        let again: ClientMessage = serde_json::from_str(&text).expect("and parses again");
        assert_eq!(m, again);
    }
    let _ = serde_json::from_slice::<ServerMessage>(data);
});
