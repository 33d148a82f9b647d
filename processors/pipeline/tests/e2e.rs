//! End to end on real processes: `spoold`, the four processor binaries (`spool-deals`,
//! `spool-matching`, `spool-notifications`, `spool-bounces`), a real Postfix and real HTTP
//! receivers. A seeded feed of 1,000 products and 200 users (some undeliverable) goes in; the
//! mailboxes, the webhook and push calls, the timeline and the flagged addresses must match the
//! independent oracle, and after phase 1's bounces are flagged, phase 2 mails no flagged
//! address.
//!
//! Within a phase a bounce can be flagged before a later deal of the same phase is matched
//! (that is the feature), so for addresses that bounce the check in phase 1 is "at least the
//! first mail, at most the oracle's"; everything else is exact.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_client::{Client, ConsumerConfig, StartAt};
use spool_pipeline::events::{AddressStatus, MailState, MailStatus, TimelineEvent, TimelineOp};
use spool_pipeline::feed::{AddressKind, Endpoints, Feed, FeedConfig, address_kind};
use spool_pipeline::postfix::instance::{Instance, free_port, mbox_message_ids};
use spool_pipeline::{publish, topics};
use spool_processor::envelope;
use support::receiver::Receiver;
use support::{Scratch, oracle};

const DOMAIN: &str = "deals.e2e";
const PARTITIONS: u32 = 2;
const BROKEN_HOOK_USER: &str = "u000003";

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str, dir: &Path, name: &str, broker: &str, toml: &str) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!("name = \"{name}\"\nbroker = \"{broker}\"\n{toml}"),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.join(format!("{name}-state")))
        .arg("--metrics-listen")
        .arg("off")
        .arg("--instance-id")
        .arg("e2e")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{bin}: {e}"));
    Proc(child)
}

/// Waits until `deals` committed every price update written so far.
async fn deals_caught_up(client: &Client) {
    use spool_client::{OffsetSpec, TopicPartition};
    let tps: Vec<TopicPartition> = (0..PARTITIONS)
        .map(|p| TopicPartition::new(topics::PRICES, p))
        .collect();
    let q: Vec<_> = tps
        .iter()
        .map(|tp| (tp.clone(), OffsetSpec::Latest))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ends = client.list_offsets(&q).await.unwrap();
        let committed = client.fetch_offsets("deals", &tps).await.unwrap();
        if ends
            .iter()
            .zip(&committed)
            .all(|(e, c)| c.offset == Some(e.as_ref().unwrap().offset))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "deals did not catch up: {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Each processor's inputs: per partition the group's committed offset against the high
/// watermark and the last stable offset; and the transactions open on the broker. What a
/// stuck or slow run prints, to tell a stall (a partition that does not move) from slowness.
async fn lag_report(client: &Client) -> String {
    use spool_client::{Isolation, OffsetSpec};
    let mut out = String::new();
    for (group, inputs) in support::PROCESSOR_INPUTS {
        let tps = support::input_partitions(inputs, PARTITIONS);
        let q: Vec<_> = tps
            .iter()
            .map(|tp| (tp.clone(), OffsetSpec::Latest))
            .collect();
        let (Ok(committed), Ok(hw), Ok(lso)) = (
            client.fetch_offsets(group, &tps).await,
            client.list_offsets(&q).await,
            client.list_offsets_with(&q, Isolation::ReadCommitted).await,
        ) else {
            out.push_str(&format!("\n  {group}: offsets unavailable"));
            continue;
        };
        out.push_str(&format!("\n  {group}:"));
        for (((tp, c), h), l) in tps.iter().zip(committed).zip(hw).zip(lso) {
            let c = c.offset.map_or("-".to_owned(), |o| o.to_string());
            let h = h.map_or("?".to_owned(), |o| o.offset.to_string());
            let l = l.map_or("?".to_owned(), |o| o.offset.to_string());
            out.push_str(&format!(" {}/{}={c}/{h}(lso {l})", tp.topic, tp.partition));
        }
    }
    if let Ok(txns) = client.list_transactions().await {
        for t in txns.iter().filter(|t| t.started_ms > 0) {
            out.push_str(&format!(
                "\n  open transaction {} (epoch {}, {} partitions, started {} ms)",
                t.transactional_id,
                t.producer_epoch,
                t.partitions.len(),
                t.started_ms
            ));
        }
    }
    out
}

#[derive(Default)]
struct Seen {
    final_status: BTreeMap<String, (MailState, String)>, // mail id -> (state, to)
    queued: BTreeMap<String, String>,                    // mail id -> to
    timeline: BTreeSet<(String, &'static str, String)>,
    duplicate_timeline: usize,
    flagged: BTreeSet<String>,
}

async fn collect(client: Client, seen: Arc<Mutex<Seen>>) {
    let mut c = client.consumer(ConsumerConfig::default());
    for t in [
        topics::MAIL_STATUS,
        topics::TIMELINE,
        topics::ADDRESS_STATUS,
    ] {
        c.subscribe_topic(t, StartAt::Earliest).await.unwrap();
    }
    while let Some(r) = c.next().await {
        let r = r.unwrap();
        let mut s = seen.lock().unwrap();
        match &*r.topic {
            topics::MAIL_STATUS => {
                let e =
                    envelope::decode::<MailStatus>(&r.headers, r.key.as_ref(), r.value.as_ref())
                        .unwrap()
                        .data;
                match e.status {
                    MailState::Queued => {
                        s.queued.insert(e.mail_id, e.to);
                    }
                    MailState::Sent | MailState::Bounced | MailState::Failed => {
                        s.final_status.insert(e.mail_id, (e.status, e.to));
                    }
                    MailState::Deferred => {}
                }
            }
            topics::TIMELINE => {
                let e =
                    envelope::decode::<TimelineEvent>(&r.headers, r.key.as_ref(), r.value.as_ref())
                        .unwrap()
                        .data;
                let op = if e.op == TimelineOp::Add {
                    "add"
                } else {
                    "remove"
                };
                if !s.timeline.insert((e.user, op, e.entry)) {
                    s.duplicate_timeline += 1;
                }
            }
            _ => {
                let e =
                    envelope::decode::<AddressStatus>(&r.headers, r.key.as_ref(), r.value.as_ref())
                        .unwrap()
                        .data;
                if e.unreachable {
                    s.flagged.insert(e.address);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_on_a_broker_with_real_postfix_and_http_equal_the_oracle() {
    let started = Instant::now();
    let (_broker, client, addr) = support::broker_with_topics(PARTITIONS).await;
    let dir = Scratch::new("e2e");
    let pf = Instance::start(&dir.path().join("pf"), free_port().unwrap(), "pfe2e")
        .expect("postfix (run .ci/install-test-tools)");
    let hooks = Receiver::start(|path, _, _| {
        if path.ends_with(BROKEN_HOOK_USER) {
            410
        } else {
            200
        }
    })
    .await;
    // The push gateway fails the first attempt of 1 key in 16 with 503: retried, delivered once.
    let push = Receiver::start(|_, key, attempt| {
        if attempt == 1 && key.starts_with('0') {
            503
        } else {
            200
        }
    })
    .await;

    let cfg = FeedConfig {
        seed: 23,
        products: 1_000,
        users: 200,
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
    let phases = [4, 4];
    let expected = oracle::expect(&cfg, &users, &phases);

    let d = dir.path();
    let retry = "[retry]\ninitial_backoff_ms = 20\nmax_backoff_ms = 200\nmax_attempts = 4\n";
    let mut procs = vec![
        spawn(
            env!("CARGO_BIN_EXE_spool-deals"),
            d,
            "deals",
            &addr,
            &format!(
                "inputs = [\"prices\"]\noutputs = [\"deal-transitions\", \"deal-broadcast\"]\n{retry}[app]\nbroadcast_partitions = {PARTITIONS}\n"
            ),
        ),
        spawn(
            env!("CARGO_BIN_EXE_spool-notifications"),
            d,
            "notifications",
            &addr,
            &format!(
                "inputs = [\"notification-requests\", \"outgoing-mail\"]\noutputs = [\"outgoing-mail\", \"mail-status\"]\n{retry}[app]\nsite = \"https://bp.example\"\n[app.smtp]\nport = {}\nfrom = \"deals@localhost\"\nmessage_id_domain = \"{DOMAIN}\"\n",
                pf.port()
            ),
        ),
        spawn(
            env!("CARGO_BIN_EXE_spool-bounces"),
            d,
            "bounces",
            &addr,
            &format!(
                "inputs = [\"postfix-log\"]\noutputs = [\"mail-status\", \"delivery-issues\", \"address-status\"]\n{retry}[app]\nlog_path = \"{}\"\nmessage_id_domain = \"{DOMAIN}\"\naddress_partitions = {PARTITIONS}\n",
                pf.log_path().display()
            ),
        ),
    ];
    let seen: Arc<Mutex<Seen>> = Arc::default();
    tokio::spawn(collect(client.clone(), seen.clone()));

    let producer = publish::producer(&client);
    publish::publish_users(&producer, &users).await.unwrap();
    let bouncing = |a: &str| {
        matches!(
            address_kind(a),
            AddressKind::HardBounce | AddressKind::UnknownUser
        )
    };
    for (phase, &rounds) in phases.iter().enumerate() {
        for _ in 0..rounds {
            publish::publish_round(&producer, &feed.next_round(), 0)
                .await
                .unwrap();
        }
        if phase == 0 {
            // Matching starts last, with every deal of phase 0 and every user's settings
            // waiting in its inputs: it must read the settings (its tables) before the deals
            // written after them, whatever order the broker delivers the topics in.
            deals_caught_up(&client).await;
            procs.push(
spawn(
            env!("CARGO_BIN_EXE_spool-matching"),
            d,
            "matching",
            &addr,
            &format!(
                "inputs = [\"deal-broadcast\", \"user-settings\", \"address-status\"]\noutputs = [\"notification-requests\", \"timeline\"]\ntables = [\"user-settings\", \"address-status\"]\n{retry}"
            ),
        ));
        }
        // Phase p is done when what the oracle expects by its end is there (timeline, HTTP
        // calls, the mails to addresses that do not bounce, every queued mail final, the
        // flags); then a quiet second more lets anything unexpected show up.
        let want = oracle::expect(&cfg, &users, &phases[..=phase]);
        let want_mails: BTreeSet<String> = want
            .emails
            .iter()
            .filter(|(a, _)| !bouncing(a))
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect();
        let want_http = want.webhooks.len() + want.pushes.len();
        let phase_started = Instant::now();
        let deadline = phase_started + Duration::from_secs(240);
        let mut last_report = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let http = hooks
                .calls()
                .iter()
                .chain(push.calls().iter())
                .filter(|c| c.status == 200 || c.path.ends_with(BROKEN_HOOK_USER))
                .map(|c| c.key.clone())
                .collect::<BTreeSet<_>>()
                .len();
            let lag = if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = Instant::now();
                Some(lag_report(&client).await)
            } else {
                None
            };
            let s = seen.lock().unwrap();
            let done = s.timeline.len() >= want.timeline.len()
                && http >= want_http
                && want_mails.iter().all(|m| s.queued.contains_key(m))
                && s.queued.keys().all(|m| s.final_status.contains_key(m))
                && want.flagged_after[phase]
                    .iter()
                    .all(|a| s.flagged.contains(a));
            if done {
                eprintln!(
                    "e2e: phase {phase} complete in {:.1} s",
                    phase_started.elapsed().as_secs_f64()
                );
                break;
            }
            let progress = format!(
                "timeline {}/{}, http {http}/{want_http}, mails {}/{} queued, {} final, flags {}/{}",
                s.timeline.len(),
                want.timeline.len(),
                want_mails
                    .iter()
                    .filter(|m| s.queued.contains_key(*m))
                    .count(),
                want_mails.len(),
                s.final_status.len(),
                s.flagged.len(),
                want.flagged_after[phase].len(),
            );
            if let Some(lag) = lag {
                eprintln!(
                    "e2e: phase {phase} at {:.0} s: {progress}",
                    phase_started.elapsed().as_secs_f64()
                );
                eprintln!("e2e: committed/high watermark per input:{lag}");
            }
            assert!(
                Instant::now() < deadline,
                "phase {phase} incomplete after 240 s: {progress}; logs in {}",
                d.display()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let s = std::mem::take(&mut *seen.lock().unwrap());
    // Mail: per address, the mails queued.
    let mut handed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, to) in &s.queued {
        handed.entry(to.clone()).or_default().insert(id.clone());
        let (state, _) = &s.final_status[id];
        let want = match address_kind(to) {
            AddressKind::Deliverable => MailState::Sent,
            AddressKind::UnknownUser | AddressKind::HardBounce => MailState::Bounced,
            AddressKind::Defer => MailState::Failed,
        };
        assert_eq!(*state, want, "{to}");
    }
    let bouncing = |a: &str| {
        matches!(
            address_kind(a),
            AddressKind::HardBounce | AddressKind::UnknownUser
        )
    };
    let exact = |m: &BTreeMap<String, BTreeSet<String>>| -> BTreeMap<String, BTreeSet<String>> {
        m.iter()
            .filter(|(a, _)| !bouncing(a))
            .map(|(a, v)| (a.clone(), v.clone()))
            .collect()
    };
    support::assert_same_set(
        "mails to addresses that do not bounce",
        &support::pairs(&exact(&handed)),
        &support::pairs(&exact(&expected.emails)),
    );
    for (a, want) in expected.emails.iter().filter(|(a, _)| bouncing(a)) {
        let got = handed.get(a).cloned().unwrap_or_default();
        assert!(
            !got.is_empty() && got.is_subset(want),
            "{a}: {} mails, oracle at most {}",
            got.len(),
            want.len()
        );
    }
    // Phase 2 mailed no address flagged after phase 1: all its mails to such addresses come from phase 1.
    let phase1 = oracle::expect(&cfg, &users, &phases[..1]);
    for a in &expected.flagged_after[0] {
        assert!(
            handed[a].is_subset(&phase1.emails[a]),
            "{a} got mail after being flagged"
        );
    }
    support::assert_same_set("flagged", &s.flagged, &expected.flagged);
    for (addr, name) in &boxes {
        let got: BTreeSet<String> = mbox_message_ids(&pf.mailbox(name))
            .unwrap()
            .into_iter()
            .map(|m| m.trim_end_matches(&format!("@{DOMAIN}")).to_owned())
            .collect();
        support::assert_same_set(
            &format!("mailbox of {addr}"),
            &got,
            &expected.emails.get(addr).cloned().unwrap_or_default(),
        );
    }
    // HTTP.
    let ok = |r: &Receiver| -> BTreeSet<(String, String)> {
        r.calls()
            .into_iter()
            .filter(|c| c.status == 200)
            .map(|c| (c.path, c.key))
            .collect()
    };
    let want_hooks: BTreeSet<_> = expected
        .webhooks
        .iter()
        .filter(|(p, _)| !p.ends_with(BROKEN_HOOK_USER))
        .cloned()
        .collect();
    support::assert_same_set("webhook calls", &ok(&hooks), &want_hooks);
    support::assert_same_set("push calls", &ok(&push), &expected.pushes);
    let push_200s = push.calls().iter().filter(|c| c.status == 200).count();
    assert_eq!(push_200s, expected.pushes.len(), "no push delivered twice");
    let flaky = expected
        .pushes
        .iter()
        .filter(|(_, k)| k.starts_with('0'))
        .count();
    assert_eq!(
        push.calls().len(),
        push_200s + flaky,
        "each flaky push retried once after its 503"
    );
    support::assert_same_set("timeline", &s.timeline, &expected.timeline);
    assert_eq!(s.duplicate_timeline, 0);
    // The broken webhook's notifications are dead letters (HTTP 410), nothing else is.
    let broken = expected
        .webhooks
        .iter()
        .filter(|(p, _)| p.ends_with(BROKEN_HOOK_USER))
        .count();
    let dlq = spool_processor::dlq_topic(topics::NOTIFICATION_REQUESTS, "notifications");
    let mut dead = 0;
    for p in 0..PARTITIONS {
        let f = client
            .fetch(&dlq, p, 0, &Default::default())
            .await
            .map(|f| f.records.len())
            .unwrap_or(0);
        dead += f;
    }
    assert_eq!(dead, broken, "dead letters of {BROKEN_HOOK_USER}'s webhook");
    eprintln!(
        "e2e: {} deals, {} mails queued ({} flagged), {} webhooks ({} dead-lettered), {} pushes, {} timeline events in {:.1} s",
        expected.entered,
        s.queued.len(),
        s.flagged.len(),
        want_hooks.len(),
        broken,
        expected.pushes.len(),
        s.timeline.len(),
        started.elapsed().as_secs_f64()
    );
}
