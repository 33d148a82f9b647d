//! Matching's call-again path on the live runtime: a real `spoold` and the `spool-matching`
//! binary with `[app] fan_out_chunk = 7`, so a deal whose audience in a partition is larger
//! than 7 users is handled over several handler calls (`Context::call_again`) inside the
//! deal's one transaction, and a deal leaving is paged the same way (removals of 7 users per
//! call).
//!
//! 60 users in one category, 50 of them interested in a 30 % drop (every 6th wants 40 %),
//! with e-mail and webhook (every 4th also push), 3 of their e-mail addresses flagged
//! unreachable. Deal transitions are written to every partition of `deal-broadcast` as
//! `spool-deals` does. Read committed, the notification requests and timeline events must be
//! exactly the in-memory model's (`Matcher` over a `MemStore`, all calls at once), each event
//! id once:
//!
//! 1. a quiet run of 10 deals entering and 5 of them leaving;
//! 2. a burst of 240 deals entering and 120 leaving while `spool-matching` is SIGKILLed 3
//!    times at seeded random moments and started again on the same state directory: nothing
//!    lost, nothing repeated.
//!
//! Every deal's requests in every partition outnumber what one call can emit (7 users × at
//! most 3 channels; checked), so every deal went through `call_again`. A kill lands at a random moment of the handling: the test reports how
//! many kills found matching's `deal-broadcast` input not yet committed (work the next
//! incarnation redid), and requires at least one.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use spool_client::{Client, OffsetSpec, TopicPartition};
use spool_pipeline::events::{
    AddressStatus, AlertSettings, Channel, DealTransition, NotificationRequest, TimelineEvent,
    TimelineOp, TransitionKind,
};
use spool_pipeline::matching::{Matcher, MemStore, Output};
use spool_pipeline::processors::envelope;
use spool_pipeline::{publish, topics};
use spool_processor::envelope as ce;
use support::Scratch;
use support::procs::Processor;

const PARTITIONS: u32 = 2;
const CHUNK: usize = 7;
const USERS: usize = 60;
const CATEGORY: &str = "books";

fn user(i: usize) -> AlertSettings {
    let mut channels = vec![Channel::Email, Channel::Webhook];
    if i.is_multiple_of(4) {
        channels.push(Channel::Push);
    }
    AlertSettings {
        user: format!("u{i:03}"),
        name: format!("User {i}"),
        categories: vec![CATEGORY.into()],
        // A 30 % deal reaches every user but every 6th (40 %); the others' minimums differ,
        // so the audience index is walked across several drop levels.
        min_drop_bp: if i % 6 == 5 {
            4_000
        } else {
            1_000 + 500 * (i % 4) as u32
        },
        channels,
        email: Some(format!("u{i:03}@fan.test")),
        webhook_url: Some(format!("http://127.0.0.1:9/hook/u{i:03}")),
        push_url: Some(format!("http://127.0.0.1:9/push/u{i:03}")),
        time_zone: "UTC".into(),
        quiet_hours: None,
        at_ms: 1_000,
    }
}

fn flag(i: usize) -> AddressStatus {
    AddressStatus {
        address: format!("u{i:03}@fan.test"),
        unreachable: true,
        reason: "550 5.1.1 unknown user".into(),
        mail_id: None,
        at_ms: 2_000,
    }
}

fn transition(k: usize, kind: TransitionKind) -> DealTransition {
    DealTransition {
        id: format!("b{k:04}:1"),
        product: format!("b{k:04}"),
        episode: 1,
        kind,
        category: CATEGORY.into(),
        name: format!("Book {k}"),
        price: 700,
        reference: 1_000,
        drop_bp: if kind == TransitionKind::Entered {
            3_000
        } else {
            0
        },
        merchant: "m000".into(),
        at_ms: 10_000 + k as i64,
    }
}

/// Writes `t` to every partition of `deal-broadcast` (what `spool-deals` does).
async fn broadcast(producer: &spool_client::Producer, t: &DealTransition) {
    let r = envelope("deals", t.id.clone(), t, t.at_ms)
        .to_record()
        .unwrap();
    for p in 0..PARTITIONS {
        let _ack = producer
            .send_to(topics::DEAL_BROADCAST, p, r.clone())
            .await
            .unwrap();
    }
}

/// What matching wrote, read committed: event ids with how often each appears, the
/// requests by (transition, partition) count, and the timeline as (user, op, entry).
#[derive(Default, Debug)]
struct Written {
    request_ids: BTreeMap<String, usize>,
    per_deal_partition: BTreeMap<(String, u32), usize>,
    timeline_ids: BTreeMap<String, usize>,
    timeline: BTreeSet<(String, &'static str, String)>,
}

async fn written(client: &Client) -> Written {
    let mut w = Written::default();
    for (p, r) in support::read_committed(client, PARTITIONS, topics::NOTIFICATION_REQUESTS).await {
        let e = ce::decode::<NotificationRequest>(&r.headers, r.key.as_ref(), r.value.as_ref())
            .unwrap_or_else(|e| panic!("notification-requests/{p}@{}: {e}", r.offset));
        *w.request_ids.entry(e.data.id).or_default() += 1;
        let deal = e.data.deal.expect("a deal alert").transition;
        *w.per_deal_partition.entry((deal, p)).or_default() += 1;
    }
    for (p, r) in support::read_committed(client, PARTITIONS, topics::TIMELINE).await {
        let e = ce::decode::<TimelineEvent>(&r.headers, r.key.as_ref(), r.value.as_ref())
            .unwrap_or_else(|e| panic!("timeline/{p}@{}: {e}", r.offset));
        *w.timeline_ids.entry(e.id).or_default() += 1;
        let op = if e.data.op == TimelineOp::Add {
            "add"
        } else {
            "remove"
        };
        w.timeline.insert((e.data.user, op, e.data.entry));
    }
    w
}

/// The model's outputs for `transitions` (in order), added to `want`.
fn model(
    matcher: &mut Matcher<MemStore>,
    transitions: &[DealTransition],
    want: &mut (BTreeSet<String>, BTreeSet<(String, &'static str, String)>),
) {
    for t in transitions {
        for o in matcher.on_transition(t).unwrap() {
            match o {
                Output::Notify(n) => {
                    want.0.insert(n.id);
                }
                Output::Timeline(e) => {
                    let op = if e.op == TimelineOp::Add {
                        "add"
                    } else {
                        "remove"
                    };
                    want.1.insert((e.user, op, e.entry));
                }
            }
        }
    }
}

/// Asserts every event id was written once and the sets equal the model's.
fn check(
    what: &str,
    w: &Written,
    want: &(BTreeSet<String>, BTreeSet<(String, &'static str, String)>),
) {
    let dups: Vec<_> = w
        .request_ids
        .iter()
        .chain(&w.timeline_ids)
        .filter(|(_, n)| **n > 1)
        .take(5)
        .collect();
    assert!(dups.is_empty(), "{what}: events written twice: {dups:?}");
    let got: BTreeSet<String> = w.request_ids.keys().cloned().collect();
    support::assert_same_set(&format!("{what}: requests"), &got, &want.0);
    support::assert_same_set(&format!("{what}: timeline"), &w.timeline, &want.1);
    assert_eq!(
        w.timeline_ids.len(),
        w.timeline.len(),
        "{what}: one event id per timeline change"
    );
}

/// Waits until what matching wrote equals the model (then checks once more, 300 ms later:
/// nothing written twice after the sets matched).
async fn settle(
    client: &Client,
    what: &str,
    want: &(BTreeSet<String>, BTreeSet<(String, &'static str, String)>),
    timeout: Duration,
) -> Written {
    let deadline = Instant::now() + timeout;
    loop {
        let w = written(client).await;
        let got: BTreeSet<String> = w.request_ids.keys().cloned().collect();
        if got == want.0 && w.timeline == want.1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let w = written(client).await;
            check(what, &w, want);
            return w;
        }
        if Instant::now() > deadline {
            check(&format!("{what} (timed out)"), &w, want);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `matching` has input on `deal-broadcast` it has not committed yet.
async fn matching_behind(client: &Client) -> bool {
    let tps: Vec<TopicPartition> = (0..PARTITIONS)
        .map(|p| TopicPartition::new(topics::DEAL_BROADCAST, p))
        .collect();
    let q: Vec<_> = tps
        .iter()
        .map(|t| (t.clone(), OffsetSpec::Latest))
        .collect();
    let (Ok(ends), Ok(committed)) = (
        client.list_offsets(&q).await,
        client.fetch_offsets("matching", &tps).await,
    ) else {
        return false;
    };
    ends.into_iter()
        .zip(committed)
        .any(|(e, c)| e.is_ok_and(|e| c.offset.unwrap_or(0) < e.offset))
}

/// splitmix64: the kill moments, reproducible.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_fan_out_is_exactly_once_across_calls_and_kills() {
    let started = Instant::now();
    let (_broker, client, addr) = support::broker_with_topics(PARTITIONS).await;
    let dir = Scratch::new("fan_out");
    let mut matching = Processor::new(
        env!("CARGO_BIN_EXE_spool-matching"),
        dir.path(),
        "matching",
        &addr,
        &format!(
            "inputs = [\"deal-broadcast\", \"user-settings\", \"address-status\"]\noutputs = [\"notification-requests\", \"timeline\"]\ntables = [\"user-settings\", \"address-status\"]\n[group]\nsession_timeout_ms = 1000\ntransaction_timeout_ms = 10000\n[app]\nfan_out_chunk = {CHUNK}\n"
        ),
    );
    matching.start();
    assert!(
        matching.wait_ready(Duration::from_secs(30)),
        "matching ready:\n{}",
        matching.log_since_start()
    );

    // Users and flags, in the model and on the broker (flags in every partition, as
    // `spool-bounces` writes them).
    let users: Vec<AlertSettings> = (0..USERS).map(user).collect();
    let flags: Vec<AddressStatus> = [2, 13, 31].into_iter().map(flag).collect();
    let mut matcher = Matcher::new(MemStore::default());
    for u in &users {
        matcher.on_settings(&u.user, Some(u.clone())).unwrap();
    }
    for f in &flags {
        matcher.on_address_status(f).unwrap();
    }
    let producer = publish::producer(&client);
    publish::publish_users(&producer, &users).await.unwrap();
    for f in &flags {
        let r = envelope("bounces", format!("{}@flag", f.address), f, f.at_ms)
            .to_record()
            .unwrap();
        for p in 0..PARTITIONS {
            let _ack = producer
                .send_to(topics::ADDRESS_STATUS, p, r.clone())
                .await
                .unwrap();
        }
    }
    producer.flush().await;

    // 1. Quiet: 10 deals enter, then 5 of them leave.
    let mut phase1: Vec<DealTransition> = (0..10)
        .map(|k| transition(k, TransitionKind::Entered))
        .collect();
    phase1.extend((0..5).map(|k| transition(k, TransitionKind::Left)));
    let mut want = Default::default();
    model(&mut matcher, &phase1, &mut want);
    for t in &phase1 {
        broadcast(&producer, t).await;
    }
    producer.flush().await;
    let w = settle(&client, "quiet run", &want, Duration::from_secs(60)).await;
    // Every deal, in every partition, had more requests than one call can emit (7 users of
    // at most 3 channels each), so its fan-out took several calls.
    for k in 0..10 {
        for p in 0..PARTITIONS {
            let n = w
                .per_deal_partition
                .get(&(format!("b{k:04}:1"), p))
                .copied()
                .unwrap_or(0);
            assert!(
                n > 3 * CHUNK,
                "deal b{k:04} in partition {p}: {n} requests, not enough to need call_again"
            );
        }
    }

    // 2. A burst while matching is killed 3 times: 240 deals enter (in 3 waves), 120 leave.
    let mut rng = Rng(0xfa17);
    let mut kills_behind = 0;
    let mut next = 10;
    for wave in 0..3 {
        let mut ts: Vec<DealTransition> = (next..next + 80)
            .map(|k| transition(k, TransitionKind::Entered))
            .collect();
        ts.extend((next..next + 40).map(|k| transition(k, TransitionKind::Left)));
        next += 80;
        model(&mut matcher, &ts, &mut want);
        for t in &ts {
            broadcast(&producer, t).await;
        }
        producer.flush().await;
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        let behind = matching_behind(&client).await;
        assert!(matching.kill(), "matching was running at kill {wave}");
        kills_behind += usize::from(behind);
        matching.start();
        assert!(
            matching.wait_ready(Duration::from_secs(30)),
            "matching ready after kill {wave}:\n{}",
            matching.log_since_start()
        );
    }
    let w = settle(&client, "after 3 kills", &want, Duration::from_secs(90)).await;
    eprintln!(
        "fan_out: {} requests, {} timeline events, {} of 3 kills with deal-broadcast not yet committed, {:.1} s",
        w.request_ids.len(),
        w.timeline.len(),
        kills_behind,
        started.elapsed().as_secs_f64()
    );
    assert!(
        kills_behind >= 1,
        "no kill landed while matching had uncommitted input: the kill part tested nothing"
    );
    assert!(matching.running(), "matching still running at the end");
}
