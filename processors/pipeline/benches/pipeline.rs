//! The deals pipeline's end-to-end benchmarks (issue 11), on real processes: `spoold`, the
//! processor binaries, and a real local Postfix (needs root and the `postfix` package).
//!
//! ```text
//! cargo build --release -p spool-broker --bin spoold
//! cargo bench -p spool-pipeline --bench pipeline                 # all three
//! cargo bench -p spool-pipeline --bench pipeline -- mails        # or calls, latency, bounces
//! ```
//!
//! - **mails**: `spool-notifications` alone hands N rendered mails to Postfix; mails/s from
//!   the first record to the N-th `mail-status` `queued`, with `max_in_flight = 1` (one send
//!   at a time, the baseline) and 8, in the same run.
//! - **calls**: `spool-notifications` alone makes N webhook calls to a local HTTP endpoint
//!   that answers after 20 ms (a remote service's latency); calls/s from the first record
//!   to the N-th call received, with `[app.http] max_in_flight = 1` and 8, alternated, three
//!   runs each, medians.
//! - **latency**: the four processors; after a warm-up, price drops are written at 100/s, each
//!   making one product enter "deal" for exactly one interested user with an e-mail address.
//!   Latency of a mail = Postfix's `250` (the `queued` status's time) − the price update's
//!   event time (set when it is written). Target: p99 ≤ 100 ms.
//! - **bounces**: deals for users whose address Postfix bounces (`ghost-…@localhost`, unknown
//!   user), one at a time. Time from the bounce line appearing in Postfix's log file (this
//!   bench polls the file every 2 ms) to `matching` having committed the `address-status`
//!   flag in every partition (from then on it mails the address no more; a later deal for
//!   the same user is checked to send nothing). Target: ≤ 2 s.
//!
//! `SPOOL_BENCH_COMMIT_MS` sets every processor's `[commit] interval_ms` (default 100, the
//! runtime's default) and `SPOOL_BENCH_LINGER_MS` its `linger_ms` (unset: the runtime's
//! default); each hop of the pipeline waits for the previous processor's transaction to
//! commit. `SPOOL_BENCH_BIN_DIR` runs the processor binaries of that directory instead of this
//! build's (an A/B against another build). The latency case also prints where the time went,
//! hop by hop (from the time the bench's own read-committed readers receive each stage's
//! record). `SPOOL_BENCH_PROC_LOG` is the processors' `SPOOL_LOG` (default `warn`); with
//! `warn,spool_client::txn::timing=debug` the latency case also prints, per processor, each
//! commit step's p50/p99 (flush, AddOffsetsToTxn, EndTxn) from their logs. The broker's own
//! steps (`SPOOL_TEST_BROKER_LOG=warn,spool_broker::txn::timing=debug`) go to stderr.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_client::{Client, ConsumerConfig, OffsetSpec, StartAt, TopicPartition};
use spool_pipeline::events::{
    AddressStatus, AlertSettings, Channel, DealInfo, DealTransition, MailState, MailStatus,
    NotificationKind, NotificationRequest, OutgoingMail, PriceUpdate, TimelineEvent, TimelineOp,
};
use spool_pipeline::postfix::instance::{Instance, free_port};
use spool_pipeline::processors::envelope;
use spool_pipeline::{publish, topics};
use spool_processor::envelope as ce;

const PARTITIONS: u32 = 2;
const DOMAIN: &str = "bench.spool.local";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn commit_ms() -> u64 {
    std::env::var("SPOOL_BENCH_COMMIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

/// A processor process, killed when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One processor binary with its config (name, broker, commit interval, then `body`).
fn processor(bin: &str, dir: &Path, name: &str, broker: &str, body: &str) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    // Top-level keys first (the body starts with them); TOML tables may come in any order.
    let linger = std::env::var("SPOOL_BENCH_LINGER_MS")
        .map(|v| format!("linger_ms = {v}\n"))
        .unwrap_or_default();
    let text = format!(
        "name = \"{name}\"\nbroker = \"{broker}\"\n{body}\n[commit]\ninterval_ms = {}\n{linger}",
        commit_ms()
    );
    std::fs::write(&cfg, text).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    // A/B: the same binary names from another build.
    let bin = match std::env::var_os("SPOOL_BENCH_BIN_DIR") {
        Some(d) => PathBuf::from(d).join(Path::new(bin).file_name().unwrap()),
        None => PathBuf::from(bin),
    };
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.join(format!("{name}-state")))
        .arg("--metrics-listen")
        .arg("off")
        .arg("--instance-id")
        .arg("bench")
        .env(
            "SPOOL_LOG",
            std::env::var("SPOOL_BENCH_PROC_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    Proc(child)
}

fn notifications(dir: &Path, broker: &str, smtp_port: u16, in_flight: u32) -> Proc {
    processor(
        env!("CARGO_BIN_EXE_spool-notifications"),
        dir,
        "notifications",
        broker,
        &format!(
            "inputs = [\"notification-requests\", \"outgoing-mail\"]\noutputs = [\"outgoing-mail\", \"mail-status\"]\n[app.smtp]\nport = {smtp_port}\nfrom = \"deals@localhost\"\nmessage_id_domain = \"{DOMAIN}\"\nmax_in_flight = {in_flight}\npool_max = {in_flight}\n"
        ),
    )
}

/// Every record of `topic` as an event of type `T`, with its partition, offset and the wall
/// time (ms) this reader received it, sent to `tx` as it arrives (read committed: the time
/// its transaction became visible, plus the push to this reader).
fn follow<T: serde::de::DeserializeOwned + Send + 'static>(
    client: &Client,
    topic: &'static str,
) -> tokio::sync::mpsc::UnboundedReceiver<(u32, u64, T, i64)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = client.clone();
    tokio::spawn(async move {
        let mut c = client.consumer(ConsumerConfig::default());
        c.subscribe_topic(topic, StartAt::Earliest).await.unwrap();
        // Ends with the broker (a run's broker is dropped after the run).
        while let Some(Ok(r)) = c.next().await {
            if let Ok(e) = ce::decode::<T>(&r.headers, r.key.as_ref(), r.value.as_ref())
                && tx.send((r.partition, r.offset, e.data, now_ms())).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Writes a record (its acknowledgement is awaited by the caller's `flush`; a failure shows
/// up as a missing outcome, which the bench waits for and reports).
async fn send(
    producer: &spool_client::Producer,
    topic: &str,
    record: spool_client::ProducerRecord,
) {
    let _ack = producer.send(topic, record).await.unwrap();
}

async fn broker_and_topics() -> (spool_testkit::Broker, Client) {
    let broker = spool_testkit::Broker::start();
    let client = Client::connect(broker.addr().as_str()).await.unwrap();
    publish::ensure_topics(&client, Some(PARTITIONS))
        .await
        .unwrap();
    (broker, client)
}

fn mailbox(i: usize) -> (String, String) {
    (format!("b{i:04}@localhost"), format!("b{i:04}"))
}

// ---------------------------------------------------------------------------------------
// mails/s

fn outgoing(run: &str, i: usize, boxes: usize) -> spool_client::ProducerRecord {
    let m = OutgoingMail {
        mail_id: format!("{run}-{i:06}"),
        notification: format!("{run}-n{i:06}"),
        user: format!("u{i:06}"),
        to: mailbox(i % boxes).0,
        subject: "Deal: a thing at -30%".into(),
        text: "A deal.\n".repeat(20),
        html: "<p>A deal.</p>".repeat(20),
        kind: NotificationKind::DealAlert,
        at_ms: now_ms(),
    };
    envelope("bench", m.mail_id.clone(), &m, m.at_ms)
        .to_record()
        .unwrap()
}

/// Mails/s of `spool-notifications` with `in_flight` sends at once, over `n` mails.
async fn mails_per_sec(pf: &Instance, dir: &Path, in_flight: u32, n: usize, boxes: usize) -> f64 {
    let (broker, client) = broker_and_topics().await;
    let dir = dir.join(format!("mails-{in_flight}-{}", now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let _p = notifications(&dir, &broker.addr(), pf.port(), in_flight);
    let mut status = follow::<MailStatus>(&client, topics::MAIL_STATUS);
    let producer = publish::producer(&client);
    let queued =
        async |status: &mut tokio::sync::mpsc::UnboundedReceiver<(u32, u64, MailStatus, i64)>,
               prefix: &str,
               want: usize| {
            let mut got = BTreeSet::new();
            while got.len() < want {
                let (_, _, s, _) = tokio::time::timeout(Duration::from_secs(120), status.recv())
                    .await
                    .expect("mail-status within 120 s")
                    .unwrap();
                if s.status == MailState::Queued && s.mail_id.starts_with(prefix) {
                    got.insert(s.mail_id);
                }
            }
        };
    // Warm-up: the processor joins its group and opens its SMTP connections.
    for i in 0..in_flight as usize {
        send(&producer, topics::OUTGOING_MAIL, outgoing("warm", i, boxes)).await;
    }
    producer.flush().await;
    queued(&mut status, "warm-", in_flight as usize).await;
    let t0 = Instant::now();
    for i in 0..n {
        send(&producer, topics::OUTGOING_MAIL, outgoing("run", i, boxes)).await;
    }
    producer.flush().await;
    queued(&mut status, "run-", n).await;
    n as f64 / t0.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// webhook calls/s

/// A webhook endpoint on 127.0.0.1 answering `200` `delay` after each request; counts the
/// requests whose `Idempotency-Key` starts with `run-` and `warm-`.
async fn endpoint(delay: Duration) -> (String, Arc<[std::sync::atomic::AtomicUsize; 2]>) {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let counts: Arc<[std::sync::atomic::AtomicUsize; 2]> = Arc::default();
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let c = c.clone();
                    async move {
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        tokio::time::sleep(delay).await;
                        if key.starts_with("run-") {
                            c[0].fetch_add(1, Ordering::SeqCst);
                        } else if key.starts_with("warm-") {
                            c[1].fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            hyper::body::Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (base, counts)
}

fn webhook_request(base: &str, id: String) -> spool_client::ProducerRecord {
    let n = NotificationRequest {
        kind: NotificationKind::DealAlert,
        user: format!("u-{id}"),
        user_name: "Bench".into(),
        channel: Channel::Webhook,
        address: format!("{base}/hook/{id}"),
        time_zone: "UTC".into(),
        quiet_hours: None,
        deal: Some(DealInfo {
            transition: "p1:1".into(),
            product: "p1".into(),
            name: "A thing".into(),
            category: "books".into(),
            price: 700,
            reference: 1_000,
            drop_bp: 3_000,
            merchant: "m000".into(),
        }),
        campaign: None,
        at_ms: now_ms(),
        id,
    };
    envelope("bench", n.id.clone(), &n, n.at_ms)
        .to_record()
        .unwrap()
}

/// Webhook calls/s of `spool-notifications` with `in_flight` calls at once, over `n` calls
/// to an endpoint answering after `delay`.
async fn calls_per_sec(dir: &Path, in_flight: u32, n: usize, delay: Duration) -> f64 {
    use std::sync::atomic::Ordering;
    let (broker, client) = broker_and_topics().await;
    let dir = dir.join(format!("calls-{in_flight}-{}", now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let _p = processor(
        env!("CARGO_BIN_EXE_spool-notifications"),
        &dir,
        "notifications",
        &broker.addr(),
        &format!(
            "inputs = [\"notification-requests\"]\noutputs = [\"outgoing-mail\", \"mail-status\"]\n[app.http]\nmax_in_flight = {in_flight}\n"
        ),
    );
    let (base, counts) = endpoint(delay).await;
    let producer = publish::producer(&client);
    let wait = async |i: usize, want: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while counts[i].load(Ordering::SeqCst) < want {
            assert!(Instant::now() < deadline, "calls within 120 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    // Warm-up: the processor joins its group and opens its connections.
    for i in 0..in_flight as usize {
        let r = webhook_request(&base, format!("warm-{i}"));
        send(&producer, topics::NOTIFICATION_REQUESTS, r).await;
    }
    producer.flush().await;
    wait(1, in_flight as usize).await;
    let t0 = Instant::now();
    for i in 0..n {
        let r = webhook_request(&base, format!("run-{i:06}"));
        send(&producer, topics::NOTIFICATION_REQUESTS, r).await;
    }
    producer.flush().await;
    wait(0, n).await;
    n as f64 / t0.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------
// the whole pipeline

struct Pipeline {
    _broker: spool_testkit::Broker,
    client: Client,
    _procs: Vec<Proc>,
}

fn price(product: &str, category: &str, cents: u64, at_ms: i64) -> spool_client::ProducerRecord {
    let u = PriceUpdate {
        product: product.into(),
        merchant: "m000".into(),
        category: category.into(),
        name: format!("Product {product}"),
        price: Some(cents),
        import: None,
        at_ms,
    };
    envelope("bench", format!("{product}@{at_ms}-{cents}"), &u, at_ms)
        .to_record()
        .unwrap()
}

fn user(id: &str, category: &str, email: &str) -> AlertSettings {
    AlertSettings {
        user: id.into(),
        name: id.into(),
        categories: vec![category.into()],
        min_drop_bp: 1_000,
        channels: vec![Channel::Email],
        email: Some(email.into()),
        webhook_url: None,
        push_url: None,
        time_zone: "UTC".into(),
        quiet_hours: None,
        at_ms: now_ms(),
    }
}

/// Waits until `group` committed everything written to `topic` so far (a topic written
/// without transactions: a commit marker takes an offset that no consumer commits past).
async fn caught_up(client: &Client, group: &str, topic: &str) {
    let tps: Vec<TopicPartition> = (0..PARTITIONS)
        .map(|p| TopicPartition::new(topic, p))
        .collect();
    let q: Vec<_> = tps
        .iter()
        .map(|t| (t.clone(), OffsetSpec::Latest))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ends = client.list_offsets(&q).await.unwrap();
        let committed = client.fetch_offsets(group, &tps).await.unwrap();
        if ends
            .iter()
            .zip(&committed)
            .all(|(e, c)| c.offset >= Some(e.as_ref().unwrap().offset))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{group} did not catch up on {topic}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the broker and the four processors; users `u0000..` (category `c0000..`, a
/// mailbox each) and `g000..` (category `g000..`, an address Postfix bounces); every
/// product's history warmed up (4 points at 100.00), deals and matching caught up.
async fn pipeline(
    pf: &Instance,
    dir: &Path,
    users: usize,
    products: usize,
    ghosts: usize,
) -> Pipeline {
    let (broker, client) = broker_and_topics().await;
    let addr = broker.addr();
    let procs = vec![
        processor(
            env!("CARGO_BIN_EXE_spool-deals"),
            dir,
            "deals",
            &addr,
            &format!(
                "inputs = [\"prices\"]\noutputs = [\"deal-transitions\", \"deal-broadcast\"]\n[app]\nbroadcast_partitions = {PARTITIONS}\n"
            ),
        ),
        processor(
            env!("CARGO_BIN_EXE_spool-matching"),
            dir,
            "matching",
            &addr,
            "inputs = [\"deal-broadcast\", \"user-settings\", \"address-status\"]\noutputs = [\"notification-requests\", \"timeline\"]\ntables = [\"user-settings\", \"address-status\"]\n",
        ),
        notifications(dir, &addr, pf.port(), 8),
        processor(
            env!("CARGO_BIN_EXE_spool-bounces"),
            dir,
            "bounces",
            &addr,
            &format!(
                "inputs = [\"postfix-log\"]\noutputs = [\"mail-status\", \"delivery-issues\", \"address-status\"]\n[app]\nlog_path = \"{}\"\nmessage_id_domain = \"{DOMAIN}\"\naddress_partitions = {PARTITIONS}\n",
                pf.log_path().display()
            ),
        ),
    ];
    let producer = publish::producer(&client);
    let mut settings: Vec<AlertSettings> = (0..users)
        .map(|i| user(&format!("u{i:04}"), &format!("c{i:04}"), &mailbox(i).0))
        .collect();
    settings.extend((0..ghosts).map(|j| {
        user(
            &format!("g{j:03}"),
            &format!("g{j:03}"),
            &format!("ghost-g{j:03}@localhost"),
        )
    }));
    publish::publish_users(&producer, &settings).await.unwrap();
    let t = now_ms() - 60_000;
    for round in 0..4 {
        for k in 0..products {
            let cat = format!("c{:04}", k % users);
            send(
                &producer,
                topics::PRICES,
                price(&format!("p{k:05}"), &cat, 10_000, t + round),
            )
            .await;
        }
        for j in 0..ghosts {
            for q in ["a", "b"] {
                send(
                    &producer,
                    topics::PRICES,
                    price(
                        &format!("g{j:03}{q}"),
                        &format!("g{j:03}"),
                        10_000,
                        t + round,
                    ),
                )
                .await;
            }
        }
    }
    producer.flush().await;
    caught_up(&client, "deals", topics::PRICES).await;
    caught_up(&client, "matching", topics::USER_SETTINGS).await;
    Pipeline {
        _broker: broker,
        client,
        _procs: procs,
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Where a mail's time went, per hop (ms): each from the time the bench's own read-committed
/// reader received the previous stage's record (its transaction visible) to the next's.
#[derive(Default)]
struct Hops {
    /// Price update written (its event time) → the deal transition visible (`deals`).
    deals: Vec<i64>,
    /// → the notification request visible (`matching`).
    matching: Vec<i64>,
    /// → the rendered `outgoing-mail` visible (`notifications`, render).
    render: Vec<i64>,
    /// → Postfix's `250` (`notifications`, send). Negative when the mail reached Postfix
    /// before its `outgoing-mail` record was visible: a deal alert's send starts in the
    /// transaction that writes the record (docs/pipeline.md).
    send: Vec<i64>,
}

/// Price drop → mail accepted by Postfix, at `rate` deals/s for `n` deals (products `p…`,
/// warmed up, in the categories of `users` users): the latencies (ms), sorted, and the hops.
async fn latency(p: &Pipeline, users: usize, rate: u64, n: usize) -> (Vec<i64>, Hops) {
    let mut transitions = follow::<DealTransition>(&p.client, topics::DEAL_TRANSITIONS);
    let mut requests = follow::<NotificationRequest>(&p.client, topics::NOTIFICATION_REQUESTS);
    let mut mails = follow::<OutgoingMail>(&p.client, topics::OUTGOING_MAIL);
    let mut status = follow::<MailStatus>(&p.client, topics::MAIL_STATUS);
    let producer = publish::producer(&p.client);
    let t0 = Instant::now();
    let feed = tokio::spawn(async move {
        for k in 0..n {
            let due = Duration::from_secs_f64(k as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let cat = format!("c{:04}", k % users);
            send(
                &producer,
                topics::PRICES,
                price(&format!("p{k:05}"), &cat, 7_000, now_ms()),
            )
            .await;
        }
        producer.flush().await;
    });
    // transition id → seen; request id → (transition, seen); mail id → (request, cause, seen).
    let mut seen_tr: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen_req: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut seen_mail: BTreeMap<String, (String, i64, i64)> = BTreeMap::new();
    let mut accepted: BTreeMap<String, i64> = BTreeMap::new();
    let complete = |tr: &BTreeMap<String, i64>,
                    req: &BTreeMap<String, (String, i64)>,
                    mail: &BTreeMap<String, (String, i64, i64)>,
                    accepted: &BTreeMap<String, i64>| {
        accepted.len() >= n
            && accepted.keys().all(|id| {
                mail.get(id)
                    .is_some_and(|(r, _, _)| req.get(r).is_some_and(|(t, _)| tr.contains_key(t)))
            })
    };
    let deadline = Instant::now() + Duration::from_secs(n as u64 / rate + 120);
    while !complete(&seen_tr, &seen_req, &seen_mail, &accepted) {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} mails accepted",
            accepted.len()
        );
        tokio::select! {
            Some((_, _, t, seen)) = transitions.recv() => {
                seen_tr.entry(t.id).or_insert(seen);
            }
            Some((_, _, r, seen)) = requests.recv() => {
                if let Some(d) = r.deal {
                    seen_req.entry(r.id).or_insert((d.transition, seen));
                }
            }
            Some((_, _, m, seen)) = mails.recv() => {
                seen_mail.entry(m.mail_id).or_insert((m.notification, m.at_ms, seen));
            }
            Some((_, _, s, _)) = status.recv() => {
                if s.status == MailState::Queued && s.to.starts_with('b') {
                    accepted.insert(s.mail_id, s.at_ms);
                }
            }
        }
    }
    feed.await.unwrap();
    let mut lat = Vec::new();
    let mut hops = Hops::default();
    for (id, at) in &accepted {
        let (req, cause, mail_seen) = &seen_mail[id];
        let (tr, req_seen) = &seen_req[req];
        let tr_seen = seen_tr[tr];
        lat.push(at - cause);
        hops.deals.push(tr_seen - cause);
        hops.matching.push(req_seen - tr_seen);
        hops.render.push(mail_seen - req_seen);
        hops.send.push(at - mail_seen);
    }
    lat.sort_unstable();
    for v in [
        &mut hops.deals,
        &mut hops.matching,
        &mut hops.render,
        &mut hops.send,
    ] {
        v.sort_unstable();
    }
    (lat, hops)
}

/// Reads what was appended to a file since the last call.
struct LogWatch {
    path: PathBuf,
    pos: u64,
    buf: String,
}

impl LogWatch {
    fn new(path: PathBuf) -> LogWatch {
        let pos = std::fs::metadata(&path).map_or(0, |m| m.len());
        LogWatch {
            path,
            pos,
            buf: String::new(),
        }
    }

    /// The instant a complete line containing both needles appears (polling every 2 ms).
    async fn wait_for(&mut self, a: &str, b: &str, timeout: Duration) -> Instant {
        let until = Instant::now() + timeout;
        loop {
            if let Ok(mut f) = std::fs::File::open(&self.path) {
                f.seek(SeekFrom::Start(self.pos)).unwrap();
                let mut more = String::new();
                if let Ok(n) = f.read_to_string(&mut more) {
                    self.pos += n as u64;
                    self.buf.push_str(&more);
                }
            }
            let seen = Instant::now();
            let mut found = false;
            while let Some(nl) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=nl).collect();
                found |= line.contains(a) && line.contains(b);
            }
            if found {
                return seen;
            }
            assert!(Instant::now() < until, "no log line with {a:?} and {b:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// For each of `ghosts` users: a deal mails their bouncing address; the time from the bounce
/// in Postfix's log to matching's committed flag (ms). Then a second deal per user must mail
/// nothing.
async fn bounces(p: &Pipeline, pf: &Instance, ghosts: usize) -> Vec<i64> {
    let producer = publish::producer(&p.client);
    let flags: Arc<Mutex<BTreeMap<String, BTreeMap<u32, u64>>>> = Arc::default();
    let mut rx = follow::<AddressStatus>(&p.client, topics::ADDRESS_STATUS);
    let f = flags.clone();
    tokio::spawn(async move {
        while let Some((part, off, a, _)) = rx.recv().await {
            if a.unreachable {
                f.lock()
                    .unwrap()
                    .entry(a.address)
                    .or_default()
                    .insert(part, off);
            }
        }
    });
    let mut log = LogWatch::new(pf.log_path());
    let tps: Vec<TopicPartition> = (0..PARTITIONS)
        .map(|q| TopicPartition::new(topics::ADDRESS_STATUS, q))
        .collect();
    let mut out = Vec::new();
    for j in 0..ghosts {
        let address = format!("ghost-g{j:03}@localhost");
        send(
            &producer,
            topics::PRICES,
            price(&format!("g{j:03}a"), &format!("g{j:03}"), 7_000, now_ms()),
        )
        .await;
        producer.flush().await;
        let logged = log
            .wait_for(
                &format!("to=<{address}>"),
                "status=bounced",
                Duration::from_secs(60),
            )
            .await;
        let until = Instant::now() + Duration::from_secs(60);
        let honoured = loop {
            let want = flags
                .lock()
                .unwrap()
                .get(&address)
                .cloned()
                .unwrap_or_default();
            if want.len() == PARTITIONS as usize {
                let committed = p.client.fetch_offsets("matching", &tps).await.unwrap();
                if committed
                    .iter()
                    .zip(&tps)
                    .all(|(c, tp)| c.offset.is_some_and(|o| o > want[&tp.partition]))
                {
                    break Instant::now();
                }
            }
            assert!(
                Instant::now() < until,
                "{address} not flagged in matching in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        out.push(honoured.duration_since(logged).as_millis() as i64);
    }
    // Honoured: a new deal for each of them reaches their timeline but sends no e-mail
    // request (matching writes both in one transaction).
    let mut timeline = follow::<TimelineEvent>(&p.client, topics::TIMELINE);
    let mut requests = follow::<NotificationRequest>(&p.client, topics::NOTIFICATION_REQUESTS);
    for j in 0..ghosts {
        send(
            &producer,
            topics::PRICES,
            price(&format!("g{j:03}b"), &format!("g{j:03}"), 7_000, now_ms()),
        )
        .await;
    }
    producer.flush().await;
    let mut reached = BTreeSet::new();
    while reached.len() < ghosts {
        let (_, _, t, _) = tokio::time::timeout(Duration::from_secs(60), timeline.recv())
            .await
            .expect("the second deals reach the ghosts' timelines within 60 s")
            .unwrap();
        if t.op == TimelineOp::Add && t.product.starts_with('g') && t.product.ends_with('b') {
            reached.insert(t.user);
        }
    }
    let mut mailed = BTreeMap::<String, BTreeSet<String>>::new();
    while let Ok(Some((_, _, n, _))) =
        tokio::time::timeout(Duration::from_secs(2), requests.recv()).await
    {
        if n.channel == Channel::Email && n.address.starts_with("ghost-") {
            mailed.entry(n.address).or_default().insert(n.id);
        }
    }
    assert_eq!(mailed.len(), ghosts, "each ghost was mailed its first deal");
    for (a, ids) in &mailed {
        assert_eq!(ids.len(), 1, "{a} was mailed after it was flagged");
    }
    out.sort_unstable();
    out
}

/// The processors whose logs [`step_breakdown`] reads.
const PROCESSORS: [&str; 4] = ["deals", "matching", "notifications", "bounces"];

/// How far each processor's log file is now (the breakdown reads what comes after).
fn log_marks(dir: &Path) -> Vec<u64> {
    PROCESSORS
        .iter()
        .map(|n| std::fs::metadata(dir.join(format!("{n}.log"))).map_or(0, |m| m.len()))
        .collect()
}

/// Per processor, the commit-path step timings its transactional producer logged since
/// `marks` (debug events of `spool_client::txn::timing`, on with
/// `SPOOL_BENCH_PROC_LOG=warn,spool_client::txn::timing=debug`): one line per step, p50 and
/// p99 in ms. Empty when the processors logged none (an older build, or the level off).
fn step_breakdown(dir: &Path, marks: &[u64]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, mark) in PROCESSORS.iter().zip(marks) {
        let Ok(mut f) = std::fs::File::open(dir.join(format!("{name}.log"))) else {
            continue;
        };
        let mut text = String::new();
        if f.seek(SeekFrom::Start(*mark)).is_err() || f.read_to_string(&mut text).is_err() {
            continue;
        }
        let mut steps: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for line in text.lines().filter(|l| l.contains("txn::timing")) {
            let plain = strip_ansi(line);
            let field = |k: &str| {
                plain
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .map(|v| v.trim_matches('"').to_owned())
            };
            if let (Some(step), Some(us)) = (field("step="), field("us="))
                && let Ok(us) = us.parse::<i64>()
            {
                steps.entry(step).or_default().push(us);
            }
        }
        for (step, mut v) in steps {
            v.sort_unstable();
            let ms = |q: f64| percentile(&v, q) as f64 / 1000.0;
            out.push(format!(
                "  commit step {name}/{step}: n={} p50={:.1} p90={:.1} p99={:.1} max={:.1} ms",
                v.len(),
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(1.0)
            ));
        }
    }
    out
}

/// `line` without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn summary(name: &str, sorted: &[i64]) -> String {
    format!(
        "{name}: n={} p50={} p90={} p99={} max={} ms",
        sorted.len(),
        percentile(sorted, 0.5),
        percentile(sorted, 0.9),
        percentile(sorted, 0.99),
        sorted.last().copied().unwrap_or(0)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |what: &str| args.is_empty() || args.iter().any(|a| a == what);
    if !spool_pipeline::postfix::instance::installed() {
        eprintln!("pipeline bench: postfix is not installed (run .ci/install-test-tools); skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pf =
        Instance::start(&dir.path().join("pf"), free_port().unwrap(), "pfbench").expect("postfix");
    let boxes = 200;
    pf.set_mailboxes(
        (0..boxes)
            .map(mailbox)
            .collect::<Vec<_>>()
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str())),
    )
    .unwrap();
    println!(
        "pipeline bench: commit interval {} ms, {PARTITIONS} partitions, Postfix on 127.0.0.1:{}",
        commit_ms(),
        pf.port()
    );
    if want("mails") {
        let n = 600;
        let one = mails_per_sec(&pf, dir.path(), 1, n, boxes).await;
        let eight = mails_per_sec(&pf, dir.path(), 8, n, boxes).await;
        println!(
            "mails: {n} mails to Postfix: max_in_flight=1 {one:.0} mails/s, max_in_flight=8 {eight:.0} mails/s ({:.1}x)",
            eight / one
        );
    }
    if want("calls") {
        let (n, delay) = (300, Duration::from_millis(20));
        let (mut one, mut eight) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            one.push(calls_per_sec(dir.path(), 1, n, delay).await);
            eight.push(calls_per_sec(dir.path(), 8, n, delay).await);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (m1, m8) = (median(&mut one), median(&mut eight));
        println!(
            "calls: {n} webhook calls, endpoint answering after {} ms: max_in_flight=1 {one:.0?} calls/s (median {m1:.0}), max_in_flight=8 {eight:.0?} (median {m8:.0}), {:.1}x",
            delay.as_millis(),
            m8 / m1
        );
    }
    if want("latency") || want("bounces") {
        let rate = 100;
        let n = 2_000;
        let ghosts = 10;
        let pdir = dir.path().join("pipeline");
        std::fs::create_dir_all(&pdir).unwrap();
        let p = pipeline(&pf, &pdir, boxes, n, ghosts).await;
        if want("latency") {
            let marks = log_marks(&pdir);
            // Bounds the broker's own log lines of the measured window (its stderr is echoed
            // here with `SPOOL_TEST_BROKER_LOG`).
            eprintln!("pipeline bench: latency window starts");
            let (lat, hops) = latency(&p, boxes, rate, n).await;
            eprintln!("pipeline bench: latency window ends");
            let p99 = percentile(&lat, 0.99);
            println!(
                "{} (target p99 <= 100 ms: {})",
                summary(
                    &format!("latency price update -> Postfix 250 at {rate} deals/s"),
                    &lat
                ),
                if p99 <= 100 { "met" } else { "NOT met" }
            );
            for (name, v) in [
                (
                    "price written -> deal transition visible (deals)",
                    &hops.deals,
                ),
                ("-> notification request visible (matching)", &hops.matching),
                (
                    "-> outgoing-mail visible (notifications: render)",
                    &hops.render,
                ),
                ("-> Postfix 250 (notifications: send)", &hops.send),
            ] {
                println!("  hop {}", summary(name, v));
            }
            for line in step_breakdown(&pdir, &marks) {
                println!("{line}");
            }
        }
        if want("bounces") {
            let b = bounces(&p, &pf, ghosts).await;
            let worst = b.last().copied().unwrap_or(0);
            println!(
                "{} (target <= 2000 ms: {})",
                summary("bounce logged -> flag committed by matching", &b),
                if worst <= 2_000 { "met" } else { "NOT met" }
            );
        }
    }
}
