//! The pipeline through kill -9: `spoold`, the four processor binaries, a real Postfix and real
//! HTTP receivers, fed a seeded run of price updates while a seeded schedule SIGKILLs a
//! processor (`deals`, `matching`, `notifications`, `bounces`) or the broker at random moments
//! and starts it again. When everything is quiet, read committed:
//!
//! - **exactly once inside the log**: every event id appears once per topic (per partition for
//!   the broadcast topics `deal-broadcast` and `address-status`); the deal transitions equal the
//!   independent oracle's, the notification requests are the oracle's (deterministic ids), the
//!   timeline equals the oracle's and every removal follows its add; one rendered mail per
//!   e-mail request; one `queued` status per mail; one final status per copy Postfix queued
//!   (the bounces processor neither lost nor repeated a log line); the flagged addresses are
//!   exactly the hard-bouncing ones that were mailed;
//! - **at least once outside it**: every mail was accepted by Postfix and every webhook and push
//!   received at least once; repeats are counted, and each repeated mail must straddle a kill
//!   of `notifications` or of the broker (no repeat without a crash). The **repeat window** is
//!   measured: the test watches Postfix's log with its own clock (every 5 ms) and reports, per
//!   such kill, how many mails were repeated and how long before the kill their first copy
//!   was accepted, beside the closest mail accepted before a kill that was *not* repeated.
//!
//! E-mail to an address that bounces can stop mid-run (the flag is the feature), so for those
//! addresses the requests are "at least the first, at most the oracle's".
//!
//! `kill_9_ci` is bounded for CI (20-40 s on 2 loaded cores): 2 kills of each processor and 2
//! of the broker; `kill_9_long` (ignored; `cargo test -p spool-pipeline --test kill9 --
//! --ignored`) runs a longer feed with many more kills. A broker crash *at* a commit is not
//! left to chance here: `tests/commit_crash.rs` stops `spoold` at each step of ending a
//! transaction (its failpoints). If an event id is ever written twice to `mail-status`, the
//! failure first says whether Postfix's line was published twice (the tailer) or one
//! `postfix-log` record was handled twice (the runtime), with offsets and kill times.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use spool_client::{Client, FetchOptions};
use spool_pipeline::events::{
    AddressStatus, DealTransition, MailState, MailStatus, NotificationRequest, OutgoingMail,
    TimelineEvent, TimelineOp,
};
use spool_pipeline::feed::{AddressKind, Endpoints, Feed, FeedConfig, address_kind};
use spool_pipeline::ids::mail_id_from_message_id;
use spool_pipeline::postfix::instance::{Instance, free_port, mbox_message_ids};
use spool_pipeline::postfix::parse::{LogLine, parse};
use spool_pipeline::{publish, topics};
use spool_processor::envelope;
use spool_testkit::Broker;
use support::procs::Processor;
use support::receiver::Receiver;
use support::{Scratch, oracle};

const DOMAIN: &str = "deals.k9";
const PARTITIONS: u32 = 2;
const NAMES: [&str; 4] = ["deals", "matching", "notifications", "bounces"];
const NOTIFICATIONS: usize = 2;

/// A run: the feed, and how many kills of each processor and of the broker.
struct Plan {
    seed: u64,
    products: usize,
    users: usize,
    rounds: usize,
    kills_per_processor: usize,
    broker_kills: usize,
    /// How long the pipeline may take to settle after the last round.
    settle: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_ci() {
    run(&Plan {
        seed: 91,
        products: 1_000,
        // Mail is the slow stage (SMTP one message at a time, ~10-20 mails/s on a loaded
        // debug build): 60 users give ~500 mails.
        users: 60,
        rounds: 6,
        kills_per_processor: 2,
        broker_kills: 2,
        settle: Duration::from_secs(150),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long (2-5 minutes): the counts in docs/pipeline.md"]
async fn kill_9_long() {
    run(&Plan {
        seed: 1191,
        products: 1_000,
        users: 120,
        rounds: 20,
        kills_per_processor: 8,
        broker_kills: 5,
        settle: Duration::from_secs(600),
    })
    .await;
}

/// splitmix64: the kill schedule and moments, reproducible from the plan's seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn ms(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }
}

/// A kill: when, when the victim was started again, and who.
#[derive(Debug, Clone, Copy)]
struct Kill {
    at: Instant,
    back: Instant,
    victim: Victim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    Processor(usize),
    Broker,
}

impl Victim {
    fn name(self) -> &'static str {
        match self {
            Victim::Processor(i) => NAMES[i],
            Victim::Broker => "spoold",
        }
    }
    /// Whether killing it can repeat a mail (an SMTP send not yet committed).
    fn can_repeat_mail(self) -> bool {
        matches!(self, Victim::Processor(NOTIFICATIONS) | Victim::Broker)
    }
}

/// A copy of one of our mails that Postfix queued (its cleanup logged our Message-ID and its
/// queue manager took it in), with when the test saw the Message-ID line.
#[derive(Debug, Clone)]
struct Copy {
    mail: String,
    qid: String,
    seen: Instant,
}

/// Watches Postfix's log from the test's own clock (Postfix's timestamps are whole seconds).
struct MailLog {
    copies: Arc<Mutex<Vec<Copy>>>,
    stop: Arc<AtomicBool>,
}

impl MailLog {
    fn watch(path: PathBuf) -> MailLog {
        let copies: Arc<Mutex<Vec<Copy>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (copies.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut pos = 0u64;
            let mut partial: Vec<u8> = Vec::new();
            let mut ids: BTreeMap<String, (String, Instant)> = BTreeMap::new();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
                let Ok(mut f) = std::fs::File::open(&path) else {
                    continue;
                };
                let mut buf = Vec::new();
                if f.seek(SeekFrom::Start(pos)).is_err() || f.read_to_end(&mut buf).is_err() {
                    continue;
                }
                pos += buf.len() as u64;
                let now = Instant::now();
                partial.extend_from_slice(&buf);
                let Some(end) = partial.iter().rposition(|&b| b == b'\n') else {
                    continue;
                };
                let complete: Vec<u8> = partial.drain(..=end).collect();
                for line in String::from_utf8_lossy(&complete).lines() {
                    match parse(line) {
                        LogLine::MessageId { qid, message_id } => {
                            if let Some(m) = mail_id_from_message_id(&message_id, DOMAIN) {
                                ids.insert(qid, (m.to_owned(), now));
                            }
                        }
                        LogLine::QueueActive { qid, .. } => {
                            if let Some((mail, seen)) = ids.remove(&qid) {
                                c.lock().unwrap().push(Copy { mail, qid, seen });
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        MailLog { copies, stop }
    }

    fn copies(&self) -> Vec<Copy> {
        self.copies.lock().unwrap().clone()
    }
}

impl Drop for MailLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One event read back: where it is and its CloudEvent id.
struct Ev<T> {
    partition: u32,
    offset: u64,
    id: String,
    data: T,
}

/// Every event of `topic`, read committed from offset 0.
async fn read_events<T: DeserializeOwned>(client: &Client, topic: &str) -> Vec<Ev<T>> {
    support::read_committed(client, PARTITIONS, topic)
        .await
        .into_iter()
        .map(|(p, r)| {
            let e = envelope::decode::<T>(&r.headers, r.key.as_ref(), r.value.as_ref())
                .unwrap_or_else(|e| panic!("{topic}/{p}@{}: {e}", r.offset));
            Ev {
                partition: p,
                offset: r.offset,
                id: e.id,
                data: e.data,
            }
        })
        .collect()
}

/// The ids of `events` (per partition when `per_partition`), asserting none appears twice.
fn exactly_once<T>(what: &str, events: &[Ev<T>], per_partition: bool) -> BTreeSet<String> {
    let mut seen: BTreeMap<(u32, &str), usize> = BTreeMap::new();
    for e in events {
        let p = if per_partition { e.partition } else { 0 };
        *seen.entry((p, &e.id)).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "{what}: {} events written more than once, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(5)]
    );
    seen.keys().map(|(_, id)| (*id).to_owned()).collect()
}

/// Whether every processor's group has committed every committed record of its inputs (its
/// committed offset is the one after the last record it handled: a transactional input's
/// last commit marker stays behind it) and no transaction is open on them.
async fn caught_up(client: &Client) -> bool {
    for (group, inputs) in support::PROCESSOR_INPUTS {
        let tps = support::input_partitions(inputs, PARTITIONS);
        let Ok(committed) = client.fetch_offsets(group, &tps).await else {
            return false;
        };
        for (tp, c) in tps.iter().zip(committed) {
            let mut offset = c.offset.unwrap_or(0);
            loop {
                let Ok(f) = client
                    .fetch(&tp.topic, tp.partition, offset, &FetchOptions::default())
                    .await
                else {
                    return false;
                };
                if !f.records.is_empty() || f.last_stable_offset < f.high_watermark {
                    return false;
                }
                if f.next_offset == offset {
                    break;
                }
                offset = f.next_offset;
            }
        }
    }
    true
}

fn processors(d: &Path, broker: &str, pf: &Instance) -> Vec<Processor> {
    let group = "[group]\nsession_timeout_ms = 1000\ntransaction_timeout_ms = 10000\n";
    let retry = "[retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\nmax_attempts = 8\n";
    let tomls = [
        format!(
            "inputs = [\"prices\"]\noutputs = [\"deal-transitions\", \"deal-broadcast\"]\n{group}{retry}[app]\nbroadcast_partitions = {PARTITIONS}\n"
        ),
        format!(
            "inputs = [\"deal-broadcast\", \"user-settings\", \"address-status\"]\noutputs = [\"notification-requests\", \"timeline\"]\ntables = [\"user-settings\", \"address-status\"]\n{group}{retry}"
        ),
        format!(
            "inputs = [\"notification-requests\", \"outgoing-mail\"]\noutputs = [\"outgoing-mail\", \"mail-status\"]\n{group}{retry}[app]\nsite = \"https://bp.example\"\n[app.smtp]\nport = {}\nfrom = \"deals@localhost\"\nmessage_id_domain = \"{DOMAIN}\"\n",
            pf.port()
        ),
        format!(
            "inputs = [\"postfix-log\"]\noutputs = [\"mail-status\", \"delivery-issues\", \"address-status\"]\n{group}{retry}[app]\nlog_path = \"{}\"\nmessage_id_domain = \"{DOMAIN}\"\naddress_partitions = {PARTITIONS}\n",
            pf.log_path().display()
        ),
    ];
    let bins = [
        env!("CARGO_BIN_EXE_spool-deals"),
        env!("CARGO_BIN_EXE_spool-matching"),
        env!("CARGO_BIN_EXE_spool-notifications"),
        env!("CARGO_BIN_EXE_spool-bounces"),
    ];
    (0..4)
        .map(|i| Processor::new(bins[i], d, NAMES[i], broker, &tomls[i]))
        .collect()
}

/// The kills, shuffled, and after which round each happens.
fn schedule(plan: &Plan, rng: &mut Rng) -> Vec<(usize, Victim)> {
    let mut victims: Vec<Victim> = (0..4)
        .flat_map(|i| std::iter::repeat_n(Victim::Processor(i), plan.kills_per_processor))
        .chain(std::iter::repeat_n(Victim::Broker, plan.broker_kills))
        .collect();
    for i in (1..victims.len()).rev() {
        victims.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let n = victims.len();
    victims
        .into_iter()
        .enumerate()
        .map(|(k, v)| (k * plan.rounds / n, v))
        .collect()
}

/// No processor exits by itself: every one killed was started again by the schedule, and a
/// broker kill is survived inside the process (since 5954a65 a fenced producer, which a
/// restarted broker causes by aborting the open transaction with a bumped epoch, no longer
/// ends the processor). Any exit fails the test, with the error the process printed.
fn assert_running(procs: &mut [Processor], d: &Path) {
    for p in procs.iter_mut() {
        if p.running() {
            continue;
        }
        let log = p.log_since_start();
        let last = log.lines().rfind(|l| l.starts_with("Error:")).unwrap_or("");
        panic!(
            "{} exited by itself ({last:?}); logs in {}",
            p.name,
            d.display()
        );
    }
}

fn bouncing(a: &str) -> bool {
    matches!(
        address_kind(a),
        AddressKind::HardBounce | AddressKind::UnknownUser
    )
}

async fn run(plan: &Plan) {
    let started = Instant::now();
    let mut broker = Broker::start();
    let addr = broker.addr();
    let mut client = Client::connect(addr.as_str()).await.unwrap();
    publish::ensure_topics(&client, Some(PARTITIONS))
        .await
        .unwrap();
    let dir = Scratch::new("kill9");
    let d = dir.path();
    let pf = Instance::start(&d.join("pf"), free_port().unwrap(), "pfk9")
        .expect("postfix (run .ci/install-test-tools)");
    let hooks = Receiver::start(|_, _, _| 200).await;
    let push = Receiver::start(|_, _, _| 200).await;

    let cfg = FeedConfig {
        seed: plan.seed,
        products: plan.products,
        users: plan.users,
        ..FeedConfig::default()
    };
    let mut feed = Feed::new(cfg.clone());
    let users = feed.users(&Endpoints {
        webhook: hooks.base(),
        push: push.base(),
    });
    let boxes = spool_pipeline::feed::mailboxes(&users);
    pf.set_mailboxes(boxes.iter().map(|(a, n)| (a.as_str(), n.as_str())))
        .unwrap();
    let expected = oracle::expect(&cfg, &users, &[plan.rounds]);
    let maillog = MailLog::watch(pf.log_path());

    let mut procs = processors(d, &addr, &pf);
    for p in &mut procs {
        p.start();
    }
    for p in &mut procs {
        assert!(
            p.wait_ready(Duration::from_secs(60)),
            "{} never got ready",
            p.name
        );
    }
    publish::publish_users(&publish::producer(&client), &users)
        .await
        .unwrap();

    let mut rng = Rng(plan.seed);
    let plan_kills = schedule(plan, &mut rng);
    let mut kills: Vec<Kill> = Vec::new();
    let mut updates = 0;
    for round in 0..plan.rounds {
        let producer = publish::producer(&client);
        updates += publish::publish_round(&producer, &feed.next_round(), 0)
            .await
            .unwrap();
        producer.close().await;
        for &(_, victim) in plan_kills.iter().filter(|(r, _)| *r == round) {
            tokio::time::sleep(rng.ms(800)).await;
            match victim {
                Victim::Broker => {
                    tokio::task::block_in_place(|| broker.kill());
                    let at = Instant::now();
                    tokio::time::sleep(rng.ms(500)).await;
                    tokio::task::block_in_place(|| broker.restart());
                    kills.push(Kill {
                        at,
                        back: Instant::now(),
                        victim,
                    });
                    client = Client::connect(addr.as_str()).await.unwrap();
                }
                Victim::Processor(i) => {
                    assert_running(&mut procs, d);
                    procs[i].kill();
                    let at = Instant::now();
                    tokio::time::sleep(rng.ms(300)).await;
                    procs[i].start();
                    kills.push(Kill {
                        at,
                        back: Instant::now(),
                        victim,
                    });
                }
            }
        }
    }
    eprintln!(
        "kill9: {} rounds ({updates} price updates) and {} kills in {:.1} s",
        plan.rounds,
        kills.len(),
        started.elapsed().as_secs_f64()
    );

    // Settled: every group caught up, every queued copy has its final status, every HTTP
    // call made, and nothing moved for a second.
    let want_http = expected.webhooks.len() + expected.pushes.len();
    let deadline = Instant::now() + plan.settle;
    let mut last = (usize::MAX, usize::MAX);
    let mut last_report = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let copies = maillog.copies().len();
        let finals = read_events::<MailStatus>(&client, topics::MAIL_STATUS)
            .await
            .iter()
            .filter(|e| e.data.status != MailState::Queued && e.data.status != MailState::Deferred)
            .count();
        let http: BTreeSet<String> = hooks
            .calls()
            .iter()
            .chain(push.calls().iter())
            .map(|c| c.key.clone())
            .collect();
        assert_running(&mut procs, d);
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "kill9: at {:.0} s: {copies} copies queued by Postfix, {finals} final statuses, http {}/{want_http}, caught up: {}",
                started.elapsed().as_secs_f64(),
                http.len(),
                caught_up(&client).await
            );
        }
        let now = (copies, finals);
        if finals >= copies && http.len() >= want_http && now == last && caught_up(&client).await {
            break;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "not settled {:?} after the last round: {copies} copies queued by Postfix, {finals} final statuses, http {}/{want_http}; logs in {}",
            plan.settle,
            http.len(),
            d.display()
        );
    }
    let settled = started.elapsed();

    let counts = check(
        &client,
        &expected,
        &maillog.copies(),
        &kills,
        &pf,
        &boxes,
        &hooks,
        &push,
    )
    .await;
    eprintln!(
        "kill9: {} kills ({}), settled at {:.1} s\nkill9: {counts}",
        kills.len(),
        NAMES
            .iter()
            .map(|n| (n, kills.iter().filter(|k| k.victim.name() == *n).count()))
            .chain([(
                &"spoold",
                kills.iter().filter(|k| k.victim == Victim::Broker).count()
            )])
            .map(|(n, c)| format!("{n} ×{c}"))
            .collect::<Vec<_>>()
            .join(", "),
        settled.as_secs_f64()
    );
}

/// The assertions on the settled run; returns the counts as a report.
#[allow(clippy::too_many_arguments)]
async fn check(
    client: &Client,
    expected: &oracle::Expected,
    copies: &[Copy],
    kills: &[Kill],
    pf: &Instance,
    boxes: &[(String, String)],
    hooks: &Receiver,
    push: &Receiver,
) -> String {
    // Deals: each expected transition once, in deal-transitions and in every partition of
    // deal-broadcast.
    let transitions = read_events::<DealTransition>(client, topics::DEAL_TRANSITIONS).await;
    let ids = exactly_once("deal-transitions", &transitions, false);
    support::assert_same_set("deal transitions", &ids, &expected.transitions);
    let broadcast = read_events::<DealTransition>(client, topics::DEAL_BROADCAST).await;
    exactly_once("deal-broadcast", &broadcast, true);
    for p in 0..PARTITIONS {
        let ids: BTreeSet<String> = broadcast
            .iter()
            .filter(|e| e.partition == p)
            .map(|e| e.id.clone())
            .collect();
        support::assert_same_set(&format!("deal-broadcast/{p}"), &ids, &expected.transitions);
    }

    // Matching: notification requests (deterministic ids) and the timeline.
    let requests = read_events::<NotificationRequest>(client, topics::NOTIFICATION_REQUESTS).await;
    let got = exactly_once("notification-requests", &requests, false);
    let mut exact: BTreeSet<String> = expected
        .webhooks
        .iter()
        .chain(&expected.pushes)
        .map(|(_, id)| id.clone())
        .collect();
    let mut may: BTreeSet<String> = BTreeSet::new();
    for (a, ids) in &expected.emails {
        if bouncing(a) {
            assert!(
                ids.iter().any(|i| got.contains(i)),
                "{a}: not even its first mail was requested"
            );
            may.extend(ids.iter().cloned());
        } else {
            exact.extend(ids.iter().cloned());
        }
    }
    let got_exact: BTreeSet<String> = got.difference(&may).cloned().collect();
    support::assert_same_set("notification requests", &got_exact, &exact);
    let timeline = read_events::<TimelineEvent>(client, topics::TIMELINE).await;
    exactly_once("timeline", &timeline, false);
    let entries: BTreeSet<(String, &'static str, String)> = timeline
        .iter()
        .map(|e| {
            let op = if e.data.op == TimelineOp::Add {
                "add"
            } else {
                "remove"
            };
            (e.data.user.clone(), op, e.data.entry.clone())
        })
        .collect();
    support::assert_same_set("timeline", &entries, &expected.timeline);
    let adds: BTreeMap<(&str, &str), (u32, u64)> = timeline
        .iter()
        .filter(|e| e.data.op == TimelineOp::Add)
        .map(|e| ((&*e.data.user, &*e.data.entry), (e.partition, e.offset)))
        .collect();
    for e in timeline.iter().filter(|e| e.data.op == TimelineOp::Remove) {
        let add = adds.get(&(&*e.data.user, &*e.data.entry));
        assert!(
            add.is_some_and(|&(p, o)| p == e.partition && o < e.offset),
            "timeline: {} removed {} without an earlier add",
            e.data.user,
            e.data.entry
        );
    }

    // Notifications: one rendered mail per e-mail request, one `queued` per mail.
    let outgoing = read_events::<OutgoingMail>(client, topics::OUTGOING_MAIL).await;
    let mails = exactly_once("outgoing-mail", &outgoing, false);
    let email_requests: BTreeSet<String> = requests
        .iter()
        .filter(|r| r.data.channel == spool_pipeline::events::Channel::Email)
        .map(|r| r.id.clone())
        .collect();
    support::assert_same_set("outgoing mail", &mails, &email_requests);
    let status = read_events::<MailStatus>(client, topics::MAIL_STATUS).await;
    explain_repeats(client, &status, kills).await;
    exactly_once("mail-status", &status, false);
    let queued: BTreeMap<&str, &str> = status
        .iter()
        .filter(|e| e.data.status == MailState::Queued)
        .map(|e| (&*e.data.mail_id, e.data.queue_id.as_deref().unwrap_or("")))
        .collect();
    support::assert_same_set(
        "mails with a queued status",
        &queued.keys().map(|m| (*m).to_owned()).collect(),
        &mails,
    );

    // Postfix: every mail accepted at least once; each copy has one final status (bounces).
    let mut by_mail: BTreeMap<&str, Vec<&Copy>> = BTreeMap::new();
    for c in copies {
        by_mail.entry(&c.mail).or_default().push(c);
    }
    support::assert_same_set(
        "mails accepted by Postfix",
        &by_mail.keys().map(|m| (*m).to_owned()).collect(),
        &mails,
    );
    for (m, q) in &queued {
        assert!(
            by_mail[m].iter().any(|c| c.qid == *q),
            "{m}: queued as {q}, which Postfix did not log"
        );
    }
    let finals: BTreeSet<(String, String)> = status
        .iter()
        .filter(|e| !matches!(e.data.status, MailState::Queued | MailState::Deferred))
        .map(|e| {
            (
                e.data.mail_id.clone(),
                e.data.queue_id.clone().unwrap_or_default(),
            )
        })
        .collect();
    let final_count = status
        .iter()
        .filter(|e| !matches!(e.data.status, MailState::Queued | MailState::Deferred))
        .count();
    assert_eq!(final_count, finals.len(), "one final status per copy");
    let want_finals: BTreeSet<(String, String)> = copies
        .iter()
        .map(|c| (c.mail.clone(), c.qid.clone()))
        .collect();
    support::assert_same_set("final mail statuses", &finals, &want_finals);

    // Bounces: the flags are the hard-bouncing addresses mailed, in every partition, each
    // bounce line flagged once.
    let flags = read_events::<AddressStatus>(client, topics::ADDRESS_STATUS).await;
    exactly_once("address-status", &flags, true);
    let to: BTreeMap<&str, &str> = outgoing
        .iter()
        .map(|e| (&*e.data.mail_id, &*e.data.to))
        .collect();
    let want_flags: BTreeSet<String> = mails
        .iter()
        .map(|m| to[m.as_str()].to_owned())
        .filter(|a| bouncing(a))
        .collect();
    for p in 0..PARTITIONS {
        let got: BTreeSet<String> = flags
            .iter()
            .filter(|e| e.partition == p && e.data.unreachable)
            .map(|e| e.data.address.clone())
            .collect();
        support::assert_same_set(&format!("flagged in address-status/{p}"), &got, &want_flags);
    }

    // Mailboxes hold each accepted copy of their mails.
    for (address, name) in boxes
        .iter()
        .filter(|(a, _)| address_kind(a) == AddressKind::Deliverable)
    {
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        for id in mbox_message_ids(&pf.mailbox(name)).unwrap() {
            *got.entry(id.trim_end_matches(&format!("@{DOMAIN}")).to_owned())
                .or_default() += 1;
        }
        let want: BTreeMap<String, usize> = by_mail
            .iter()
            .filter(|(m, _)| to[**m] == address)
            .map(|(m, c)| ((*m).to_owned(), c.len()))
            .collect();
        assert_eq!(got, want, "mailbox of {address}: each copy Postfix queued");
    }

    // Repeats: each straddles a kill that can repeat an effect; the window per kill.
    let mails_at: BTreeMap<String, Vec<Instant>> = by_mail
        .iter()
        .map(|(m, cs)| ((*m).to_owned(), cs.iter().map(|c| c.seen).collect()))
        .collect();
    let mail_repeats = repeats("mail", &mails_at, kills);
    // HTTP: each call made (200) at least once, repeats counted the same way.
    let http = |r: &Receiver, want: &BTreeSet<(String, String)>, what: &str| -> Repeats {
        let mut at: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
        let mut set: BTreeSet<(String, String)> = BTreeSet::new();
        for c in r.calls().into_iter().filter(|c| c.status == 200) {
            at.entry(c.key.clone()).or_default().push(c.at);
            set.insert((c.path, c.key));
        }
        support::assert_same_set(what, &set, want);
        repeats(what, &at, kills)
    };
    let hook_repeats = http(hooks, &expected.webhooks, "webhook calls");
    let push_repeats = http(push, &expected.pushes, "push calls");

    format!(
        "{} transitions, {} notification requests, {} timeline events, {} mails, {} addresses \
         flagged, {} webhooks, {} pushes, all exactly once in the log;\n  mails: {} copies \
         accepted by Postfix, {mail_repeats};\n  webhooks: {hook_repeats};\n  pushes: {push_repeats}",
        ids.len(),
        got.len(),
        timeline.len(),
        mails.len(),
        want_flags.len(),
        expected.webhooks.len(),
        expected.pushes.len(),
        copies.len(),
    )
}

/// When a `mail-status` event id appears twice, says where the second copy came from before
/// the assertion fails: the same Postfix log line published twice on `postfix-log` (the
/// tailer), or one `postfix-log` record handled twice (the runtime), with the offsets and the
/// kills around them.
async fn explain_repeats(client: &Client, status: &[Ev<MailStatus>], kills: &[Kill]) {
    let mut by_id: BTreeMap<&str, Vec<&Ev<MailStatus>>> = BTreeMap::new();
    for e in status {
        by_id.entry(&e.id).or_default().push(e);
    }
    by_id.retain(|_, v| v.len() > 1);
    if by_id.is_empty() {
        return;
    }
    // Every postfix-log record, read committed, by the line's position in the file.
    let mut lines: BTreeMap<String, Vec<(u32, u64, i64)>> = BTreeMap::new();
    for (p, r) in support::read_committed(client, PARTITIONS, topics::POSTFIX_LOG).await {
        let v: serde_json::Value = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let at = format!("{}.{}", v["at"]["inode"], v["at"]["offset"]);
        lines
            .entry(at)
            .or_default()
            .push((p, r.offset, r.timestamp_ms));
    }
    let now = (std::time::SystemTime::now(), Instant::now());
    let wall = |i: Instant| {
        now.0
            .checked_sub(now.1.duration_since(i))
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64)
    };
    for (id, evs) in by_id.iter().take(8) {
        let line = id.rsplit_once('.').map_or(*id, |(l, _)| l);
        eprintln!(
            "kill9: mail-status {id} x{}: at offsets {:?}; its line on postfix-log (partition, offset, ts): {:?}",
            evs.len(),
            evs.iter().map(|e| e.offset).collect::<Vec<_>>(),
            lines.get(line)
        );
    }
    let twice = lines.values().filter(|v| v.len() > 1).count();
    eprintln!(
        "kill9: {} mail-status ids repeated; {twice} Postfix log lines published more than once on postfix-log; kills (victim, wall ms): {:?}",
        by_id.len(),
        kills
            .iter()
            .map(|k| (k.victim.name(), wall(k.at)))
            .collect::<Vec<_>>()
    );
}

/// Repeated external effects and the window in which a kill repeated them.
struct Repeats(String);
impl std::fmt::Display for Repeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `done[id]` = when each copy of effect `id` happened. Asserts that each repeated effect
/// overlaps a kill of `notifications` or the broker (its first copy before the victim was
/// back, its last after the kill: with the broker down, `notifications` goes on delivering
/// what it had fetched until its commit fails, and all of that is repeated). Reports how many
/// were repeated, per such kill when their first copies happened relative to the kill (the
/// repeat window; negative = after it, during the outage), and the closest effect before a
/// kill that was not repeated.
fn repeats(what: &str, done: &BTreeMap<String, Vec<Instant>>, kills: &[Kill]) -> Repeats {
    let rk: Vec<Kill> = kills
        .iter()
        .filter(|k| k.victim.can_repeat_mail())
        .copied()
        .collect();
    // ms from `t` to the kill (positive: `t` was before it).
    let before = |k: &Kill, t: Instant| -> i64 {
        if t <= k.at {
            (k.at - t).as_millis() as i64
        } else {
            -((t - k.at).as_millis() as i64)
        }
    };
    let mut per_kill: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    let (mut repeated, mut extra) = (0, 0);
    let mut closest_single: Option<i64> = None;
    for (id, at) in done {
        let first = *at.iter().min().expect("at least one");
        if at.len() == 1 {
            for k in rk.iter().filter(|k| first <= k.at) {
                let d = before(k, first);
                closest_single = Some(closest_single.map_or(d, |c| c.min(d)));
            }
            continue;
        }
        repeated += 1;
        extra += at.len() - 1;
        let last = *at.iter().max().expect("at least one");
        let k = rk
            .iter()
            .position(|k| first <= k.back && k.at <= last)
            .unwrap_or_else(|| {
                // Copies and kills in ms relative to the first copy, to tell a late log line
                // from a repeat nothing explains.
                let rel = |t: Instant| {
                    if t >= first {
                        (t - first).as_millis() as i64
                    } else {
                        -((first - t).as_millis() as i64)
                    }
                };
                let copies: Vec<i64> = at.iter().map(|t| rel(*t)).collect();
                let near: Vec<(&str, i64, i64)> = kills
                    .iter()
                    .filter(|k| rel(k.at).abs() < 3_000)
                    .map(|k| (k.victim.name(), rel(k.at), rel(k.back)))
                    .collect();
                panic!("{what} {id} happened {} times without a kill of notifications or spoold in between: copies at {copies:?} ms, kills nearby (victim, killed, back) {near:?}", at.len())
            });
        per_kill.entry(k).or_default().push(before(&rk[k], first));
    }
    let windows: Vec<String> = per_kill
        .iter()
        .map(|(k, ds)| {
            format!(
                "{} kill #{k}: {} (first copies {}..{} ms before it)",
                rk[*k].victim.name(),
                ds.len(),
                ds.iter().min().expect("one"),
                ds.iter().max().expect("one")
            )
        })
        .collect();
    Repeats(format!(
        "{repeated} repeated ({extra} extra copies) over {} kills of notifications or spoold [{}]; largest window {} ms before a kill; closest not repeated {} ms before a kill",
        rk.len(),
        windows.join("; "),
        per_kill
            .values()
            .flatten()
            .max()
            .map_or("-".into(), |d| d.to_string()),
        closest_single.map_or("-".into(), |d| d.to_string()),
    ))
}
