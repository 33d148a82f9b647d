//! `spoold`: parses flags, sets up logging, raises the open-files limit, opens the log, tells
//! systemd it is ready, serves.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use spool_broker::affinity::Placement;
use spool_broker::rlimit::OpenFilesLimit;
use spool_broker::{Broker, Config};

/// Spool's broker: the log engine served over gRPC (spool.v1).
///
/// Configuration comes from defaults < --config FILE (TOML) < SPOOL_* environment < flags.
/// Example: spoold --data-dir /var/lib/spool --listen 127.0.0.1:7170
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (unknown keys are rejected).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding the log [default: ./spool-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7170].
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// Prometheus metrics listen address [default: 127.0.0.1:7171]; "off" disables.
    #[arg(long, value_name = "HOST:PORT|off")]
    metrics_listen: Option<String>,
    /// Allow listening beyond loopback without TLS and auth tokens (and serving the
    /// unauthenticated metrics endpoint beyond loopback). With [tls] and [[auth.tokens]]
    /// configured, any address is allowed without it.
    #[arg(long)]
    allow_non_loopback: bool,
    /// Tokio worker threads (0: one per core).
    #[arg(long, value_name = "N")]
    runtime_threads: Option<usize>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Read a token from stdin, print the SHA-256 to put in [[auth.tokens]] sha256, and exit.
    /// Generate tokens with e.g. `head -c 32 /dev/urandom | base64`.
    #[arg(long)]
    hash_token: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Write a development CA, a server certificate it signed (for --name) and a client
    /// certificate, as PEM files for [tls] and the CLI's --tls-* flags; print how to use them.
    ///
    /// For development and tests only: the CA's key lies beside the certificates.
    #[command(name = "gen-dev-certs")]
    GenDevCerts {
        /// Directory to write ca.crt, ca.key, server.crt, server.key, client.crt, client.key.
        #[arg(long, value_name = "DIR", default_value = "spool-dev-certs")]
        dir: PathBuf,
        /// A DNS name or IP address the server certificate is valid for (repeatable)
        /// [default: localhost, 127.0.0.1, ::1].
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::GenDevCerts { dir, names, force }) = &args.command {
        let names = if names.is_empty() {
            ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec()
        } else {
            names.clone()
        };
        spool_broker::devcerts::generate(dir, &names, *force)?;
        print!("{}", spool_broker::devcerts::usage(dir, &names));
        return Ok(());
    }
    if args.hash_token {
        let mut token = String::new();
        std::io::stdin()
            .read_line(&mut token)
            .context("reading the token from stdin")?;
        let token = token.trim();
        anyhow::ensure!(
            token.len() >= 16,
            "a token should be at least 16 characters of random data"
        );
        println!("{}", spool_broker::hash_token(token));
        return Ok(());
    }
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    match args.metrics_listen.as_deref() {
        None => {}
        Some("off") => config.metrics_listen = None,
        Some(a) => config.metrics_listen = Some(a.parse().context("--metrics-listen")?),
    }
    if args.allow_non_loopback {
        config.allow_non_loopback = true;
    }
    if let Some(n) = args.runtime_threads {
        config.runtime_threads = n;
    }
    config.validate()?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    init_logging();
    for warning in Config::unknown_env_warnings(std::env::vars()) {
        tracing::warn!("{warning}");
    }
    // Before the log opens: its descriptor check reads the limit in force.
    match spool_broker::rlimit::raise_open_files_limit() {
        Ok(OpenFilesLimit::Raised { from, to }) => tracing::info!(
            from,
            to,
            "raised the soft open-files limit (RLIMIT_NOFILE) to the hard limit"
        ),
        Ok(OpenFilesLimit::Unchanged { soft, hard }) => {
            tracing::info!(?soft, ?hard, "open-files limit (RLIMIT_NOFILE)");
        }
        Err(e) => tracing::warn!(
            error = %e,
            "raising the soft open-files limit (RLIMIT_NOFILE) to the hard limit failed; keeping it"
        ),
    }

    // Read on the main thread before any pinning: the start mask is the main thread's.
    let placement = Placement::new(&config.runtime_cpus, &config.blocking_cpus)?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("spoold-worker");
    if config.runtime_threads > 0 {
        rt.worker_threads(config.runtime_threads);
    }
    if let Some(p) = &placement {
        let on = p.workers.len();
        if config.runtime_threads == 0 && !config.runtime_cpus.is_empty() {
            // One worker per CPU the workers are pinned to (after narrowing to the start
            // mask), not per CPU of the machine: more workers than CPUs in the set would only
            // take turns on them. At most tokio's own default, which also counts a cgroup
            // CPU quota (4 CPUs' worth of quota on a 64-CPU cpuset: 4 workers, not 64).
            let quota = std::thread::available_parallelism().map_or(on, |n| n.get());
            rt.worker_threads(on.min(quota).max(1));
        } else if config.runtime_threads > on {
            tracing::warn!(
                runtime_threads = config.runtime_threads,
                runtime_cpus = %p.workers,
                "more runtime workers than CPUs they are pinned to: they take turns on them"
            );
        }
        for (key, dropped) in &p.narrowed {
            tracing::warn!(
                key,
                dropped = %dropped,
                start_mask = %p.start,
                "CPUs outside the mask spoold was started with are left out (pinning only \
                 narrows the taskset / CPUAffinity= mask)"
            );
        }
        p.install(&mut rt);
        tracing::info!(
            runtime_cpus = %p.workers,
            blocking_cpus = %p.blocking,
            configured_runtime_cpus = %config.runtime_cpus,
            configured_blocking_cpus = %config.blocking_cpus,
            "pinning threads (effective sets; an empty configured set keeps the start mask)"
        );
    }
    let rt = rt.build().context("starting the tokio runtime")?;
    rt.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let metrics_listen = config.metrics_listen;
    let data_dir = config.data_dir.clone();
    notify(&[sd_notify::NotifyState::Status("recovering the log")]);
    // In spawn_blocking not only because opening blocks: the log's write-back, retention
    // (spool-log-maint) and compaction (spool-log-cleaner) threads start inside Broker::open
    // and inherit this thread's CPU mask, so with blocking_cpus set they run on the blocking
    // set (see spool_broker::affinity). Opened on a worker, they would take the workers' set.
    let broker = tokio::task::spawn_blocking(move || Broker::open(config))
        .await?
        .with_context(|| format!("opening {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let metrics_listener = match metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener {addr}"))?,
        ),
        None => None,
    };
    // Handlers are installed before "ready" is announced: a SIGTERM or Ctrl-C that comes
    // right after it (a script or test stopping a fresh broker) shuts down cleanly instead of
    // killing the process before `serve` first polls the shutdown future.
    let shutdown = shutdown_signal()?;
    let (topics, partitions) = broker.summary();
    let local = listener.local_addr()?;
    if let Some(m) = &metrics_listener {
        eprintln!("spoold metrics on http://{}/metrics", m.local_addr()?);
    }
    tracing::info!(listen = %local, data_dir = %data_dir.display(), topics, partitions, "spoold ready");
    // Tests and scripts that pass port 0 read the bound address from this line.
    eprintln!("spoold listening on {local}");
    let status = format!("serving {partitions} partitions of {topics} topics on {local}");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    let watchdog = spawn_watchdog();
    broker.serve(listener, metrics_listener, shutdown).await?;
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("spoold stopped");
    Ok(())
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Pings systemd's watchdog at half its timeout, if the unit asked for one.
fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let timeout = sd_notify::watchdog_enabled()?;
    let every = (timeout / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        loop {
            notify(&[sd_notify::NotifyState::Watchdog]);
            tokio::time::sleep(every).await;
        }
    }))
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on the first signal.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("shutting down"),
        ]);
    })
}

/// Logs go to stderr, without timestamps under systemd (journald adds its own), in colour
/// only on a terminal and without `NO_COLOR` (<https://no-color.org>).
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let colour = spool_broker::log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    if under_journald {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
}
