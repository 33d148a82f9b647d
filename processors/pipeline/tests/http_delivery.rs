//! The notifications processor's webhook and push path against a real HTTP receiver on
//! 127.0.0.1, run by the runtime's test driver: several calls in flight at once and never
//! more than `[app.http] max_in_flight`; a 503 is retried after its backoff and delivered
//! once; a 410 is the record's dead letter; a settled call read again is not made again; a
//! call pending when its process died is made again by the next one (at least once) and
//! settled once.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spool_pipeline::events::{Channel, NotificationKind, NotificationRequest};
use spool_pipeline::processors::envelope;
use spool_pipeline::processors::notifications::{Notifications, NotificationsSettings};
use spool_pipeline::topics;
use spool_processor::testing::TestDriver;
use support::receiver::Receiver;

fn settings(in_flight: u32) -> NotificationsSettings {
    let mut s = NotificationsSettings {
        address_partitions: 2,
        ..NotificationsSettings::default()
    };
    s.http.max_in_flight = in_flight;
    s.http.retry_initial_ms = 300;
    s
}

fn request(base: &str, id: &str, channel: Channel) -> spool_processor::Event<NotificationRequest> {
    let path = if channel == Channel::Webhook {
        "hook"
    } else {
        "push"
    };
    let n = NotificationRequest {
        id: id.into(),
        kind: NotificationKind::DealAlert,
        user: format!("u-{id}"),
        user_name: "Eleni".into(),
        channel,
        address: format!("{base}/{path}/{id}"),
        time_zone: "UTC".into(),
        quiet_hours: None,
        deal: Some(support::book_deal("p1")),
        campaign: None,
        at_ms: 1_000,
    };
    envelope("matching", id, &n, n.at_ms)
}

/// Idempotency keys recorded (calls settled as delivered).
fn settled(d: &TestDriver<Notifications>) -> Vec<String> {
    d.store_entries("__effects")
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .collect()
}

/// Advances the driver's clock in 100 ms steps (real time passing too, for the calls) until
/// `done` or 15 s passed.
async fn run_until(
    d: &mut TestDriver<Notifications>,
    mut done: impl FnMut(&TestDriver<Notifications>) -> bool,
) {
    let until = Instant::now() + Duration::from_secs(15);
    while !done(d) {
        assert!(
            Instant::now() < until,
            "not settled in 15 s: {:?}",
            settled(d)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.advance_wall_clock_async(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_retries_dead_letters_and_restarts() {
    let rx = Receiver::start_slow(Duration::from_millis(150), |path, key, attempt| {
        if path.ends_with("/gone") {
            410
        } else if key.starts_with("flaky") && attempt == 1 {
            503
        } else {
            200
        }
    })
    .await;
    let base = rx.base();
    let h = Notifications::new(&settings(4)).unwrap();
    let mut d = TestDriver::new("notifications", h).with_topic(topics::NOTIFICATION_REQUESTS, 1);
    let mut ids: Vec<String> = (0..8).map(|i| format!("n{i:03}")).collect();
    ids.push("flaky0".into());
    ids.push("gone".into());
    for (i, id) in ids.iter().enumerate() {
        let ch = if i % 2 == 0 {
            Channel::Webhook
        } else {
            Channel::Push
        };
        d.pipe_event_async(topics::NOTIFICATION_REQUESTS, &request(&base, id, ch))
            .await;
    }
    run_until(&mut d, |d| settled(d).len() >= 9).await;
    // The dead letter is written in the settling transaction of the 410.
    run_until(&mut d, |_| rx.calls().iter().any(|c| c.key == "gone")).await;
    d.advance_wall_clock_async(Duration::from_millis(200)).await;

    // Several at once, bounded by max_in_flight.
    let max_open = rx.max_open();
    assert!(
        (2..=4).contains(&max_open),
        "calls open at once: {max_open}"
    );
    let mut by_key: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for c in rx.calls() {
        by_key.entry(c.key.clone()).or_default().push(c.status);
    }
    for id in &ids[..8] {
        assert_eq!(by_key[id], vec![200], "{id}");
    }
    assert_eq!(
        by_key["flaky0"],
        vec![503, 200],
        "retried once after its 503"
    );
    assert_eq!(by_key["gone"], vec![410], "a 4xx is not retried");
    let mut keys = settled(&d);
    keys.sort();
    let mut want: Vec<String> = ids[..9].to_vec();
    want.sort();
    assert_eq!(keys, want, "the delivered calls' idempotency keys");
    let dl = d.dead_letters(topics::NOTIFICATION_REQUESTS);
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert!(
        dl[0].header("spool_dlq_error").unwrap().contains("410"),
        "{dl:?}"
    );
    assert!(
        dl[0].event::<NotificationRequest>().is_ok(),
        "the original record is carried"
    );

    // A settled call read again (a redelivery) is not made again.
    d.pipe_event_async(
        topics::NOTIFICATION_REQUESTS,
        &request(&base, "n000", Channel::Webhook),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    d.advance_wall_clock_async(Duration::from_millis(500)).await;
    assert_eq!(rx.calls().iter().filter(|c| c.key == "n000").count(), 1);

    // A call pending when its process died (its result lost with the process) is made again
    // by the next process once its timer fires: at least once, settled once.
    d.pipe_event_async(
        topics::NOTIFICATION_REQUESTS,
        &request(&base, "crash", Channel::Push),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rx.calls().iter().filter(|c| c.key == "crash").count(), 1);
    *d.handler_mut() = Notifications::new(&settings(4)).unwrap();
    d.restart();
    run_until(&mut d, |d| settled(d).contains(&"crash".to_owned())).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.advance_wall_clock_async(Duration::from_millis(500)).await;
    assert_eq!(rx.calls().iter().filter(|c| c.key == "crash").count(), 2);
    assert!(d.dead_letters(topics::NOTIFICATION_REQUESTS).is_empty());
}
