//! `spool-demo`: the whole deals pipeline on this machine in one command: a broker, the four
//! processors and `spool-imports` (import runs completed / stuck), the seeded feed, local webhook and push receivers and, when Postfix is installed
//! (and this runs as root), a private Postfix instance; data under `--dir`. At the start it
//! also writes a marketing campaign (one e-mail per e-mail user) to `campaign-requests`, sent
//! by notifications' throttled `campaigns` lane beside the alerts (each user's quiet hours
//! honoured; `spool processor pause notifications --lane campaigns` / `resume`). Shows live
//! progress per stage once a second; Ctrl-C stops everything (processors first, then the
//! broker).
//!
//! ```text
//! cargo build --release -p spool-broker -p spool-pipeline && target/release/spool-demo
//! ```
//! The other binaries (`spoold`, `spool-deals`, ...) are looked up next to this one, then on
//! `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use spool_client::{Client, ConsumerConfig, StartAt};
use spool_pipeline::events::{
    CampaignInfo, DealTransition, MailState, MailStatus, NotificationKind, OutgoingMail,
    TransitionKind,
};
use spool_pipeline::feed::{Endpoints, Feed, FeedConfig};
use spool_pipeline::postfix::instance::{Instance, free_port, installed};
use spool_pipeline::processors::imports;
use spool_pipeline::{publish, topics};
use spool_processor::JobEvent;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Runs the whole deals pipeline locally with live progress (Ctrl-C stops it)."
)]
struct Args {
    /// Directory for the broker's data, the processors' state, Postfix and logs.
    #[arg(long, default_value = "./pipeline-demo")]
    dir: PathBuf,
    /// Feed seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Products.
    #[arg(long, default_value_t = 1_000)]
    products: usize,
    /// Users.
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Price updates per second.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Partitions of the pipeline's topics.
    #[arg(long, default_value_t = 2)]
    partitions: u32,
    /// A merchant whose feed breaks off in every import run (repeatable): its runs are
    /// reported stuck after `--stuck-after-secs`.
    #[arg(long = "stall", value_name = "MERCHANT")]
    stall: Vec<String>,
    /// An import run with no merchant finishing for this long is reported stuck.
    #[arg(long, default_value_t = 30)]
    stuck_after_secs: u64,
    /// Campaign e-mails per second (the campaigns lane's `rate_per_sec`; 0: no campaign).
    #[arg(long, default_value_t = 5)]
    campaign_rate: u32,
    /// Skip Postfix even if installed (e-mail then stays queued in `outgoing-mail` and retries).
    #[arg(long)]
    no_postfix: bool,
}

/// A child process, stopped with SIGTERM (then SIGKILL after 10 s) on drop.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop in 10 s: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(name: &str) -> PathBuf {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)));
    match here {
        Some(p) if p.exists() => p,
        _ => PathBuf::from(name),
    }
}

fn spawn(name: &'static str, dir: &Path, args: &[&str]) -> anyhow::Result<Proc> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(binary(name))
        .args(args)
        // Its own process group: a terminal's Ctrl-C reaches only the demo, which stops
        // the processors first and the broker last.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name} (build it: cargo build --release -p spool-broker -p spool-pipeline)"))?;
    Ok(Proc { name, child })
}

fn processor(name: &'static str, dir: &Path, broker: &str, toml: String) -> anyhow::Result<Proc> {
    let short = name.trim_start_matches("spool-");
    let cfg = dir.join(format!("{short}.toml"));
    std::fs::write(
        &cfg,
        format!("name = \"{short}\"\nbroker = \"{broker}\"\n{toml}"),
    )?;
    let state = dir.join("state").join(short);
    spawn(
        name,
        dir,
        &[
            "--config",
            &cfg.to_string_lossy(),
            "--state-dir",
            &state.to_string_lossy(),
            "--metrics-listen",
            "off",
            "--instance-id",
            "demo",
        ],
    )
}

/// Counts HTTP calls on a loopback port (the demo's webhook / push receiver).
async fn receiver(calls: Arc<AtomicU64>) -> anyhow::Result<String> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let calls = calls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    calls.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(base)
}

#[derive(Default)]
struct Counts {
    prices: AtomicU64,
    entered: AtomicU64,
    left: AtomicU64,
    requests: AtomicU64,
    queued: AtomicU64,
    sent: AtomicU64,
    deferred: AtomicU64,
    bounced: AtomicU64,
    /// `failed` from bounces: Postfix gave up after deferrals (the feed's `@defer.test`
    /// users: a soft bounce).
    expired: AtomicU64,
    /// `failed` from notifications: refused by SMTP (5xx) or out of attempts.
    refused: AtomicU64,
    flags: AtomicU64,
    hooks: Arc<AtomicU64>,
    pushes: Arc<AtomicU64>,
    imports_completed: AtomicU64,
    imports_stuck: AtomicU64,
    campaign_mails: AtomicU64,
}

async fn watch(client: Client, c: Arc<Counts>) -> anyhow::Result<()> {
    let mut consumer = client.consumer(ConsumerConfig::default());
    for t in [
        topics::PRICES,
        topics::DEAL_TRANSITIONS,
        topics::NOTIFICATION_REQUESTS,
        topics::MAIL_STATUS,
        topics::ADDRESS_STATUS,
        topics::IMPORT_STATUS,
        topics::OUTGOING_MAIL,
    ] {
        consumer.subscribe_topic(t, StartAt::Latest).await?;
    }
    while let Some(r) = consumer.next().await {
        let r = r?;
        match &*r.topic {
            topics::PRICES => &c.prices,
            topics::NOTIFICATION_REQUESTS => &c.requests,
            topics::ADDRESS_STATUS if r.partition == 0 => &c.flags,
            topics::OUTGOING_MAIL => match r
                .value
                .as_deref()
                .map(serde_json::from_slice::<OutgoingMail>)
            {
                Some(Ok(m)) if m.kind == NotificationKind::Campaign => &c.campaign_mails,
                _ => continue,
            },
            topics::IMPORT_STATUS => {
                let Ok(e) = spool_processor::envelope::decode::<JobEvent>(
                    &r.headers,
                    r.key.as_ref(),
                    r.value.as_ref(),
                ) else {
                    continue;
                };
                // A stuck run is reported again every quiet slot: show and count its first.
                if e.ty == imports::STUCK && !e.id.ends_with("/stuck/1") {
                    continue;
                }
                if let Some(line) = imports::describe(&e.ty, &e.data) {
                    eprintln!("{line}");
                }
                match e.ty.as_str() {
                    imports::COMPLETED => &c.imports_completed,
                    _ => &c.imports_stuck,
                }
            }
            topics::DEAL_TRANSITIONS => match r
                .value
                .as_deref()
                .map(serde_json::from_slice::<DealTransition>)
            {
                Some(Ok(t)) if t.kind == TransitionKind::Entered => &c.entered,
                _ => &c.left,
            },
            topics::MAIL_STATUS => {
                match r.value.as_deref().map(serde_json::from_slice::<MailStatus>) {
                    Some(Ok(s)) => match s.status {
                        MailState::Queued => &c.queued,
                        MailState::Sent => &c.sent,
                        MailState::Bounced => &c.bounced,
                        // Only bounces knows Postfix's queue id of a failed mail: it expired
                        // in Postfix's queue. Notifications' failures never reached it.
                        MailState::Failed if s.queue_id.is_some() => &c.expired,
                        MailState::Failed => &c.refused,
                        MailState::Deferred => &c.deferred,
                    },
                    _ => continue,
                }
            }
            _ => continue,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// What the mail counters will show for the feed's undeliverable users (by design, not
/// errors): which addresses bounce and are flagged, and which are deferred and then expire.
fn undeliverable_legend(users: &[spool_pipeline::events::AlertSettings]) -> String {
    use spool_pipeline::feed::{AddressKind, address_kind};
    let mut n = [0usize; 3];
    for u in users.iter().filter_map(|u| u.email.as_deref()) {
        match address_kind(u) {
            AddressKind::UnknownUser => n[0] += 1,
            AddressKind::HardBounce => n[1] += 1,
            AddressKind::Defer => n[2] += 1,
            AddressKind::Deliverable => {}
        }
    }
    format!(
        "undeliverable on purpose: {} ghost-*@localhost and {} *@hardbounce.test users bounce \
         (5.1.1: bounced, then flagged and not mailed again); {} *@defer.test users are deferred \
         and expire in the local Postfix at once (failed/expired: a soft bounce, never flagged, \
         so each of their alerts counts again); failed/refused: notifications gave up on a mail \
         (SMTP 5xx, or its attempts used up)",
        n[0], n[1], n[2]
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.dir)?;
    let dir = std::path::absolute(&a.dir)?;
    let port = free_port()?;
    let broker = format!("127.0.0.1:{port}");
    let spoold = spawn(
        "spoold",
        &dir,
        &[
            "--data-dir",
            &dir.join("broker").to_string_lossy(),
            "--listen",
            &broker,
            "--metrics-listen",
            "off",
        ],
    )?;
    let client = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(broker.as_str()).await {
                Ok(c) if c.list_topics().await.is_ok() => break c,
                _ if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                _ => anyhow::bail!(
                    "spoold did not come up on {broker}; see {}/spoold.log",
                    dir.display()
                ),
            }
        }
    };
    publish::ensure_topics(&client, Some(a.partitions)).await?;
    let counts = Arc::new(Counts::default());
    let endpoints = Endpoints {
        webhook: receiver(counts.hooks.clone()).await?,
        push: receiver(counts.pushes.clone()).await?,
    };
    let mut feed = Feed::new(FeedConfig {
        seed: a.seed,
        products: a.products,
        users: a.users,
        ..FeedConfig::default()
    });
    let users = feed.users(&endpoints);

    let postfix = if a.no_postfix || !installed() {
        eprintln!(
            "Postfix is not installed (or --no-postfix): e-mail will wait in outgoing-mail, retrying"
        );
        None
    } else {
        let pf = Instance::start(&dir.join("postfix"), free_port()?, "spooldemo")
            .context("starting the local Postfix")?;
        let boxes = spool_pipeline::feed::mailboxes(&users);
        pf.set_mailboxes(boxes.iter().map(|(e, n)| (e.as_str(), n.as_str())))?;
        Some(pf)
    };
    let smtp_port = postfix.as_ref().map_or(25, |p| p.port());
    let log_path = postfix
        .as_ref()
        .map(|p| p.log_path().display().to_string())
        .unwrap_or_default();
    let p = a.partitions;
    let campaigns = if a.campaign_rate > 0 {
        format!(
            "inputs = [\"notification-requests\", \"outgoing-mail\", \"campaign-requests\"]\noutputs = [\"outgoing-mail\", \"mail-status\", \"campaign-requests\"]\n[[lanes]]\nname = \"alerts\"\ntopics = [\"notification-requests\", \"outgoing-mail\"]\n[[lanes]]\nname = \"campaigns\"\ntopics = [\"campaign-requests\"]\npriority = 1\nrate_per_sec = {}\nmin_share = 0.05\n",
            a.campaign_rate
        )
    } else {
        "inputs = [\"notification-requests\", \"outgoing-mail\"]\noutputs = [\"outgoing-mail\", \"mail-status\"]\n".to_owned()
    };
    let procs = vec![
        processor("spool-deals", &dir, &broker, format!("inputs = [\"prices\"]\noutputs = [\"deal-transitions\", \"deal-broadcast\"]\n[app]\nbroadcast_partitions = {p}\n"))?,
        processor("spool-matching", &dir, &broker, "inputs = [\"deal-broadcast\", \"user-settings\", \"address-status\"]\noutputs = [\"notification-requests\", \"timeline\"]\ntables = [\"user-settings\", \"address-status\"]\n".into())?,
        processor("spool-notifications", &dir, &broker, format!("{campaigns}[retry]\nmax_attempts = 0\n[app.smtp]\nport = {smtp_port}\nfrom = \"deals@localhost\"\n"))?,
        processor("spool-bounces", &dir, &broker, format!("inputs = [\"postfix-log\"]\noutputs = [\"mail-status\", \"delivery-issues\", \"address-status\"]\n[app]\nlog_path = \"{log_path}\"\naddress_partitions = {p}\n"))?,
        processor("spool-imports", &dir, &broker, format!("inputs = [\"feed-imports\"]\noutputs = [\"import-status\"]\n[app]\nstuck_after_ms = {}\n", a.stuck_after_secs.max(1) * 1000))?,
    ];
    tokio::spawn(watch(client.clone(), counts.clone()));
    let producer = publish::producer(&client);
    publish::publish_users(&producer, &users).await?;
    let campaign = if a.campaign_rate > 0 {
        let info = CampaignInfo {
            id: "spring-sale".into(),
            title: "Spring sale: up to 40% off".into(),
            body: "Our merchants' spring prices are in. See what dropped in your categories."
                .into(),
        };
        let now = jiff::Timestamp::now().as_millisecond();
        let flagged = publish::flagged_addresses(&client).await?;
        let requests = spool_pipeline::campaign::requests(&info, &users, &flagged, now);
        publish::publish_campaign(&producer, &requests).await?;
        eprintln!(
            "campaign {:?}: {} e-mails at {}/s (users in their quiet hours get theirs when they end); \
             pause: spool --broker {broker} processor pause notifications --lane campaigns (resume the same way)",
            info.id,
            requests.len(),
            a.campaign_rate
        );
        requests.len()
    } else {
        0
    };
    eprintln!(
        "spool-demo: broker {broker}, {} users, {} products; data, configs and logs in {}; Ctrl-C stops",
        users.len(),
        a.products,
        dir.display()
    );
    if postfix.is_some() {
        eprintln!("{}", undeliverable_legend(&users));
    }
    let rate = a.rate;
    let stall = a.stall.clone();
    let feeder = tokio::spawn(async move {
        loop {
            let round = feed.next_round();
            if let Err(e) = publish::publish_round_stalling(&producer, &round, rate, &stall).await {
                return e;
            }
        }
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut prev = 0;
    let load = |x: &AtomicU64| x.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        if feeder.is_finished() {
            eprintln!("the feed stopped");
            break;
        }
        let c = &counts;
        let prices = load(&c.prices);
        println!(
            "prices {:>6}/s | imports done {} stuck {} | deals +{} -{} | notifications {} | campaign {}/{} | mail queued {} sent {} deferred {} bounced {} failed {} (expired {} refused {}) | flagged {} | webhooks {} pushes {}",
            prices - prev,
            load(&c.imports_completed),
            load(&c.imports_stuck),
            load(&c.entered),
            load(&c.left),
            load(&c.requests),
            load(&c.campaign_mails),
            campaign,
            load(&c.queued),
            load(&c.sent),
            load(&c.deferred),
            load(&c.bounced),
            load(&c.expired) + load(&c.refused),
            load(&c.expired),
            load(&c.refused),
            load(&c.flags),
            load(&c.hooks),
            load(&c.pushes),
        );
        prev = prices;
    }
    eprintln!("stopping: processors, then Postfix and the broker");
    feeder.abort();
    drop(procs);
    drop(postfix);
    drop(spoold);
    Ok(())
}
