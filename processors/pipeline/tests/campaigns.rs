//! The campaigns lane on a real broker: `spoold`, `spool-notifications` with the `alerts` and
//! `campaigns` lanes (as `deploy/pipeline/notifications.toml`), and a real Postfix. A campaign
//! to 36 users is written to `campaign-requests`; the test shows, from Postfix's acceptances
//! (`mail-status` *queued*, with the time of the `250`):
//!
//! - campaign mails are throttled to the lane's `rate_per_sec`: in every interval the
//!   campaigns lane renders (`outgoing-mail`, as the test sees them committed) at most the
//!   rate's worth plus the burst and a commit's batching; Postfix's acceptances follow (SMTP
//!   is shared with the alerts, so they can bunch up to `max_in_flight` after an alert);
//! - deal alerts written while the campaign is saturated are all accepted while it is still
//!   going, well before it could have finished;
//! - pausing the lane the way `spool processor pause notifications --lane campaigns` does
//!   (`spool_processor::ops::pause`) stops campaign mail; resuming sends the rest;
//! - users inside their quiet hours get nothing (their messages wait for the window's end);
//! - every mail is accepted once; an address flagged in `address-status` gets no campaign
//!   request at all (`publish::flagged_addresses`).

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_client::{Client, ConsumerConfig, StartAt};
use spool_pipeline::events::{
    AddressStatus, AlertSettings, CampaignInfo, Channel, MailState, MailStatus, NotificationKind,
    NotificationRequest, OutgoingMail, QuietHours,
};
use spool_pipeline::postfix::instance::{Instance, free_port};
use spool_pipeline::processors::envelope;
use spool_pipeline::{campaign, ids, publish, topics};
use spool_processor::ops;
use support::procs::Processor;

const RATE: u32 = 5;
const USERS: usize = 36;
const QUIET_USERS: usize = 2;
const ALERTS: usize = 20;

/// Postfix's acceptances: mail id → the `250`'s times (ms), in arrival order.
type Accepted = Arc<Mutex<BTreeMap<String, Vec<i64>>>>;
/// Campaign mails rendered: when the test read each one (read committed).
type Rendered = Arc<Mutex<Vec<Instant>>>;

async fn collect(client: Client, accepted: Accepted, rendered: Rendered) {
    let mut c = client.consumer(ConsumerConfig::default());
    for t in [topics::MAIL_STATUS, topics::OUTGOING_MAIL] {
        c.subscribe_topic(t, StartAt::Earliest).await.unwrap();
    }
    while let Some(r) = c.next().await {
        let r = r.unwrap();
        if &*r.topic == topics::OUTGOING_MAIL {
            let m = spool_processor::envelope::decode::<OutgoingMail>(
                &r.headers,
                r.key.as_ref(),
                r.value.as_ref(),
            )
            .unwrap()
            .data;
            if m.kind == NotificationKind::Campaign {
                rendered.lock().unwrap().push(Instant::now());
            }
            continue;
        }
        let s = spool_processor::envelope::decode::<MailStatus>(
            &r.headers,
            r.key.as_ref(),
            r.value.as_ref(),
        )
        .unwrap()
        .data;
        if s.status == MailState::Queued {
            accepted
                .lock()
                .unwrap()
                .entry(s.mail_id)
                .or_default()
                .push(s.at_ms);
        }
    }
}

fn user(i: usize, quiet: Option<QuietHours>) -> AlertSettings {
    AlertSettings {
        user: format!("u{i:06}"),
        name: format!("User {i}"),
        categories: vec!["books".into()],
        min_drop_bp: 1_000,
        channels: vec![Channel::Email],
        email: Some(format!("u{i:06}@localhost")),
        webhook_url: None,
        push_url: None,
        time_zone: "UTC".into(),
        quiet_hours: quiet,
        at_ms: 0,
    }
}

fn alert(u: &AlertSettings, n: usize, at_ms: i64) -> NotificationRequest {
    let deal = support::book_deal(&format!("p{n:06}"));
    NotificationRequest {
        id: ids::notification_id(&deal.transition, &u.user, Channel::Email),
        kind: NotificationKind::DealAlert,
        user: u.user.clone(),
        user_name: u.name.clone(),
        channel: Channel::Email,
        address: u.email.clone().unwrap(),
        time_zone: u.time_zone.clone(),
        quiet_hours: u.quiet_hours,
        deal: Some(deal),
        campaign: None,
        at_ms,
    }
}

/// How many of `ids` Postfix accepted so far.
fn count(accepted: &Accepted, ids: &[String]) -> usize {
    let a = accepted.lock().unwrap();
    ids.iter().filter(|id| a.contains_key(*id)).count()
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_are_throttled_pausable_and_quiet_while_alerts_flow() {
    let broker = spool_testkit::Broker::start();
    let addr = broker.addr();
    let client = Client::connect(addr.as_str()).await.unwrap();
    publish::ensure_topics(&client, Some(1)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pf = Instance::start(&dir.path().join("pf"), free_port().unwrap(), "pfcampaign")
        .expect("postfix (run .ci/install-test-tools)");

    // Quiet hours around now (UTC) for the first users: two hours either side.
    let now = jiff::Timestamp::now();
    let minute = now.as_second().rem_euclid(86_400) / 60;
    let quiet = QuietHours {
        start_min: ((minute + 1440 - 120) % 1440) as u16,
        end_min: ((minute + 120) % 1440) as u16,
    };
    let users: Vec<AlertSettings> = (0..USERS)
        .map(|i| user(i, (i < QUIET_USERS).then_some(quiet)))
        .collect();
    pf.set_mailboxes(
        users
            .iter()
            .map(|u| (u.email.as_deref().unwrap(), u.user.as_str())),
    )
    .unwrap();

    let mut notifications = Processor::new(
        env!("CARGO_BIN_EXE_spool-notifications"),
        dir.path(),
        "notifications",
        &addr,
        &format!(
            "inputs = [\"notification-requests\", \"outgoing-mail\", \"campaign-requests\"]\n\
             outputs = [\"outgoing-mail\", \"mail-status\", \"campaign-requests\"]\n\
             [[lanes]]\nname = \"alerts\"\ntopics = [\"notification-requests\", \"outgoing-mail\"]\n\
             [[lanes]]\nname = \"campaigns\"\ntopics = [\"campaign-requests\"]\npriority = 1\n\
             rate_per_sec = {RATE}\nmin_share = 0.05\n\
             [app.smtp]\nport = {}\nfrom = \"deals@localhost\"\n",
            pf.port()
        ),
    );
    notifications.start();
    assert!(
        notifications.wait_ready(Duration::from_secs(30)),
        "{}",
        notifications.log_since_start()
    );
    let accepted: Accepted = Arc::default();
    let rendered: Rendered = Arc::default();
    tokio::spawn(collect(client.clone(), accepted.clone(), rendered.clone()));

    let info = CampaignInfo {
        id: "spring".into(),
        title: "Spring sale".into(),
        body: "Up to 40% off".into(),
    };
    // One more user whose address bounced earlier: flagged in address-status, left out.
    let mut with_flagged = users.clone();
    with_flagged.push(user(USERS, None));
    let flag = AddressStatus {
        address: format!("u{USERS:06}@localhost"),
        unreachable: true,
        reason: "5.1.1".into(),
        mail_id: None,
        at_ms: 0,
    };
    let producer = publish::producer(&client);
    let rec = envelope("bounces", "flag", &flag, 0).to_record().unwrap();
    producer
        .send_to(topics::ADDRESS_STATUS, 0, rec)
        .await
        .unwrap()
        .await
        .unwrap();
    let flagged = publish::flagged_addresses(&client).await.unwrap();
    assert_eq!(flagged, [flag.address.clone()].into());
    let requests = campaign::requests(&info, &with_flagged, &flagged, now.as_millisecond());
    assert_eq!(requests.len(), USERS);
    assert!(requests.iter().all(|r| r.address != flag.address));
    let (held, sent): (Vec<_>, Vec<_>) = requests.iter().partition(|r| r.quiet_hours.is_some());
    let held: Vec<String> = held.iter().map(|r| r.id.clone()).collect();
    let campaign_ids: Vec<String> = sent.iter().map(|r| r.id.clone()).collect();
    publish::publish_campaign(&producer, &requests)
        .await
        .unwrap();

    // The campaign is under way: alerts written now must not wait for it.
    wait_for(
        "the campaign's first mails",
        Duration::from_secs(30),
        || count(&accepted, &campaign_ids) >= 3,
    )
    .await;
    let alerts: Vec<NotificationRequest> = (0..ALERTS)
        .map(|n| alert(&users[QUIET_USERS + n % 10], n, now.as_millisecond()))
        .collect();
    let alert_ids: Vec<String> = alerts.iter().map(|a| a.id.clone()).collect();
    let t_alerts = Instant::now();
    for a in &alerts {
        let rec = envelope("test", a.id.clone(), a, a.at_ms)
            .to_record()
            .unwrap();
        producer
            .send(topics::NOTIFICATION_REQUESTS, rec)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_for("the alerts", Duration::from_secs(30), || {
        count(&accepted, &alert_ids) == ALERTS
    })
    .await;
    let alerts_took = t_alerts.elapsed();
    let campaign_at_alerts = count(&accepted, &campaign_ids);
    eprintln!(
        "{ALERTS} alerts accepted {alerts_took:?} after being written; campaign {campaign_at_alerts}/{}",
        campaign_ids.len()
    );
    assert!(
        campaign_at_alerts < campaign_ids.len(),
        "the campaign was still going when every alert had been accepted"
    );

    // Pause the lane as `spool processor pause notifications --lane campaigns` does.
    ops::pause(&client, "notifications", Some("campaigns"), true)
        .await
        .unwrap();
    // Takes effect within a tick; mails already rendered may still be accepted.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let at_pause = count(&accepted, &campaign_ids);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_pause = count(&accepted, &campaign_ids);
    eprintln!("paused at {at_pause}, 2 s later {after_pause}");
    assert_eq!(at_pause, after_pause, "campaign mail went on while paused");
    assert!(
        after_pause < campaign_ids.len(),
        "paused with nothing left to send"
    );

    ops::pause(&client, "notifications", Some("campaigns"), false)
        .await
        .unwrap();
    wait_for("the rest of the campaign", Duration::from_secs(60), || {
        count(&accepted, &campaign_ids) == campaign_ids.len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    producer.close().await;

    let a = accepted.lock().unwrap().clone();
    // Once each.
    for id in campaign_ids.iter().chain(&alert_ids) {
        assert_eq!(a[id].len(), 1, "{id} accepted {:?}", a[id]);
    }
    // Quiet hours: held.
    for id in &held {
        assert!(!a.contains_key(id), "{id} was mailed in its quiet hours");
    }
    // Throttled: in every interval of d ms the lane rendered at most RATE × d / 1000 + 1
    // (the burst) + 2 (records that reach the test in one commit).
    let times = rendered.lock().unwrap().clone();
    assert_eq!(times.len(), campaign_ids.len(), "one rendering each");
    for i in 0..times.len() {
        for j in i + 1..times.len() {
            let d = (times[j] - times[i]).as_millis() as f64;
            let allowed = RATE as f64 * d / 1000.0 + 3.0;
            assert!(
                (j - i + 1) as f64 <= allowed,
                "{} campaign mails rendered within {d} ms at {RATE}/s",
                j - i + 1
            );
        }
    }
    let mut accepted_at: Vec<i64> = campaign_ids.iter().map(|id| a[id][0]).collect();
    accepted_at.sort_unstable();
    let span = |first: i64, last: i64| (last - first) as f64 / 1000.0;
    eprintln!(
        "campaign: {} mails rendered over {:.1} s, accepted over {:.1} s, including a 3.5 s pause ({RATE}/s configured)",
        times.len(),
        (times[times.len() - 1] - times[0]).as_secs_f64(),
        span(accepted_at[0], accepted_at[accepted_at.len() - 1]),
    );
    assert!(
        notifications.running(),
        "{}",
        notifications.log_since_start()
    );
}
