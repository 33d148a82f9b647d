//! The standard scenarios (issue 3): each runs on a fresh `spoold` over a fresh data dir on the
//! work filesystem, several times, for each combination of broker and load-generator runtime
//! threads asked for; the medians go to a dated Markdown file under `loadgen/results/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use spool_client::{Acks as ClientAcks, Client, TopicSettings};
use spool_record::{BatchBuilder, Compression as EngineCompression};

use crate::broker::{Spoold, find_spoold};
use crate::{Acks, LoadConfig, Mode, Report};

/// `spool-loadgen scenarios` options.
#[derive(Args, Debug, Clone)]
pub struct ScenarioArgs {
    /// The spoold binary (default: $SPOOLD or next to this executable).
    #[arg(long)]
    pub spoold: Option<PathBuf>,
    /// Runs per scenario and thread combination.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Warm-up seconds per run.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Parent of the brokers' temp data dirs (must be on the disk being measured).
    #[arg(long, default_value = "target/loadgen-tmp")]
    pub data_parent: PathBuf,
    /// Directory of the results file.
    #[arg(long, default_value = "loadgen/results")]
    pub out_dir: PathBuf,
    /// Broker runtime threads to try (0: the broker's default, one per core).
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    pub broker_threads: Vec<usize>,
    /// Load-generator runtime threads to try (0: one per core).
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    pub loadgen_threads: Vec<usize>,
    /// Only scenarios whose name contains one of these.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Bytes of memory touched and freed right before each measured run.
    #[arg(long, default_value_t = 3 << 30)]
    pub prefault_bytes: u64,
    /// Bytes a consume run reads (preloaded first).
    #[arg(long, default_value_t = 2 << 30)]
    pub consume_bytes: u64,
    /// Skip the `dd` reference (3 GiB written per rep) at the start.
    #[arg(long)]
    pub no_dd_reference: bool,
}

/// What a scenario's figure is.
#[derive(Clone, Copy, Debug)]
enum Metric {
    MbPerS,
    RecordsPerS,
    P99Us,
    StartSecs,
}

impl Metric {
    fn unit(self) -> &'static str {
        match self {
            Metric::MbPerS => "MB/s",
            Metric::RecordsPerS => "records/s",
            Metric::P99Us => "µs p99",
            Metric::StartSecs => "s",
        }
    }

    fn of(self, r: &Report) -> f64 {
        match self {
            Metric::MbPerS => r.mb_per_s,
            Metric::RecordsPerS => r.records_per_s,
            Metric::P99Us => r.latency.map_or(f64::NAN, |l| l.p99_us),
            Metric::StartSecs => f64::NAN,
        }
    }

    /// Higher is better, except for latency and time.
    fn passes(self, value: f64, target: f64) -> bool {
        match self {
            Metric::MbPerS | Metric::RecordsPerS => value >= target,
            Metric::P99Us | Metric::StartSecs => value <= target,
        }
    }
}

struct Scenario {
    name: &'static str,
    metric: Metric,
    target: f64,
    cfg: LoadConfig,
}

fn scenarios(a: &ScenarioArgs) -> Vec<Scenario> {
    let base = LoadConfig {
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup),
        prefault_bytes: a.prefault_bytes,
        ..LoadConfig::default()
    };
    let kib = LoadConfig {
        record_size: 1024,
        batch_bytes: 1 << 20,
        ..base.clone()
    };
    vec![
        Scenario {
            name: "produce-1KiB-acks-written",
            metric: Metric::MbPerS,
            target: 900.0,
            cfg: LoadConfig {
                acks: Acks::Written,
                ..kib.clone()
            },
        },
        Scenario {
            name: "produce-1KiB-acks-durable",
            metric: Metric::MbPerS,
            target: 600.0,
            cfg: LoadConfig {
                acks: Acks::Durable,
                ..kib.clone()
            },
        },
        Scenario {
            name: "consume-1KiB-subscribe",
            metric: Metric::MbPerS,
            target: 1500.0,
            cfg: LoadConfig {
                mode: Mode::Consume,
                preload_bytes: a.consume_bytes,
                duration: Duration::from_secs(30),
                ..kib.clone()
            },
        },
        Scenario {
            name: "produce-100B-acks-written",
            metric: Metric::RecordsPerS,
            target: 2_000_000.0,
            cfg: LoadConfig {
                record_size: 100,
                acks: Acks::Written,
                ..kib.clone()
            },
        },
        Scenario {
            name: "produce-2x2-acks-written",
            metric: Metric::MbPerS,
            target: 1100.0,
            cfg: LoadConfig {
                producers: 2,
                partitions: 2,
                acks: Acks::Written,
                ..kib.clone()
            },
        },
        Scenario {
            name: "e2e-1KiB-50MBps",
            metric: Metric::P99Us,
            target: 3000.0,
            cfg: LoadConfig {
                mode: Mode::E2e,
                rate: Some(50e6 / 1024.0),
                acks: Acks::Written,
                pacing: crate::Pacing::Linger,
                linger: Duration::ZERO,
                in_flight: 1,
                prefault_bytes: 0,
                ..kib.clone()
            },
        },
        Scenario {
            name: "startup-1000-partitions",
            metric: Metric::StartSecs,
            target: 3.0,
            cfg: base,
        },
    ]
}

struct Row {
    scenario: String,
    broker_threads: usize,
    loadgen_threads: usize,
    unit: &'static str,
    target: f64,
    pass_if_higher: bool,
    values: Vec<f64>,
    notes: Vec<String>,
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    (
        s.iter().copied().fold(f64::INFINITY, f64::min),
        s.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// What [`run_scenarios`] produced.
#[derive(Debug, Clone)]
pub struct ScenarioResults {
    /// The results file (Markdown: machine, table, every rep, raw JSON).
    pub path: PathBuf,
    /// The summary table of that file: one row per scenario and thread combination, with
    /// median, spread, target and verdict.
    pub table: String,
}

/// Runs every scenario; returns the path of the results file.
pub fn run_all(a: &ScenarioArgs) -> Result<PathBuf> {
    run_scenarios(a).map(|r| r.path)
}

/// Runs every scenario (those of `a.only`, if set); writes the results file and returns it
/// with its summary table.
pub fn run_scenarios(a: &ScenarioArgs) -> Result<ScenarioResults> {
    let bin = match &a.spoold {
        Some(p) => p.clone(),
        None => find_spoold()?,
    };
    std::fs::create_dir_all(&a.data_parent)?;
    std::fs::create_dir_all(&a.out_dir)?;
    let stamp = utc_stamp();
    let mut raw = String::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut refs = String::new();
    if a.no_dd_reference {
        let _ = writeln!(refs, "- dd: skipped (--no-dd-reference)");
    } else {
        eprintln!("reference: dd");
        for i in 0..a.reps.max(1) {
            let dd = dd_reference(&a.data_parent)?;
            let _ = writeln!(refs, "- dd run {}: {dd}", i + 1);
        }
    }
    for s in scenarios(a) {
        if !a.only.is_empty() && !a.only.iter().any(|o| s.name.contains(o.as_str())) {
            continue;
        }
        let lg_threads: &[usize] = if matches!(s.metric, Metric::StartSecs) {
            &[1]
        } else {
            &a.loadgen_threads
        };
        for &bt in &a.broker_threads {
            for &lt in lg_threads {
                let mut row = Row {
                    scenario: s.name.to_owned(),
                    broker_threads: bt,
                    loadgen_threads: lt,
                    unit: s.metric.unit(),
                    target: s.target,
                    pass_if_higher: s.metric.passes(2.0, 1.0),
                    values: Vec::new(),
                    notes: Vec::new(),
                };
                for rep in 0..a.reps.max(1) {
                    let dir = tempfile::Builder::new()
                        .prefix("spoold-")
                        .tempdir_in(&a.data_parent)?;
                    // Another process busy on the 2 vCPUs skews a run: keep the evidence.
                    let busy = busy_others();
                    if !busy.is_empty() {
                        row.notes
                            .push(format!("other busy processes before rep {rep}: {busy}"));
                    }
                    let res = if matches!(s.metric, Metric::StartSecs) {
                        startup(&bin, dir.path(), bt).map(|(secs, note)| {
                            row.notes.push(note);
                            secs
                        })
                    } else {
                        one_run(&bin, dir.path(), bt, lt, &s.cfg).map(|r| {
                            let _ = writeln!(
                                raw,
                                "{} {}",
                                s.name,
                                serde_json::to_string(&r).unwrap_or_default()
                            );
                            row.notes.push(r.line());
                            s.metric.of(&r)
                        })
                    };
                    match res {
                        Ok(v) => {
                            eprintln!(
                                "{} broker_threads={bt} loadgen_threads={lt} rep {rep}: {v:.1} {}",
                                s.name,
                                s.metric.unit()
                            );
                            row.values.push(v);
                        }
                        Err(e) => {
                            eprintln!("{} rep {rep} failed: {e:#}", s.name);
                            row.notes.push(format!("failed: {e:#}"));
                        }
                    }
                }
                rows.push(row);
            }
        }
    }
    let path = a.out_dir.join(format!("{stamp}.md"));
    let table = table(&rows);
    std::fs::write(&path, render(a, &stamp, &table, &rows, &refs, &raw))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(ScenarioResults { path, table })
}

fn one_run(bin: &Path, dir: &Path, bt: usize, lt: usize, cfg: &LoadConfig) -> Result<Report> {
    let mut broker = Spoold::start(bin, &dir.join("data"), "127.0.0.1:0", bt)?;
    let cfg = LoadConfig {
        broker: broker.addr.clone(),
        threads: lt,
        watch_pids: broker.pid().into_iter().collect(),
        ..cfg.clone()
    };
    let r = crate::run(&cfg);
    let _ = broker.stop(Duration::from_secs(20));
    r
}

/// Creates a topic of 1000 partitions holding data, stops the broker, and times a fresh start
/// up to the first acknowledged Produce.
fn startup(bin: &Path, dir: &Path, bt: usize) -> Result<(f64, String)> {
    let data = dir.join("data");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut b = BatchBuilder::new(EngineCompression::None);
    let value = vec![b'x'; 1024];
    for _ in 0..64 {
        b.push(0, None, Some(&value), &[]);
    }
    let batch = b.finish().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut broker = Spoold::start(bin, &data, "127.0.0.1:0", bt)?;
    let addr = broker.addr.clone();
    rt.block_on(async {
        let client = Client::connect(addr).await?;
        client
            .create_topic("startup", 1000, &TopicSettings::default())
            .await?;
        // 4 batches of 64 KiB per partition, 100 partitions at a time.
        for _round in 0..4 {
            let mut futs = Vec::new();
            for p in 0..1000u32 {
                let c = client.clone();
                let batch = batch.clone();
                futs.push(async move {
                    c.produce_batch("startup", p, batch, ClientAcks::Written)
                        .await
                });
                if futs.len() == 100 {
                    for r in futures_util::future::join_all(std::mem::take(&mut futs)).await {
                        r?;
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    broker.stop(Duration::from_secs(30))?;
    let t0 = Instant::now();
    let mut broker = Spoold::start(bin, &data, "127.0.0.1:0", bt)?;
    let listening = broker.ready_after;
    let addr = broker.addr.clone();
    let batch2 = batch.clone();
    rt.block_on(async move {
        loop {
            if let Ok(c) = Client::connect(addr.clone()).await
                && c.produce_batch("startup", 999, batch2.clone(), ClientAcks::Written)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let _ = broker.stop(Duration::from_secs(30));
    Ok((
        secs,
        format!(
            "spawn→first produce {secs:.3} s (listening line after {:.3} s), 1000 partitions × 256 KiB",
            listening.as_secs_f64()
        ),
    ))
}

/// `dd` of 2 GiB with one final fdatasync, and 1 GiB with O_DSYNC per 1 MiB write, in `dir`.
fn dd_reference(dir: &Path) -> Result<String> {
    let f = dir.join("dd-test");
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", f.display()))
            .args(args)
            .env("LC_ALL", "C")
            .output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        Ok(text.lines().last().unwrap_or("").to_owned())
    };
    crate::prefault(3 << 30);
    let buffered = run(&["bs=1M", "count=2048", "conv=fdatasync"])?;
    let _ = std::fs::remove_file(&f);
    crate::prefault(3 << 30);
    let dsync = run(&["bs=1M", "count=1024", "oflag=dsync"])?;
    let _ = std::fs::remove_file(&f);
    Ok(format!(
        "2 GiB + fdatasync: `{buffered}`; 1 GiB, O_DSYNC per 1 MiB: `{dsync}`"
    ))
}

fn utc_stamp() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H%MZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    out.unwrap_or_else(|| "undated".into())
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Other processes using more than 10 % CPU right now (sampled over 200 ms), as
/// `name (pid) cpu%` items; empty when the machine is quiet.
fn busy_others() -> String {
    shell(
        "top -b -n 2 -d 0.2 -w 200 | awk '/^top -/{n++} n==2 && $1 ~ /^[0-9]+$/ && $9+0 > 10 {print $12\" (\"$1\") \"$9\"%\"}' | grep -v -e spool-loadgen -e spoold | tr '\\n' ' '",
    )
}

fn threads(n: usize) -> String {
    if n == 0 {
        "default".into()
    } else {
        n.to_string()
    }
}

fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | spoold threads | loadgen threads | median | [min–max] | n | target | pass |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in rows {
        let m = median(&r.values);
        let (lo, hi) = spread(&r.values);
        let pass = if m.is_nan() {
            "n/a"
        } else if (r.pass_if_higher && m >= r.target) || (!r.pass_if_higher && m <= r.target) {
            "pass"
        } else {
            "FAIL"
        };
        let fmt = |v: f64| {
            if r.unit == "s" {
                format!("{v:.2}")
            } else {
                format!("{v:.0}")
            }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} {} | {}–{} | {} | {} {} {} | {} |",
            r.scenario,
            threads(r.broker_threads),
            threads(r.loadgen_threads),
            fmt(m),
            r.unit,
            fmt(lo),
            fmt(hi),
            r.values.len(),
            if r.pass_if_higher { "≥" } else { "≤" },
            fmt(r.target),
            r.unit,
            pass
        );
    }
    s
}

fn render(
    a: &ScenarioArgs,
    stamp: &str,
    table: &str,
    rows: &[Row],
    refs: &str,
    raw: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# spool-loadgen scenarios, {stamp}\n");
    let _ = writeln!(
        s,
        "- machine: `{}`, {} vCPU, `{}`",
        shell("uname -r"),
        shell("nproc"),
        shell("free -g | awk '/Mem:/{print $2\" GiB RAM\"}'")
    );
    let _ = writeln!(
        s,
        "- data dirs under `{}` (`{}`)",
        a.data_parent.display(),
        shell(&format!(
            "df -h --output=source,fstype,target {} | tail -1",
            a.data_parent.display()
        ))
    );
    let _ = writeln!(
        s,
        "- runs: {} per cell, {} s measured after {} s warm-up; {} bytes pre-faulted before each measured run",
        a.reps, a.duration, a.warmup, a.prefault_bytes
    );
    let _ = writeln!(s, "- git: `{}`\n", shell("git rev-parse --short HEAD"));
    let _ = writeln!(s, "Reference (same run):\n\n{refs}");
    s.push_str(table);
    let _ = writeln!(s, "\n## Runs\n");
    for r in rows {
        let _ = writeln!(
            s,
            "- {} (spoold threads {}, loadgen threads {}):",
            r.scenario,
            threads(r.broker_threads),
            threads(r.loadgen_threads)
        );
        for n in &r.notes {
            let _ = writeln!(s, "  - {n}");
        }
    }
    let _ = writeln!(s, "\n## Raw reports (JSON)\n\n```text\n{raw}```");
    s
}
