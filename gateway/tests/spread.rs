//! One room on every media worker (`media.spread`): with two workers, the subscribers of one
//! room, and of many rooms, are served half by each; every payload reaches every subscriber
//! intact whichever worker serves it; track changes reach the subscribers on the other worker
//! (re-offers when the publisher leaves); and nothing is left behind.

mod common;

use std::time::Duration;

use common::*;
use str0m::media::MediaKind;

fn payloads(p: &Peer, kind: MediaKind, sent: bool) -> Vec<Vec<u8>> {
    p.with(|l| {
        let list = if sent { &l.sent } else { &l.rtp };
        list.iter().filter(|(k, _)| *k == kind).map(|(_, b)| b.clone()).collect()
    })
}

async fn worker_metric(api: &Api, name: &str) -> [f64; 2] {
    let mut v = [0.0; 2];
    for (w, slot) in v.iter_mut().enumerate() {
        *slot = api.metric(&format!(r#"{name}{{worker="{w}"}}"#)).await;
    }
    v
}

async fn send_paced(all: &[(Peer, Vec<Peer>)], packets: usize) {
    for _ in 0..packets / 2 {
        for (p, _) in all {
            p.send_media(2);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rooms of one publisher and `subs` subscribers each; media sent once everyone is READY.
/// Returns each worker's share of the datagrams sent meanwhile.
async fn rooms_over_two_workers(
    api: &Api,
    tag: &str,
    rooms: usize,
    subs: usize,
    packets: usize,
) -> (Vec<(Peer, Vec<Peer>)>, [f64; 2]) {
    let mut all = Vec::new();
    for r in 0..rooms {
        let room = api.create_room_of(&format!("{tag}-{r}"), 16).await;
        let publisher = Peer::join(api, &room, &format!("pub{r}")).await;
        publisher.publish();
        publisher.wait("publish READY", 10, |l| !l.events("READY").is_empty() && l.connected).await;
        let mut subscribers = Vec::new();
        for i in 0..subs {
            let s = Peer::join(api, &room, &format!("sub{r}-{i}")).await;
            s.subscribe();
            subscribers.push(s);
        }
        for s in &subscribers {
            s.wait("subscribe READY", 15, |l| l.connected && !l.events("READY").is_empty()).await;
            // The offer carries the room's tracks whichever worker made it.
            let offer = s.with(|l| l.offers.last().cloned().unwrap_or_default());
            assert_eq!(offer.matches("m=video").count(), 1, "{}: {offer}", s.name);
        }
        all.push((publisher, subscribers));
    }
    // Counters are published once a second: start from a settled value.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = worker_metric(api, "gateway_worker_egress_packets_total").await;
    // At a camera's pace (2 video packets and one audio packet every 20 ms): a burst of
    // hundreds of packets at once would be paced and cut by each subscriber's bandwidth
    // estimate, with or without spread.
    send_paced(&all, packets).await;
    let per_sub = packets + packets / 2;
    // A live stream keeps going: a short second burst follows (str0m may hold the last audio
    // packets of a burst for a subscriber until its next send; seen with and without spread).
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_paced(&all, 20).await;
    for (p, subscribers) in &all {
        for s in subscribers {
            s.wait("all media", 20, |l| {
                let video = l.rtp.iter().filter(|(k, _)| *k == MediaKind::Video).count();
                video >= packets + 20 && l.rtp.len() - video >= packets / 2
            })
            .await;
            for kind in [MediaKind::Video, MediaKind::Audio] {
                let sent = payloads(p, kind, true);
                let n = if kind == MediaKind::Video { packets } else { packets / 2 };
                let got = payloads(s, kind, false);
                assert!(got.len() >= n, "{}: {kind:?} {} of {n}", s.name, got.len());
                let first_diff = (0..n).find(|&i| got[i] != sent[i]);
                let show = |v: &Vec<u8>| String::from_utf8_lossy(&v[..v.len().min(24)]).into_owned();
                assert!(
                    first_diff.is_none(),
                    "{}: {kind:?} intact and in order; first difference at {first_diff:?}: got {:?} sent {:?}",
                    s.name,
                    first_diff.map(|i| show(&got[i])),
                    first_diff.map(|i| show(&sent[i]))
                );
            }
        }
    }
    let expected = (rooms * subs * per_sub) as f64;
    let delta = poll_until("egress counted", 5, || async {
        let now = worker_metric(api, "gateway_worker_egress_packets_total").await;
        let d = [now[0] - before[0], now[1] - before[1]];
        if d[0] + d[1] >= expected {
            Ok(d)
        } else {
            Err(format!("{d:?} of {expected}"))
        }
    })
    .await;
    let total = delta[0] + delta[1];
    (all, [delta[0] / total, delta[1] / total])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_room_and_many_rooms_are_served_by_both_workers() {
    let gw = start_gateway_with(44400, 44449, |c| {
        c.media.workers = 2;
        c.media.spread = true;
    })
    .await;
    let total_ports = gw.ports.total();
    let api = Api::new(gw.base_url());

    // One publisher, eight subscribers: four on each worker.
    let (one, share) = rooms_over_two_workers(&api, "one", 1, 8, 100).await;
    assert!(share.iter().all(|s| (0.4..=0.6).contains(s)), "egress per worker, one room: {share:?}");
    // The home handed every packet (100 video + 50 audio) to the other worker, once, dropping none.
    let relayed = worker_metric(&api, "gateway_worker_relayed_packets_total").await;
    assert!(relayed.iter().any(|r| *r >= 150.0) && relayed.contains(&0.0), "relayed: {relayed:?}");
    assert_eq!(worker_metric(&api, "gateway_worker_relay_dropped_total").await, [0.0, 0.0]);

    // The publisher leaves: every subscriber, on either worker, hears of it and is re-offered
    // without its tracks.
    let (publisher, subscribers) = &one[0];
    let offers: Vec<usize> = subscribers.iter().map(|s| s.with(|l| l.offers.len())).collect();
    publisher.leave();
    for (s, n) in subscribers.iter().zip(offers) {
        s.wait("stream_removed", 5, |l| l.of_type("stream_removed").len() == 2).await;
        s.wait("a re-offer without the tracks", 5, |l| l.offers.len() > n).await;
        let last = s.with(|l| l.offers.last().unwrap().clone());
        assert!(last.contains("m=video 0 ") || last.contains("m=video 0\r"), "{}: {last}", s.name);
    }
    for s in subscribers {
        s.leave();
    }

    // Four rooms of one publisher and three subscribers: the rooms' homes alternate, and the
    // subscribers go where there are fewest.
    let (many, share) = rooms_over_two_workers(&api, "many", 4, 3, 100).await;
    assert!(share.iter().all(|s| (0.4..=0.6).contains(s)), "egress per worker, four rooms: {share:?}");
    for (p, subscribers) in &many {
        p.leave();
        for s in subscribers {
            s.leave();
        }
    }
    let apir = &api;
    poll_until("the workers hold no connection", 10, || async move {
        let n = worker_metric(apir, "gateway_worker_connections").await;
        if n == [0.0, 0.0] {
            Ok(())
        } else {
            Err(format!("{n:?} connections"))
        }
    })
    .await;
    eventually("every port back in the pool", 5, || gw.ports.free() == total_ports).await;
    gw.shutdown(Duration::from_secs(1)).await;
}
