//! The pipeline's logic chained in one process, with the real outside world: a seeded feed of
//! 1,000 products and 200 users goes through the deal heuristic and matching, notifications
//! are rendered and delivered to a **real Postfix** (SMTP) and **real HTTP receivers**, and the
//! bounces come back by tailing Postfix's log file and are flagged for matching. The mailboxes,
//! the webhook and push calls, the timeline and the flagged addresses must equal what the
//! independent oracle computed from the same seed; after phase 1's bounces are flagged, phase
//! 2 mails no flagged address.
//!
//! (The same flow through the processors on a broker is the end-to-end test of the processor
//! binaries; this one pins down the logic and the external integrations on their own.)

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use spool_pipeline::deals::{DealParams, ProductState};
use spool_pipeline::deliver::Outcome;
use spool_pipeline::deliver::http::{HttpConfig, HttpSender};
use spool_pipeline::deliver::smtp::{SmtpConfig, SmtpSender};
use spool_pipeline::events::{Channel, MailState, NotificationRequest, TimelineOp};
use spool_pipeline::feed::{AddressKind, Endpoints, Feed, FeedConfig, address_kind};
use spool_pipeline::matching::{Matcher, MemStore, Output};
use spool_pipeline::postfix::instance::{Instance, free_port, mbox_message_ids};
use spool_pipeline::postfix::parse::parse;
use spool_pipeline::postfix::tail::Tailer;
use spool_pipeline::postfix::tracker::{self, Message, Tracker};
use spool_pipeline::render::Renderer;
use support::oracle;
use support::receiver::Receiver;

const DOMAIN: &str = "deals.test";

#[derive(Default)]
struct Seen {
    queued: BTreeMap<String, (String, Option<String>)>, // mail id -> (address, queue id from 250)
    final_status: BTreeMap<String, (MailState, Option<String>)>,
    flagged: BTreeSet<String>,
    timeline: BTreeSet<(String, &'static str, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_feed_through_real_postfix_and_http_equals_the_oracle() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut pf = Instance::start(&dir.path().join("pf"), free_port().unwrap(), "pfchain")
        .expect("postfix (run .ci/install-test-tools)");
    let hooks = Receiver::start(|_, _, _| 200).await;
    // The push gateway fails each key's first attempt with 503: retried, delivered once.
    let push = Receiver::start(|_, _, attempt| if attempt == 1 { 503 } else { 200 }).await;

    let cfg = FeedConfig {
        seed: 11,
        products: 1_000,
        users: 200,
        ..FeedConfig::default()
    };
    let endpoints = Endpoints {
        webhook: hooks.base(),
        push: push.base(),
    };
    let mut feed = Feed::new(cfg.clone());
    let users = feed.users(&endpoints);
    let boxes = spool_pipeline::feed::mailboxes(&users);
    pf.set_mailboxes(boxes.iter().map(|(a, n)| (a.as_str(), n.as_str())))
        .unwrap();
    let phases = [5, 5];
    let expected = oracle::expect(&cfg, &users, &phases);
    assert!(
        expected.entered >= 30,
        "the seed gives a real workload: {} deals",
        expected.entered
    );

    let params = DealParams::default();
    let mut products: BTreeMap<String, ProductState> = BTreeMap::new();
    let mut matcher = Matcher::new(MemStore::default());
    for u in &users {
        matcher.on_settings(&u.user, Some(u.clone())).unwrap();
    }
    let renderer = Renderer::builtin("https://bp.example");
    let smtp = SmtpSender::new(&SmtpConfig {
        port: pf.port(),
        from: "deals@localhost".into(),
        message_id_domain: DOMAIN.into(),
        ..SmtpConfig::default()
    })
    .unwrap();
    let http = HttpSender::new(&HttpConfig::default()).unwrap();
    let mut tailer = Tailer::open(pf.log_path(), None).unwrap();
    let mut bounces = Tracker::new(DOMAIN);
    let mut qstate: BTreeMap<String, Message> = BTreeMap::new();
    let mut seen = Seen::default();

    for (phase, &rounds) in phases.iter().enumerate() {
        let mut requests: Vec<NotificationRequest> = Vec::new();
        for _ in 0..rounds {
            let round = feed.next_round();
            for u in round.updates() {
                let Some(t) = products
                    .entry(u.product.clone())
                    .or_default()
                    .apply(u, &params)
                else {
                    continue;
                };
                for o in matcher.on_transition(&t).unwrap() {
                    match o {
                        Output::Notify(n) => requests.push(n),
                        Output::Timeline(e) => {
                            let op = if e.op == TimelineOp::Add {
                                "add"
                            } else {
                                "remove"
                            };
                            assert!(
                                seen.timeline.insert((e.user, op, e.entry)),
                                "timeline entry twice"
                            );
                        }
                    }
                }
            }
        }
        // Deliver, 16 at a time; HTTP retried until delivered (the retry topics' job in the processor).
        let results: Vec<(NotificationRequest, Outcome)> = futures_util::stream::iter(requests)
            .map(|n| {
                let (smtp, http, renderer) = (&smtp, &http, &renderer);
                async move {
                    let out = match n.channel {
                        Channel::Email => {
                            let mail = renderer.outgoing_mail(&n).unwrap();
                            smtp.send(&mail).await
                        }
                        Channel::Webhook | Channel::Push => {
                            let body = if n.channel == Channel::Webhook {
                                renderer.webhook_body(&n)
                            } else {
                                renderer.push_body(&n)
                            }
                            .unwrap();
                            let mut out = http.post(&n.address, &body, &n.id).await;
                            for _ in 0..3 {
                                if !matches!(out, Outcome::Retry(_)) {
                                    break;
                                }
                                out = http.post(&n.address, &body, &n.id).await;
                            }
                            out
                        }
                    };
                    (n, out)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (n, out) in results {
            match out {
                Outcome::Delivered { queue_id, .. } => {
                    if n.channel == Channel::Email {
                        assert!(queue_id.is_some(), "Postfix's 250 reply names the queue id");
                        seen.queued
                            .insert(n.id.clone(), (n.address.clone(), queue_id));
                    }
                }
                other => panic!("{} to {}: {other:?}", n.id, n.address),
            }
        }
        // Follow Postfix's log until every queued mail of this phase reached a final state.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            for line in tailer.poll(10_000).unwrap() {
                let l = parse(&line.text);
                let Some(qid) = l.qid().map(str::to_owned) else {
                    continue;
                };
                let (next, outs) = bounces.apply(qstate.remove(&qid), &l, 0);
                if let Some(n) = next {
                    qstate.insert(qid, n);
                }
                for o in outs {
                    match o {
                        tracker::Output::Status(s)
                            if matches!(
                                s.status,
                                MailState::Sent | MailState::Bounced | MailState::Failed
                            ) =>
                        {
                            assert!(
                                seen.final_status
                                    .insert(s.mail_id.clone(), (s.status, s.queue_id))
                                    .is_none(),
                                "one final status per mail"
                            );
                        }
                        tracker::Output::Flag(f) => {
                            seen.flagged.insert(f.address.clone());
                            matcher.on_address_status(&f).unwrap();
                        }
                        _ => {}
                    }
                }
            }
            if seen
                .queued
                .keys()
                .all(|m| seen.final_status.contains_key(m))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "phase {phase}: {} of {} mails final after 90 s",
                seen.final_status.len(),
                seen.queued.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        support::assert_same_set(
            &format!("flagged after phase {phase}"),
            &seen.flagged,
            &expected.flagged_after[phase],
        );
    }

    // Mail: what was handed to Postfix, per address, and what the mailboxes hold.
    let mut handed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, (addr, qid)) in &seen.queued {
        handed.entry(addr.clone()).or_default().insert(id.clone());
        let (state, logged_qid) = &seen.final_status[id];
        assert_eq!(
            logged_qid, qid,
            "queue id from the 250 reply = the one in the log"
        );
        let want = match address_kind(addr) {
            AddressKind::Deliverable => MailState::Sent,
            AddressKind::UnknownUser | AddressKind::HardBounce => MailState::Bounced,
            AddressKind::Defer => MailState::Failed,
        };
        assert_eq!(*state, want, "{addr}");
    }
    support::assert_same_set(
        "e-mails handed to Postfix",
        &support::pairs(&handed),
        &support::pairs(&expected.emails),
    );
    for (addr, name) in &boxes {
        let got: BTreeSet<String> = mbox_message_ids(&pf.mailbox(name))
            .unwrap()
            .into_iter()
            .map(|m| m.trim_end_matches(&format!("@{DOMAIN}")).to_owned())
            .collect();
        let want = expected.emails.get(addr).cloned().unwrap_or_default();
        support::assert_same_set(&format!("mailbox of {addr}"), &got, &want);
    }
    // Phase 2 sent nothing to an address flagged after phase 1.
    for a in &expected.flagged_after[0] {
        let phase1: usize = expected.emails[a].len();
        assert_eq!(handed[a].len(), phase1, "{a} got mail after being flagged");
    }
    support::assert_same_set("flagged", &seen.flagged, &expected.flagged);
    // HTTP: every call delivered exactly once (push: after one 503 each).
    let hook_ok: BTreeSet<(String, String)> = hooks
        .calls()
        .into_iter()
        .filter(|c| c.status == 200)
        .map(|c| (c.path, c.key))
        .collect();
    support::assert_same_set("webhook calls", &hook_ok, &expected.webhooks);
    let push_calls = push.calls();
    let push_ok: Vec<(String, String)> = push_calls
        .iter()
        .filter(|c| c.status == 200)
        .map(|c| (c.path.clone(), c.key.clone()))
        .collect();
    assert_eq!(
        push_ok.len(),
        expected.pushes.len(),
        "one delivery per push notification"
    );
    support::assert_same_set(
        "push calls",
        &push_ok.into_iter().collect(),
        &expected.pushes,
    );
    assert_eq!(
        push_calls.len(),
        2 * expected.pushes.len(),
        "each push was retried once after a 503"
    );
    support::assert_same_set("timeline", &seen.timeline, &expected.timeline);
    pf.stop();
    eprintln!(
        "chain: {} deals entered, {} left; {} mails ({} flagged addresses), {} webhooks, {} pushes, {} timeline events; {:.1} s",
        expected.entered,
        expected.left,
        seen.queued.len(),
        seen.flagged.len(),
        expected.webhooks.len(),
        expected.pushes.len(),
        seen.timeline.len(),
        started.elapsed().as_secs_f64()
    );
}
