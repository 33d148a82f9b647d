//! The scaffolding of a processor binary: flags, configuration, logging, the tokio runtime,
//! metrics, systemd readiness and watchdog, and a clean stop on SIGTERM. A processor's
//! `main` is one call:
//!
//! ```no_run
//! # use spool_processor::{Context, Failure, Handler, Input};
//! # struct Deals;
//! # impl Handler for Deals {
//! #     fn handle(&mut self, _: &mut Context<'_>, _: &Input) -> Result<(), Failure> { Ok(()) }
//! # }
//! fn main() -> anyhow::Result<()> {
//!     spool_processor::app::main("deals", |_config| Ok(Deals))
//! }
//! ```
//!
//! Under systemd (`Type=notify`): `READY=1` once the processor is in its group with the
//! state of every owned partition restored; `STATUS=` says what it waits for; watchdog pings
//! at half `WatchdogSec` while the processing loop goes round; on SIGTERM `STOPPING=1`, then
//! the open transaction is committed (or aborted), local stores are fsynced and the group
//! is left, within the unit's `TimeoutStopSec`. A processor superseded by a newer instance
//! with the same instance id ([`crate::runtime::RuntimeError::Superseded`]) exits with
//! [`SUPERSEDED_EXIT_CODE`], which the unit's `RestartPreventExitStatus=` keeps from being
//! restarted (a restart would fence the newer instance, and so on); one whose topics do not
//! fit its configuration ([`crate::runtime::RuntimeError::Misconfigured`]) exits with
//! [`MISCONFIGURED_EXIT_CODE`], not restarted either (every start would stop the same way).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use crate::config::ProcessorConfig;
use crate::handler::AsyncHandler;
use crate::metrics::Metrics;
use crate::runtime::{self, RuntimeConfig, RuntimeError};

/// A Spool stream processor.
///
/// Configuration: defaults < --config FILE (TOML) < SPOOL_* environment < flags.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// TOML configuration file (unknown keys are rejected, except under [app]).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Broker address [default: 127.0.0.1:7170].
    #[arg(long, value_name = "HOST:PORT")]
    pub broker: Option<String>,
    /// Processor name (consumer group) [default: the binary's].
    #[arg(long)]
    pub name: Option<String>,
    /// Stable id of this instance [default: the host name].
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
    /// Local state directory [default: $STATE_DIRECTORY, else ./spool-processor-state/NAME].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Metrics and health listen address, or "off".
    #[arg(long, value_name = "HOST:PORT|off")]
    pub metrics_listen: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Replay mode: read the inputs from this time (RFC 3339, or ms since the epoch) on a
    /// scratch consumer group, write every output under --replay-prefix, disable external
    /// effects. Production topics and groups are not touched.
    #[arg(long, value_name = "TIME")]
    pub replay_from: Option<String>,
    /// Prefix of the topics a replay writes [default: replay.].
    #[arg(long, value_name = "PREFIX", default_value = "replay.")]
    pub replay_prefix: String,
    /// Scratch group of a replay [default: NAME.replay-<time>].
    #[arg(long, value_name = "GROUP")]
    pub replay_group: Option<String>,
}

/// Parses a replay start: RFC 3339 or ms since the epoch.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    crate::envelope::parse_time(s).with_context(|| {
        format!("{s:?} is neither RFC 3339 (2024-05-01T12:00:00Z) nor ms since the epoch")
    })
}

/// Builds the effective configuration from flags, file and environment.
pub fn load_config(default_name: &str, args: &Args) -> anyhow::Result<ProcessorConfig> {
    let mut cfg = ProcessorConfig::load(args.config.as_deref(), std::env::vars())?;
    if let Some(b) = &args.broker {
        cfg.broker = b.clone();
    }
    if let Some(n) = &args.name {
        cfg.name = n.clone();
    }
    if cfg.name.is_empty() {
        cfg.name = default_name.to_owned();
    }
    if let Some(i) = &args.instance_id {
        cfg.instance_id = i.clone();
    }
    if let Some(d) = &args.state_dir {
        cfg.state_dir = d.clone();
    }
    match args.metrics_listen.as_deref() {
        None => {}
        Some("off") => cfg.metrics_listen = None,
        Some(a) => cfg.metrics_listen = Some(a.parse().context("--metrics-listen")?),
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The runtime settings for `cfg` and the replay flags.
pub fn runtime_config(cfg: &ProcessorConfig, args: &Args) -> anyhow::Result<RuntimeConfig> {
    let mut r = cfg.runtime_config();
    if let Some(t) = &args.replay_from {
        let ts = parse_time(t)?;
        r.group = args
            .replay_group
            .clone()
            .unwrap_or_else(|| format!("{}.replay-{ts}", cfg.name));
        r.output_prefix = args.replay_prefix.clone();
        r.effects_enabled = false;
        r.start_at_ms = Some(ts);
        r.state_dir = r.state_dir.join("replay").join(&r.group);
    }
    Ok(r)
}

/// Runs a processor binary: see the [module docs](self). `build` makes the handler from the
/// configuration (its `[app]` section, typically).
pub fn main<H, F>(default_name: &str, build: F) -> anyhow::Result<()>
where
    H: AsyncHandler,
    F: FnOnce(&ProcessorConfig) -> anyhow::Result<H>,
{
    let args = Args::parse();
    let cfg = load_config(default_name, &args)?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let rcfg = runtime_config(&cfg, &args)?;
    init_logging();
    let handler = build(&cfg)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("spool-processor");
    if cfg.runtime_threads > 0 {
        rt.worker_threads(cfg.runtime_threads);
    }
    let rt = rt.build().context("starting the tokio runtime")?;
    let result = rt.block_on(serve(cfg, rcfg, handler));
    if let Err(e) = &result
        && let Some(code) = e.downcast_ref::<RuntimeError>().and_then(exit_code)
    {
        eprintln!("Error: {e:#}");
        drop(rt);
        std::process::exit(code);
    }
    result
}

/// The exit status of a processor superseded by a newer instance with the same instance id
/// (not restarted by the systemd unit).
pub const SUPERSEDED_EXIT_CODE: i32 = 3;

/// The exit status of a processor whose topics do not fit its configuration
/// ([`RuntimeError::Misconfigured`]): LSB's "program is not configured". The systemd unit
/// does not restart it: every start would stop the same way until an operator acts.
pub const MISCONFIGURED_EXIT_CODE: i32 = 6;

/// The dedicated exit status of a runtime error, if it has one (any other error exits 1,
/// which the systemd unit restarts).
fn exit_code(e: &RuntimeError) -> Option<i32> {
    match e {
        RuntimeError::Superseded { .. } => Some(SUPERSEDED_EXIT_CODE),
        RuntimeError::Misconfigured(_) => Some(MISCONFIGURED_EXIT_CODE),
        _ => None,
    }
}

/// Connects, serves metrics, runs the processor until SIGTERM/SIGINT.
pub async fn serve<H: AsyncHandler>(
    cfg: ProcessorConfig,
    rcfg: RuntimeConfig,
    handler: H,
) -> anyhow::Result<()> {
    notify(&[sd_notify::NotifyState::Status("connecting to the broker")]);
    let client = cfg.connect().await?;
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        eprintln!(
            "{} metrics on http://{}/metrics",
            rcfg.name,
            l.local_addr()?
        );
        tokio::spawn(crate::metrics::serve(metrics.clone(), l, stop_rx.clone()));
    }
    let readiness = tokio::spawn(announce_ready(metrics.clone(), rcfg.clone()));
    let shutdown = runtime::shutdown_on(async move {
        shutdown_signal().await;
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping: committing and leaving the group"),
        ]);
    });
    tracing::info!(processor = rcfg.name, group = rcfg.group, instance = rcfg.instance_id, state_dir = %rcfg.state_dir.display(), replay = rcfg.start_at_ms.is_some(), "starting");
    let result = runtime::run(client, rcfg, handler, metrics, shutdown).await;
    readiness.abort();
    let _ = stop_tx.send(true);
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// READY=1 once restored (then watchdog pings while the loop is alive), STATUS updates.
async fn announce_ready(metrics: Arc<Metrics>, rcfg: RuntimeConfig) {
    notify(&[sd_notify::NotifyState::Status(
        "joining the group and restoring state",
    )]);
    while !metrics.is_ready() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = format!("processing {:?} as group {}", rcfg.inputs, rcfg.group);
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    // Tests and scripts wait for this line.
    eprintln!("{} ready", rcfg.name);
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(100));
    loop {
        // Only a loop that went round recently proves the processor alive.
        if metrics.since_alive() < timeout {
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
        tokio::time::sleep(every).await;
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Logs to stderr (`SPOOL_LOG` filter, default info), without timestamps under journald.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if under_journald {
        let _ = fmt.without_time().with_ansi(false).try_init();
    } else {
        let _ = fmt.try_init();
    }
}
