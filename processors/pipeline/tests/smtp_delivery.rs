//! The notifications processor's mail path against a real SMTP listener on 127.0.0.1 (lettre
//! speaks real SMTP to it), run by the runtime's test driver: several mails in flight at
//! once, a 5xx refusal becomes `mail-status` `failed` plus the dead letter in one
//! transaction, a 4xx is retried after its backoff without holding back the other mails, a
//! settled mail is never sent again, and a pending mail whose process died is sent again
//! after the restart (at least once). And with the real binary and a real `spoold`: a clean
//! stop (SIGTERM) settles the mails in flight, so the restart sends none of them again.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_client::partitioner::partition_for_key;
use spool_client::{ConsumerConfig, StartAt};
use spool_pipeline::events::{
    AddressStatus, Channel, MailState, MailStatus, NotificationKind, NotificationRequest,
    OutgoingMail,
};
use spool_pipeline::processors::envelope;
use spool_pipeline::processors::notifications::{Notifications, NotificationsSettings};
use spool_pipeline::{publish, topics};
use spool_processor::testing::{OutputRecord, TestDriver, TestRecord};
use spool_processor::{AsyncHandler, Context, Failure, Input, Timer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the SMTP listener saw.
#[derive(Default, Debug)]
struct Seen {
    /// Accepted messages (DATA completed) per recipient.
    accepted: BTreeMap<String, usize>,
    /// Transactions between RCPT and the end of DATA at this moment / at most.
    open: usize,
    max_open: usize,
    /// RCPTs answered 451 so far, per recipient.
    deferred: BTreeMap<String, usize>,
    /// RCPTs answered 550 so far, per recipient.
    rejected: BTreeMap<String, usize>,
    /// `slow*` recipients whose first message was answered [`SLOW_REPLY`] late.
    slowed: BTreeMap<String, usize>,
}

/// How late the listener answers the end of DATA of a `slow*` recipient's first message (the
/// message counts as queued all the same, as Postfix's would).
const SLOW_REPLY: Duration = Duration::from_millis(1_500);

/// An SMTP server: `reject*` recipients get `550 5.1.1`, `deny*` ones `554 5.7.1`, `later*` ones `451 4.3.0` the first
/// time, everyone else is queued after `delay` (as `queued as Q<n>`); a `slow*` recipient's
/// first message is queued but answered [`SLOW_REPLY`] late.
async fn smtp_server(delay: Duration) -> (u16, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let seen = s.clone();
            n += 1_000;
            let base = n;
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"220 test ESMTP\r\n").await.unwrap();
                let (mut rcpt, mut count) = (String::new(), base);
                while let Ok(Some(line)) = lines.next_line().await {
                    let up = line.to_ascii_uppercase();
                    let reply = if up.starts_with("EHLO") || up.starts_with("HELO") {
                        "250-test\r\n250 PIPELINING\r\n".to_owned()
                    } else if up.starts_with("MAIL")
                        || up.starts_with("RSET")
                        || up.starts_with("NOOP")
                    {
                        "250 2.0.0 Ok\r\n".to_owned()
                    } else if up.starts_with("RCPT") {
                        rcpt =
                            line[line.find('<').unwrap() + 1..line.find('>').unwrap()].to_owned();
                        let mut g = seen.lock().unwrap();
                        if rcpt.starts_with("reject") {
                            *g.rejected.entry(rcpt.clone()).or_default() += 1;
                            "550 5.1.1 <reject>: Recipient address rejected\r\n".to_owned()
                        } else if rcpt.starts_with("deny") {
                            "554 5.7.1 <deny>: Relay access denied\r\n".to_owned()
                        } else if rcpt.starts_with("later") && !g.deferred.contains_key(&rcpt) {
                            g.deferred.insert(rcpt.clone(), 1);
                            "451 4.3.0 try again later\r\n".to_owned()
                        } else {
                            g.open += 1;
                            g.max_open = g.max_open.max(g.open);
                            "250 2.1.5 Ok\r\n".to_owned()
                        }
                    } else if up.starts_with("DATA") {
                        w.write_all(b"354 go ahead\r\n").await.unwrap();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                        }
                        tokio::time::sleep(delay).await;
                        let slow = rcpt.starts_with("slow") && {
                            let mut g = seen.lock().unwrap();
                            let n = g.slowed.entry(rcpt.clone()).or_default();
                            *n += 1;
                            *n == 1
                        };
                        if slow {
                            tokio::time::sleep(SLOW_REPLY).await;
                        }
                        count += 1;
                        let mut g = seen.lock().unwrap();
                        g.open -= 1;
                        *g.accepted.entry(rcpt.clone()).or_default() += 1;
                        format!("250 2.0.0 Ok: queued as Q{count}\r\n")
                    } else if up.starts_with("QUIT") {
                        let _ = w.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        "502 5.5.2 unknown\r\n".to_owned()
                    };
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

fn settings(port: u16, in_flight: u32) -> NotificationsSettings {
    let mut s = NotificationsSettings {
        address_partitions: 2,
        ..NotificationsSettings::default()
    };
    s.smtp.port = port;
    s.smtp.from = "deals@localhost".into();
    s.smtp.max_in_flight = in_flight;
    s.smtp.pool_max = in_flight;
    s.smtp.timeout_ms = 5_000;
    s.smtp.retry_initial_ms = 300;
    s
}

fn mail(i: usize, to: &str) -> spool_processor::Event<OutgoingMail> {
    let m = OutgoingMail {
        mail_id: format!("m{i:03}"),
        notification: format!("n{i:03}"),
        user: format!("u{i:03}"),
        to: to.into(),
        subject: "A deal".into(),
        text: "text".into(),
        html: "<p>html</p>".into(),
        kind: NotificationKind::DealAlert,
        at_ms: 1_000,
    };
    envelope("render", m.mail_id.clone(), &m, m.at_ms)
}

/// Advances the driver's clock in 100 ms steps (real time passing too, for the sends) until
/// `done` says so or 15 s passed.
async fn settle<H: AsyncHandler>(
    d: &mut TestDriver<H>,
    mut done: impl FnMut(&[MailStatus]) -> bool,
) -> Vec<MailStatus> {
    let mut all = Vec::new();
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.advance_wall_clock_async(Duration::from_millis(100)).await;
        all.extend(
            d.read_events::<MailStatus>(topics::MAIL_STATUS)
                .into_iter()
                .map(|e| e.data),
        );
        if done(&all) {
            return all;
        }
    }
    panic!("mails not settled in 15 s: {all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_in_flight_refusals_retries_and_restarts() {
    let (port, seen) = smtp_server(Duration::from_millis(150)).await;
    let h = Notifications::new(&settings(port, 4)).unwrap();
    let mut d = TestDriver::new("notifications", h).with_topic(topics::OUTGOING_MAIL, 1);
    let mut to: Vec<String> = (0..8).map(|i| format!("user{i}@localhost")).collect();
    to.push("reject0@localhost".into());
    to.push("later0@localhost".into());
    for (i, a) in to.iter().enumerate() {
        d.pipe_event_async(topics::OUTGOING_MAIL, &mail(i, a)).await;
    }
    let all = settle(&mut d, |s| s.len() >= to.len()).await;

    // Several at once, bounded by max_in_flight.
    let max_open = seen.lock().unwrap().max_open;
    assert!(
        (2..=4).contains(&max_open),
        "transactions open at once: {max_open}"
    );
    // Every deliverable mail queued exactly once, with the server's queue id.
    let by_id: BTreeMap<&str, &MailStatus> = all.iter().map(|s| (s.mail_id.as_str(), s)).collect();
    assert_eq!(by_id.len(), to.len(), "one status per mail: {all:?}");
    for (i, a) in to.iter().enumerate() {
        let s = by_id[format!("m{i:03}").as_str()];
        assert_eq!(&s.to, a);
        if a.starts_with("reject") {
            assert_eq!(s.status, MailState::Failed);
            assert_eq!(s.queue_id, None);
            assert_eq!(s.dsn.as_deref(), Some("550"), "{s:?}");
            assert!(s.detail.contains("Recipient address rejected"), "{s:?}");
        } else {
            assert_eq!(s.status, MailState::Queued, "{s:?}");
            assert!(
                s.queue_id.as_deref().is_some_and(|q| q.starts_with('Q')),
                "{s:?}"
            );
            assert_eq!(seen.lock().unwrap().accepted.get(a), Some(&1), "{a}");
        }
    }
    assert_eq!(
        seen.lock().unwrap().deferred.get("later0@localhost"),
        Some(&1)
    );
    // The refused mail's record is the one dead letter, with the SMTP reason.
    let dl = d.dead_letters(topics::OUTGOING_MAIL);
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0].key_str(), Some("m008"));
    assert!(
        dl[0].header("spool_dlq_error").unwrap().contains("550"),
        "{dl:?}"
    );
    assert_eq!(dl[0].header("spool_dlq_offset"), Some("8"));
    assert!(
        dl[0].event::<OutgoingMail>().is_ok(),
        "the original record is carried"
    );

    // A settled mail read again (a redelivery) is not sent again.
    d.pipe_event_async(topics::OUTGOING_MAIL, &mail(0, &to[0]))
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    d.advance_wall_clock_async(Duration::from_millis(500)).await;
    assert!(d.read_events::<MailStatus>(topics::MAIL_STATUS).is_empty());
    assert_eq!(seen.lock().unwrap().accepted.get(&to[0]), Some(&1));

    // A mail pending when its process died (its send's result lost with the process) is sent
    // again by the next process once its timer fires: at least once, settled once.
    let crash = "crash@localhost";
    d.pipe_event_async(topics::OUTGOING_MAIL, &mail(20, crash))
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(seen.lock().unwrap().accepted.get(crash), Some(&1));
    *d.handler_mut() = Notifications::new(&settings(port, 4)).unwrap();
    d.restart();
    let after = settle(&mut d, |s| !s.is_empty()).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        (after[0].mail_id.as_str(), after[0].status),
        ("m020", MailState::Queued)
    );
    assert_eq!(seen.lock().unwrap().accepted.get(crash), Some(&2));
}

/// A recipient the MTA refuses for good with an address-class code (`550 5.1.1` at RCPT, as
/// Postfix's `smtpd_reject_unlisted_recipient` answers; it never reaches Postfix's log as a
/// bounce) is flagged unreachable on every partition of `address-status`, in the settling
/// transaction beside its `failed` status and dead letter, so matching stops alerting it. A
/// policy refusal (`554 5.7.1`) flags nothing. (Before, only `spool-bounces` flagged, so such
/// an address was refused again at every alert, each adding a dead letter.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_with_an_address_code_is_flagged_on_every_partition() {
    let (port, _seen) = smtp_server(Duration::ZERO).await;
    let h = Notifications::new(&settings(port, 2)).unwrap();
    let mut d = TestDriver::new("notifications", h).with_topic(topics::OUTGOING_MAIL, 1);
    d.pipe_event_async(topics::OUTGOING_MAIL, &mail(0, "reject7@localhost"))
        .await;
    d.pipe_event_async(topics::OUTGOING_MAIL, &mail(1, "deny0@localhost"))
        .await;
    let all = settle(&mut d, |s| s.len() >= 2).await;
    assert!(all.iter().all(|s| s.status == MailState::Failed), "{all:?}");
    let flags = d.read_output(topics::ADDRESS_STATUS);
    assert_eq!(
        flags.iter().map(|r| r.partition).collect::<Vec<_>>(),
        vec![0, 1],
        "one copy per partition (address_partitions = 2), for reject7 only"
    );
    for r in &flags {
        let e = r.event::<AddressStatus>().unwrap();
        assert_eq!(e.id, "m000:refused");
        assert_eq!(e.data.address, "reject7@localhost");
        assert!(e.data.unreachable);
        assert_eq!(e.data.mail_id.as_deref(), Some("m000"));
        assert!(e.data.reason.contains("5.1.1"), "{:?}", e.data);
    }
    assert_eq!(d.dead_letters(topics::OUTGOING_MAIL).len(), 2);
}

/// SMTP's lost-reply window (RFC 1047), with no crash at all: the MTA queues the message but
/// its `250` after the final `.` comes later than `[app.smtp] timeout_ms`, so the attempt
/// counts as failed and is retried, and the MTA gets a second copy. docs/pipeline.md's
/// duplicate window states this; the Message-ID lets a receiver drop the copy. The log stays
/// exactly once: one `queued` status, no failure, no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_later_than_the_timeout_after_data_means_a_second_copy() {
    let (port, seen) = smtp_server(Duration::ZERO).await;
    let mut s = settings(port, 2);
    s.smtp.timeout_ms = 500;
    s.smtp.retry_initial_ms = 100;
    let h = Notifications::new(&s).unwrap();
    let mut d = TestDriver::new("notifications", h).with_topic(topics::OUTGOING_MAIL, 1);
    let to = "slow0@localhost";
    d.pipe_event_async(topics::OUTGOING_MAIL, &mail(0, to))
        .await;
    let all = settle(&mut d, |s| !s.is_empty()).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].status, MailState::Queued, "{all:?}");
    // The first copy is queued when its late reply is due (after the retry was accepted).
    let until = Instant::now() + Duration::from_secs(5);
    while seen.lock().unwrap().accepted.get(to) != Some(&2) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let g = seen.lock().unwrap();
    assert_eq!(g.slowed.get(to), Some(&2), "two messages handed over");
    assert_eq!(g.accepted.get(to), Some(&2), "both queued: a duplicate");
    drop(g);
    assert!(d.dead_letters(topics::OUTGOING_MAIL).is_empty());
}

/// A deal alert's e-mail is handed to the MTA as its request is handled (not one commit
/// later, when its `outgoing-mail` record is read back): the record goes to the request's
/// partition, and reading it back there sends nothing, before or after the settlement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_is_sent_as_it_is_rendered_and_its_record_sends_nothing_more() {
    let (port, seen) = smtp_server(Duration::ZERO).await;
    let h = Notifications::new(&settings(port, 4)).unwrap();
    let mut d = TestDriver::new("notifications", h)
        .with_topic(topics::NOTIFICATION_REQUESTS, 4)
        .with_topic(topics::OUTGOING_MAIL, 4);
    let mut requests = Vec::new();
    for i in 0..6 {
        let n = NotificationRequest {
            id: format!("n{i:03}"),
            kind: NotificationKind::DealAlert,
            user: format!("user{i}"),
            user_name: "Eleni".into(),
            channel: Channel::Email,
            address: format!("alert{i}@localhost"),
            time_zone: "UTC".into(),
            quiet_hours: None,
            deal: Some(support::book_deal("p1")),
            campaign: None,
            at_ms: 1_000,
        };
        let e = envelope("matching", n.id.clone(), &n, n.at_ms);
        d.pipe_event_async(topics::NOTIFICATION_REQUESTS, &e).await;
        requests.push(n);
    }
    let records = d.read_output(topics::OUTGOING_MAIL);
    assert_eq!(records.len(), 6, "one rendered mail per request");
    // Sent without a tick and without the record being read.
    let until = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().accepted.len() < 6 {
        assert!(
            Instant::now() < until,
            "not sent: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each record is in its request's partition (the task holding the pending send).
    let keys: Vec<_> = requests
        .iter()
        .map(|n| partition_for_key(n.user.as_bytes(), 4))
        .collect();
    for (r, want) in records.iter().zip(&keys) {
        assert_eq!(
            r.partition, *want,
            "outgoing-mail record in its request's partition"
        );
    }
    assert!(
        records
            .iter()
            .any(|r| Some(r.partition) != r.key.as_deref().map(|k| partition_for_key(k, 4))),
        "some record's partition differs from its key's (the users of this test are chosen so)"
    );
    // Read back before the settlement (pending), then settled, then read back again.
    for r in &records {
        d.pipe_record_async(TestRecord {
            topic: topics::OUTGOING_MAIL.into(),
            partition: Some(r.partition),
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp_ms: None,
        })
        .await;
    }
    let statuses = settle(&mut d, |s| s.len() >= 6).await;
    assert!(statuses.iter().all(|s| s.status == MailState::Queued));
    for r in &records {
        d.pipe_record_async(TestRecord {
            topic: topics::OUTGOING_MAIL.into(),
            partition: Some(r.partition),
            key: r.key.clone(),
            value: r.value.clone(),
            headers: r.headers.clone(),
            timestamp_ms: None,
        })
        .await;
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.advance_wall_clock_async(Duration::from_millis(100)).await;
    }
    let g = seen.lock().unwrap();
    assert_eq!(g.accepted.len(), 6);
    assert!(
        g.accepted.values().all(|n| *n == 1),
        "each alert sent once: {:?}",
        g.accepted
    );
    assert!(
        d.read_output(topics::MAIL_STATUS).is_empty(),
        "settled once"
    );
}

/// Notifications whose next timer call, once `abort` is set, fails after the handler ran:
/// the runtime drops that call's writes and emits and fires the timer again later, with the
/// handler's memory as it is, exactly as after an aborted transaction.
struct AbortOnce {
    inner: Notifications,
    abort: Arc<std::sync::atomic::AtomicBool>,
}

impl AsyncHandler for AbortOnce {
    async fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        self.inner.handle(ctx, input).await
    }

    async fn on_timer(&mut self, ctx: &mut Context<'_>, timer: &Timer) -> Result<(), Failure> {
        self.inner.on_timer(ctx, timer).await?;
        if self.abort.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(Failure::retry("the test aborts this settlement"));
        }
        Ok(())
    }
}

/// `r` read again from `outgoing-mail`, in its partition.
fn read_back(r: &OutputRecord) -> TestRecord {
    TestRecord {
        topic: topics::OUTGOING_MAIL.into(),
        partition: Some(r.partition),
        key: r.key.clone(),
        value: r.value.clone(),
        headers: r.headers.clone(),
        timestamp_ms: None,
    }
}

/// A deal alert the MTA refuses (550 at RCPT) is tried once: its settlement (`failed` and the
/// dead letter) aborted once is settled again from the result in memory, not sent again; its
/// own `outgoing-mail` record read back after the settlement sends nothing (it finds neither
/// a pending timer nor an idempotency key: the header says its send was started inline).
/// Its dead letter redriven (the `spool_*` headers dropped, as `spool dlq redrive` does) is
/// sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_alert_is_tried_once_and_its_redriven_dead_letter_again() {
    let (port, seen) = smtp_server(Duration::ZERO).await;
    let abort = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = AbortOnce {
        inner: Notifications::new(&settings(port, 4)).unwrap(),
        abort: abort.clone(),
    };
    let mut d = TestDriver::new("notifications", h);
    let to = "reject1@localhost";
    let n = NotificationRequest {
        id: "n-refused".into(),
        kind: NotificationKind::DealAlert,
        user: "user1".into(),
        user_name: "Eleni".into(),
        channel: Channel::Email,
        address: to.into(),
        time_zone: "UTC".into(),
        quiet_hours: None,
        deal: Some(support::book_deal("p1")),
        campaign: None,
        at_ms: 1_000,
    };
    let e = envelope("matching", n.id.clone(), &n, n.at_ms);
    d.pipe_event_async(topics::NOTIFICATION_REQUESTS, &e).await;
    let records = d.read_output(topics::OUTGOING_MAIL);
    assert_eq!(records.len(), 1);
    let rejected = |seen: &Arc<Mutex<Seen>>| seen.lock().unwrap().rejected.get(to).copied();
    let until = Instant::now() + Duration::from_secs(10);
    while rejected(&seen).is_none() {
        assert!(Instant::now() < until, "not sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The send has returned (its slot is freed after its result is recorded): the timer call
    // aborted below is the failure's settlement, not a re-check of a send still running.
    while d.handler().inner.mails_in_flight() > 0 {
        assert!(Instant::now() < until, "the refused send did not return");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The settlement is aborted once: nothing of it stays, and the timer fires again.
    abort.store(true, std::sync::atomic::Ordering::SeqCst);
    d.advance_wall_clock_async(Duration::from_millis(100)).await;
    assert!(
        !abort.load(std::sync::atomic::Ordering::SeqCst),
        "a timer fired"
    );
    assert_eq!(d.timer_retries(), 1);
    assert!(d.read_output(topics::MAIL_STATUS).is_empty(), "aborted");
    assert!(d.dead_letters(topics::OUTGOING_MAIL).is_empty(), "aborted");
    let statuses = settle(&mut d, |s| !s.is_empty()).await;
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].status, MailState::Failed);
    assert_eq!(
        rejected(&seen),
        Some(1),
        "the aborted settlement sent it again"
    );

    // The alert's own record read back after its failure was settled: nothing more.
    d.pipe_record_async(read_back(&records[0])).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        d.advance_wall_clock_async(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rejected(&seen),
        Some(1),
        "its record read back sent it again"
    );
    assert!(
        d.read_output(topics::MAIL_STATUS).is_empty(),
        "a second status"
    );
    let dl = d.dead_letters(topics::OUTGOING_MAIL);
    assert_eq!(dl.len(), 1, "one dead letter: {dl:?}");
    assert!(
        records[0]
            .header(spool_pipeline::processors::notifications::SENT_INLINE_HEADER)
            .is_some(),
        "the alert's record is marked as sent inline"
    );
    assert_eq!(
        dl[0].header(spool_pipeline::processors::notifications::SENT_INLINE_HEADER),
        None,
        "the dead letter is a plain record"
    );

    // Redriven (at once: the failure's result is still in memory), it is sent again.
    let mut redriven = read_back(&dl[0]);
    redriven.headers.retain(|h| !h.key.starts_with("spool_"));
    redriven.partition = Some(0);
    d.pipe_record_async(redriven).await;
    let again = settle(&mut d, |s| !s.is_empty()).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].status, MailState::Failed);
    assert_eq!(
        rejected(&seen),
        Some(2),
        "the redriven dead letter was sent"
    );
    assert_eq!(d.dead_letters(topics::OUTGOING_MAIL).len(), 1, "a new one");
}

/// Every `mail-status` committed so far (read committed, from the start), after `quiet` with
/// nothing new.
async fn committed_statuses(client: &spool_client::Client, quiet: Duration) -> Vec<MailStatus> {
    let mut c = client.consumer(ConsumerConfig::default());
    c.subscribe_topic(topics::MAIL_STATUS, StartAt::Earliest)
        .await
        .unwrap();
    let mut all = Vec::new();
    while let Ok(Some(r)) = tokio::time::timeout(quiet, c.next()).await {
        let r = r.unwrap();
        let e = spool_processor::envelope::decode::<MailStatus>(
            &r.headers,
            r.key.as_ref(),
            r.value.as_ref(),
        )
        .unwrap();
        all.push(e.data);
    }
    all
}

/// SIGTERM while four mails are handed over (the server holds each `250` for 700 ms): the
/// process waits for them, settles them in its last transaction and exits 0; the next start
/// sends none of them again (without the drain, by reading: their pending timers were
/// committed and their settlements not, so the restart would send all four again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_settles_the_mails_in_flight() {
    let (port, seen) = smtp_server(Duration::from_millis(700)).await;
    let (_broker, client, addr) = support::broker_with_topics(1).await;
    let dir = support::Scratch::new("sigterm_settles_the_mails_in_flight");
    let mut p = support::procs::Processor::new(
        env!("CARGO_BIN_EXE_spool-notifications"),
        dir.path(),
        "notifications",
        &addr,
        &format!(
            "inputs = [\"outgoing-mail\"]\noutputs = [\"mail-status\"]\n[app.smtp]\nport = {port}\nfrom = \"deals@localhost\"\nmax_in_flight = 4\npool_max = 4\n"
        ),
    );
    p.start();
    assert!(
        p.wait_ready(Duration::from_secs(30)),
        "{}",
        p.log_since_start()
    );
    let producer = publish::producer(&client);
    let to: Vec<String> = (0..4).map(|i| format!("user{i}@localhost")).collect();
    for (i, a) in to.iter().enumerate() {
        let record = mail(i, a).to_record().unwrap();
        let _ack = producer.send(topics::OUTGOING_MAIL, record).await.unwrap();
    }
    producer.flush().await;
    // All four between RCPT and the server's 250: handed over, not yet accepted.
    let until = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().open < 4 {
        assert!(Instant::now() < until, "{:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen.lock().unwrap().accepted.is_empty());
    p.terminate();
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = p.exited() {
            break s;
        }
        assert!(Instant::now() < until, "no exit 20 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status}: {}", p.log_since_start());
    let statuses = committed_statuses(&client, Duration::from_millis(500)).await;
    let queued: Vec<&str> = statuses
        .iter()
        .filter(|s| s.status == MailState::Queued)
        .map(|s| s.to.as_str())
        .collect();
    assert_eq!(queued.len(), 4, "settled before the exit: {statuses:?}");

    // The next incarnation finds every mail settled: nothing sent again in 1.5 s (15 ticks;
    // a pending timer fires at the first).
    p.start();
    assert!(
        p.wait_ready(Duration::from_secs(30)),
        "{}",
        p.log_since_start()
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for a in &to {
        assert_eq!(seen.lock().unwrap().accepted.get(a), Some(&1), "{a}");
    }
    assert_eq!(
        committed_statuses(&client, Duration::from_millis(300))
            .await
            .len(),
        4
    );
}
