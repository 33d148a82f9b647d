//! A small, self-contained benchmark harness for Spool's log engine.
//!
//! Why not criterion: these benchmarks move gigabytes per sample, need only a handful of
//! samples, must interleave the engine with same-run baselines (`dd`, `fio`, raw `pwrite`)
//! so that the noise of a shared 2-core VM hits both alike, and must pre-fault memory right
//! before each sample (see `docs/benchmarks.md`). Criterion's model (many short samples of
//! one closure, statistics over them) fits none of that, and it would add a large dependency
//! tree to build on 2 cores.
//!
//! Model: a [`Suite`] holds named cases. It runs `warmup` rounds (discarded) and then `reps`
//! measured rounds; in each round every case runs once, in a rotating order. A case returns
//! one figure (MB/s, records/s, µs, ...). The report gives median [min–max] per case, and
//! for a case compared with a baseline, the median over rounds of `case / baseline` from the
//! same round.
//!
//! Configuration is by environment variable (all optional):
//! - `SPOOL_BENCH_QUICK=1`: tiny sizes, 1 warm-up and 2 measured rounds (smoke test). This
//!   is also the default when the binary runs without `--bench`, i.e. under
//!   `cargo test --benches`.
//! - `SPOOL_BENCH_WARMUP`, `SPOOL_BENCH_REPS`: rounds.
//! - `SPOOL_BENCH_PREFAULT=0`: do not pre-fault memory before each sample.
//! - `SPOOL_BENCH_PREFAULT_BYTES`: pre-fault at least this much (default 3 GiB, as the
//!   reference measurements did; a case that writes more pre-faults its own size + 64 MiB).
//! - `SPOOL_BENCH_PAUSE_SECS=10`: sleep before each sample; with `SPOOL_BENCH_PREFAULT=0` this
//!   measures on host-fresh memory (the slow first-run case).
//! - `SPOOL_BENCH_ONLY=a,=b`: run only the cases whose names contain `a` or are exactly `b`.
//! - `SPOOL_BENCH_DIR`: parent directory of the scratch directories (default
//!   `<workspace>/target/bench-tmp`, on the same filesystem as the work tree).
//! - per-bench sizes, documented in each bench and in `docs/benchmarks.md`.

pub mod ceiling;
pub mod inprocess;
pub mod spoold;

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_record::{BatchBuilder, Compression};

/// Harness settings read from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// Smoke-test mode: tiny sizes.
    pub quick: bool,
    /// Discarded rounds before measuring.
    pub warmup: usize,
    /// Measured rounds.
    pub reps: usize,
    /// Pre-fault memory right before each sample.
    pub prefault: bool,
    /// Least bytes to pre-fault (a case's own size is used when larger).
    pub prefault_min: u64,
    /// Sleep this long before each sample (with `prefault` off: lets free-page reporting
    /// hand freed memory back to the host, so the sample sees host-fresh memory).
    pub pause: Duration,
}

impl Config {
    /// Reads the settings; `quick` unless run by `cargo bench` (which passes `--bench`) or
    /// forced either way by `SPOOL_BENCH_QUICK`.
    pub fn from_env() -> Config {
        Config {
            quick: quick_mode(),
            warmup: env_usize("SPOOL_BENCH_WARMUP", 1, 1),
            reps: env_usize("SPOOL_BENCH_REPS", 5, 2).max(1),
            prefault: env_str("SPOOL_BENCH_PREFAULT").is_none_or(|v| v != "0"),
            prefault_min: env_str("SPOOL_BENCH_PREFAULT_BYTES")
                .and_then(|v| parse_bytes(&v))
                .unwrap_or(if quick_mode() { 64 << 20 } else { 3 << 30 }),
            pause: Duration::from_secs_f64(
                env_str("SPOOL_BENCH_PAUSE_SECS").map_or(0.0, |v| v.parse().unwrap_or(0.0)),
            ),
        }
    }

    /// `full` normally, `quick` in smoke-test mode.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// A size from environment variable `name` (accepts `K`, `M`, `G` suffixes, binary).
    pub fn bytes(&self, name: &str, full: u64, quick: u64) -> u64 {
        match env_str(name) {
            Some(v) => parse_bytes(&v).unwrap_or_else(|| panic!("{name}={v}: not a size")),
            None => self.pick(full, quick),
        }
    }

    /// A count from environment variable `name`.
    pub fn count(&self, name: &str, full: usize, quick: usize) -> usize {
        match env_str(name) {
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
            None => self.pick(full, quick),
        }
    }

    /// Prints the settings line every bench starts with.
    pub fn announce(&self, bench: &str, sizes: &str) {
        println!(
            "== {bench}: {} mode, {} warm-up + {} measured rounds, prefault {}, pause {} s; \
             {sizes}",
            if self.quick {
                "QUICK (smoke-test)"
            } else {
                "full"
            },
            self.warmup,
            self.reps,
            if self.prefault {
                format!("on (≥ {})", fmt_bytes(self.prefault_min))
            } else {
                "off".into()
            },
            self.pause.as_secs_f64(),
        );
    }
}

fn env_str(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_usize(name: &str, full: usize, quick: usize) -> usize {
    match env_str(name) {
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        None if quick_mode() => quick,
        None => full,
    }
}

/// True unless `SPOOL_BENCH_ONLY` (comma-separated substrings of case names, or `=name` for
/// an exact name) excludes `case`. Rows whose cases did not run print as `n/a`.
pub fn selected(case: &str) -> bool {
    env_str("SPOOL_BENCH_ONLY").is_none_or(|only| {
        only.split(',')
            .map(str::trim)
            .any(|w| match w.strip_prefix('=') {
                Some(exact) => case == exact,
                None => case.contains(w),
            })
    })
}

/// Smoke-test mode: `SPOOL_BENCH_QUICK` if set, else "not run with `--bench`".
fn quick_mode() -> bool {
    match env_str("SPOOL_BENCH_QUICK") {
        Some(v) => v != "0",
        None => !std::env::args().any(|a| a == "--bench"),
    }
}

/// Parses `123`, `64K`, `1M`, `2G` (binary multiples; an optional trailing `iB`/`B`).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s
        .strip_suffix("iB")
        .or_else(|| s.strip_suffix('B'))
        .unwrap_or(s);
    let (num, mul) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mul)
}

/// Formats a byte count as `1 GiB`, `64 MiB`, `512 KiB` or `N B`.
pub fn fmt_bytes(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    if n >= 1 << 20 {
        return format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64);
    }
    format!("{n} B")
}

/// The value after `name` on the command line (`--reps 5`), parsed; `None` when absent or
/// unparsable. For the benches that take their own flags (the broker benches).
pub fn flag_value<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

/// Order statistics of a set of samples.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// The samples, sorted.
    pub sorted: Vec<f64>,
}

impl Stats {
    /// Sorts `samples`.
    pub fn new(mut samples: Vec<f64>) -> Stats {
        samples.sort_by(f64::total_cmp);
        Stats { sorted: samples }
    }
    /// Number of samples.
    pub fn n(&self) -> usize {
        self.sorted.len()
    }
    /// Median (mean of the two middle samples when even); NaN when empty.
    pub fn median(&self) -> f64 {
        let n = self.sorted.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            self.sorted[n / 2]
        } else {
            (self.sorted[n / 2 - 1] + self.sorted[n / 2]) / 2.0
        }
    }
    /// Smallest sample.
    pub fn min(&self) -> f64 {
        self.sorted.first().copied().unwrap_or(f64::NAN)
    }
    /// Largest sample.
    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(f64::NAN)
    }
    /// Nearest-rank percentile, `q` in 0..=100.
    pub fn percentile(&self, q: f64) -> f64 {
        let n = self.sorted.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((q / 100.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }
}

/// Formats a figure with a precision that suits its size.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 100_000.0 {
        // Thousands separators for big rates (records/s).
        let s = format!("{:.0}", x);
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push('\u{202f}');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `median [min–max]` of `s`.
pub fn fmt_stats(s: &Stats) -> String {
    format!(
        "{} [{}–{}]",
        fmt_num(s.median()),
        fmt_num(s.min()),
        fmt_num(s.max())
    )
}

type CaseFn<'a> = Box<dyn FnMut() -> f64 + 'a>;

struct Case<'a> {
    name: String,
    unit: String,
    prefault_bytes: u64,
    run: CaseFn<'a>,
    samples: Vec<f64>,
}

/// A set of cases measured in interleaved rounds.
pub struct Suite<'a> {
    bench: String,
    cfg: Config,
    cases: Vec<Case<'a>>,
}

impl std::fmt::Debug for Suite<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Suite")
            .field("bench", &self.bench)
            .finish_non_exhaustive()
    }
}

impl<'a> Suite<'a> {
    /// An empty suite named `bench`.
    pub fn new(bench: &str, cfg: &Config) -> Suite<'a> {
        Suite {
            bench: bench.to_owned(),
            cfg: cfg.clone(),
            cases: Vec::new(),
        }
    }

    /// Adds a case. `prefault_bytes` of memory are touched and freed just before each of its
    /// samples (when pre-faulting is on), so the page cache it fills is not host-fresh.
    pub fn case(
        &mut self,
        name: &str,
        unit: &str,
        prefault_bytes: u64,
        run: impl FnMut() -> f64 + 'a,
    ) -> &mut Self {
        if !selected(name) {
            return self;
        }
        self.cases.push(Case {
            name: name.to_owned(),
            unit: unit.to_owned(),
            prefault_bytes,
            run: Box::new(run),
            samples: Vec::new(),
        });
        self
    }

    /// Runs the warm-up and measured rounds and returns the samples.
    pub fn run(mut self) -> Results {
        let rounds = self.cfg.warmup + self.cfg.reps;
        let n = self.cases.len();
        let mut noise = Vec::new();
        let start = CpuSnap::now();
        for round in 0..rounds {
            let measured = round >= self.cfg.warmup;
            for k in 0..n {
                // Rotate the order each round so no case always runs right after another.
                let i = (k + round) % n;
                let c = &mut self.cases[i];
                if !self.cfg.pause.is_zero() {
                    std::thread::sleep(self.cfg.pause);
                }
                if self.cfg.prefault && c.prefault_bytes > 0 {
                    prefault(c.prefault_bytes.max(self.cfg.prefault_min));
                }
                let before = CpuSnap::now();
                let x = (c.run)();
                let others = CpuSnap::now().others_since(&before);
                eprintln!(
                    "  [{}] round {}/{}{}: {} = {} {} (other processes: {:.0}% CPU)",
                    self.bench,
                    round + 1,
                    rounds,
                    if measured { "" } else { " (warm-up)" },
                    c.name,
                    fmt_num(x),
                    c.unit,
                    others,
                );
                if measured {
                    c.samples.push(x);
                    if others.is_finite() {
                        noise.push(others);
                    }
                }
            }
        }
        let noise = Stats::new(noise);
        let summary = format!(
            "other processes used {:.0}% CPU (of {}%) over the whole suite; per sample median \
             {:.0}%, max {:.0}%",
            CpuSnap::now().others_since(&start),
            100 * std::thread::available_parallelism().map_or(1, |n| n.get()),
            noise.median(),
            noise.max()
        );
        eprintln!("  [{}] {summary}", self.bench);
        Results {
            bench: self.bench,
            noise: summary,
            cases: self
                .cases
                .into_iter()
                .map(|c| (c.name, c.unit, c.samples))
                .collect(),
        }
    }
}

/// Samples of every case of a finished suite.
#[derive(Debug)]
pub struct Results {
    bench: String,
    noise: String,
    cases: Vec<(String, String, Vec<f64>)>,
}

impl Results {
    /// The samples of case `name`, in round order.
    pub fn samples(&self, name: &str) -> &[f64] {
        self.cases
            .iter()
            .find(|c| c.0 == name)
            .map_or(&[], |c| c.2.as_slice())
    }

    /// Stats of case `name`.
    pub fn stats(&self, name: &str) -> Stats {
        Stats::new(self.samples(name).to_vec())
    }

    /// `max(a) / max(b)`: best sample against best sample. On this VM a buffered-write
    /// sample is either warm or lands on host-fresh memory and runs 5-10x slower, at random
    /// and independently per sample, so the per-round ratio can flatter or punish either
    /// side; the best of each is its capability with warm memory.
    pub fn best_ratio(&self, a: &str, b: &str) -> Stats {
        let (a, b) = (self.stats(a), self.stats(b));
        if a.n() == 0 || b.n() == 0 {
            return Stats::default();
        }
        Stats::new(vec![a.max() / b.max()])
    }

    /// Median over rounds of `a / b` (same-round ratio).
    pub fn ratio(&self, a: &str, b: &str) -> Stats {
        let (a, b) = (self.samples(a), self.samples(b));
        Stats::new(a.iter().zip(b).map(|(x, y)| x / y).collect())
    }

    /// The bench's name.
    pub fn bench(&self) -> &str {
        &self.bench
    }

    /// How busy the rest of the machine was while the suite ran.
    pub fn noise(&self) -> &str {
        &self.noise
    }
}

/// Whether a figure must be at least or at most its target.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// figure >= target.
    AtLeast(f64),
    /// figure < target.
    Below(f64),
}

/// One line of a report table.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// The figure: median [min–max].
    pub figure: String,
    /// Unit of the figure.
    pub unit: String,
    /// Target, as text.
    pub target: String,
    /// Ratio to the baseline, as text.
    pub ratio: String,
    /// PASS / FAIL / blank.
    pub verdict: String,
}

/// A report: a titled table plus machine-readable `RESULT` lines.
#[derive(Debug, Default)]
pub struct Report {
    title: String,
    rows: Vec<Row>,
    results: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new(title: &str) -> Report {
        Report {
            title: title.to_owned(),
            ..Report::default()
        }
    }

    /// A plain figure row (no target).
    pub fn figure(&mut self, key: &str, what: &str, s: &Stats, unit: &str) {
        self.push(key, what, s, unit, "-", "", None);
    }

    /// A figure shown with its ratio to a baseline (no target).
    pub fn versus(&mut self, key: &str, what: &str, s: &Stats, unit: &str, ratio: &Stats) {
        self.push(key, what, s, unit, "-", &fmt_ratio(ratio), None);
    }

    /// A row with a target. The verdict uses `judged` (the figure itself, or the ratio when
    /// the target is a ratio) at its median.
    #[allow(clippy::too_many_arguments)]
    pub fn target(
        &mut self,
        key: &str,
        what: &str,
        s: &Stats,
        unit: &str,
        target: &str,
        ratio: Option<&Stats>,
        judged: &Stats,
        goal: Goal,
    ) {
        let m = judged.median();
        let ok = match goal {
            _ if m.is_nan() => None,
            Goal::AtLeast(t) => Some(m >= t),
            Goal::Below(t) => Some(m < t),
        };
        let ratio = ratio.map(fmt_ratio).unwrap_or_default();
        self.push(key, what, s, unit, target, &ratio, ok);
    }

    /// Like [`Report::target`], with the ratio column given as text.
    #[allow(clippy::too_many_arguments)]
    pub fn target_text(
        &mut self,
        key: &str,
        what: &str,
        s: &Stats,
        unit: &str,
        target: &str,
        ratio: &str,
        judged: &Stats,
        goal: Goal,
    ) {
        let m = judged.median();
        let ok = match goal {
            _ if m.is_nan() => None,
            Goal::AtLeast(t) => Some(m >= t),
            Goal::Below(t) => Some(m < t),
        };
        self.push(key, what, s, unit, target, ratio, ok);
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        key: &str,
        what: &str,
        s: &Stats,
        unit: &str,
        target: &str,
        ratio: &str,
        ok: Option<bool>,
    ) {
        let verdict = match ok {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None if target != "-" => "n/a",
            None => "",
        };
        if s.n() == 0 {
            return;
        }
        self.rows.push(Row {
            what: what.to_owned(),
            figure: fmt_stats(s),
            unit: unit.to_owned(),
            target: target.to_owned(),
            ratio: ratio.to_owned(),
            verdict: verdict.to_owned(),
        });
        self.results.push(format!(
            "RESULT {key} unit={} median={:.4} min={:.4} max={:.4} n={}{}",
            unit.replace(' ', "_"),
            s.median(),
            s.min(),
            s.max(),
            s.n(),
            if verdict.is_empty() {
                String::new()
            } else {
                format!(" verdict={verdict}")
            }
        ));
    }

    /// A figure with a ratio given as text (no target).
    pub fn push_text(&mut self, key: &str, what: &str, s: &Stats, unit: &str, ratio: &str) {
        self.push(key, what, s, unit, "-", ratio, None);
    }

    /// A free-text note printed under the table.
    pub fn note(&mut self, text: &str) {
        self.notes.push(text.to_owned());
    }

    /// Prints the table, the notes and the `RESULT` lines to stdout (nothing when no row has
    /// data, e.g. every case was filtered out).
    pub fn print(&self) {
        if self.rows.is_empty() {
            return;
        }
        let head = Row {
            what: "what".into(),
            figure: "median [min–max]".into(),
            unit: "unit".into(),
            target: "target".into(),
            ratio: "ratio to baseline".into(),
            verdict: "verdict".into(),
        };
        let width = |f: fn(&Row) -> &String| {
            std::iter::once(&head)
                .chain(&self.rows)
                .map(|r| f(r).chars().count())
                .max()
                .unwrap_or(0)
        };
        let w = [
            width(|r| &r.what),
            width(|r| &r.figure),
            width(|r| &r.unit),
            width(|r| &r.target),
            width(|r| &r.ratio),
            width(|r| &r.verdict),
        ];
        let line = |r: &Row| {
            let cells = [&r.what, &r.figure, &r.unit, &r.target, &r.ratio, &r.verdict];
            let mut s = String::from("|");
            for (c, w) in cells.iter().zip(w) {
                let pad = w - c.chars().count();
                let _ = write!(s, " {c}{} |", " ".repeat(pad));
            }
            s
        };
        let mut out = format!("\n### {}\n\n{}\n|", self.title, line(&head));
        for w in w {
            let _ = write!(out, "{}|", "-".repeat(w + 2));
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "\n- {n}");
        }
        out.push('\n');
        for r in &self.results {
            out.push_str(r);
            out.push('\n');
        }
        println!("{out}");
    }
}

/// `best 0.68×; per round 0.92× [0.35–2.71]`.
pub fn fmt_best_and_round(best: &Stats, round: &Stats) -> String {
    if best.n() == 0 {
        return "-".into();
    }
    format!(
        "best/best {:.2}×; per round {}",
        best.median(),
        fmt_ratio(round)
    )
}

/// `0.83× [0.80–0.85]`.
pub fn fmt_ratio(s: &Stats) -> String {
    if s.n() == 0 {
        return "-".into();
    }
    format!("{:.2}× [{:.2}–{:.2}]", s.median(), s.min(), s.max())
}

/// Touches `bytes` of fresh anonymous memory and frees it again, so that the next large
/// allocation (page cache included) reuses pages the host has backed recently instead of
/// host-fresh ones (free-page reporting makes those 5–15× slower to fault in).
pub fn prefault(bytes: u64) {
    let v = vec![1u8; bytes as usize];
    std::hint::black_box(&v);
    drop(v);
}

/// Scratch directory for one bench: a fresh temp dir under `SPOOL_BENCH_DIR` or
/// `<workspace>/target/bench-tmp`, removed when dropped.
pub fn scratch_dir(bench: &str) -> tempfile::TempDir {
    let parent = env_str("SPOOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp"));
    fs::create_dir_all(&parent).expect("creating the bench scratch parent");
    tempfile::Builder::new()
        .prefix(&format!("{bench}-"))
        .tempdir_in(&parent)
        .expect("creating the bench scratch dir")
}

/// Runs a command, returning its stderr+stdout as text; panics if it fails.
fn run_tool(cmd: &mut Command) -> String {
    let out = cmd
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Parses dd's summary line `N bytes (...) copied, S s, R GB/s` into (bytes, seconds).
pub fn parse_dd(text: &str) -> Option<(u64, f64)> {
    let line = text
        .lines()
        .find(|l| l.contains(" bytes") && l.contains("copied"))?;
    let bytes = line.split_whitespace().next()?.parse().ok()?;
    let after = line.split("copied,").nth(1)?;
    let secs = after.split_whitespace().next()?.parse().ok()?;
    Some((bytes, secs))
}

/// `dd if=/dev/zero of=path bs=1M count=mib` (buffered, no fsync); MB/s from dd's own
/// byte count and time. The file is removed afterwards, before its pages are written back.
pub fn dd_write(path: &Path, mib: u64) -> f64 {
    let text = run_tool(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", path.display()))
            .arg("bs=1M")
            .arg(format!("count={mib}")),
    );
    let _ = fs::remove_file(path);
    let (bytes, secs) = parse_dd(&text).unwrap_or_else(|| panic!("unparsable dd output: {text}"));
    bytes as f64 / secs / 1e6
}

/// `dd if=path of=/dev/null bs=1M` (page cache); returns (bytes, seconds).
pub fn dd_read(path: &Path) -> (u64, f64) {
    let text = run_tool(
        Command::new("dd")
            .arg(format!("if={}", path.display()))
            .arg("of=/dev/null")
            .arg("bs=1M"),
    );
    parse_dd(&text).unwrap_or_else(|| panic!("unparsable dd output: {text}"))
}

/// True when `fio` is on the PATH.
pub fn have_fio() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `fio --rw=write --bs=1M --size=bytes --ioengine=psync` on a fresh file (buffered, no
/// fsync); MB/s from fio's JSON `bw_bytes`. The file is removed afterwards.
pub fn fio_write(path: &Path, bytes: u64) -> f64 {
    let _ = fs::remove_file(path);
    let text = run_tool(
        Command::new("fio")
            .arg("--name=seqwrite")
            .arg(format!("--filename={}", path.display()))
            .args([
                "--rw=write",
                "--bs=1M",
                "--ioengine=psync",
                "--output-format=json",
            ])
            .arg(format!("--size={bytes}")),
    );
    let _ = fs::remove_file(path);
    let json = &text[text.find('{').expect("fio printed JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio JSON");
    v["jobs"][0]["write"]["bw_bytes"]
        .as_f64()
        .expect("fio bw_bytes")
        / 1e6
}

/// In-process baseline: `pwrite`s `total` bytes in `block`-byte writes from one reused
/// buffer to a fresh file; every `sync_every` blocks an `fdatasync` (0 = never), and one more
/// at the end if `end_sync`. Returns MB/s. The file is removed afterwards.
pub fn raw_pwrite(path: &Path, total: u64, block: usize, sync_every: usize, end_sync: bool) -> f64 {
    let buf = vec![0x5au8; block];
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("creating the baseline file");
    let t = Instant::now();
    let mut pos = 0u64;
    let mut n = 0usize;
    while pos < total {
        f.write_all_at(&buf, pos).expect("baseline pwrite");
        pos += block as u64;
        n += 1;
        if sync_every > 0 && n.is_multiple_of(sync_every) {
            f.sync_data().expect("baseline fdatasync");
        }
    }
    if end_sync {
        f.sync_data().expect("baseline fdatasync");
    }
    let el = t.elapsed();
    drop_file(path, f);
    pos as f64 / el.as_secs_f64() / 1e6
}

/// In-process baseline with the engine's write pattern: for each `batch_len`-byte batch, a
/// 16-byte `pwrite` (the offset/epoch prefix the writer patches) and then one of the other
/// `batch_len - 16` bytes, back to back, no fsync. Returns MB/s; the file is removed.
pub fn raw_pwrite_engine_pattern(path: &Path, total: u64, batch_len: usize) -> f64 {
    let buf = vec![0x5au8; batch_len];
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("creating the baseline file");
    let t = Instant::now();
    let mut pos = 0u64;
    while pos + batch_len as u64 <= total {
        f.write_all_at(&buf[..16], pos).expect("baseline pwrite");
        f.write_all_at(&buf[16..], pos + 16)
            .expect("baseline pwrite");
        pos += batch_len as u64;
    }
    let el = t.elapsed();
    drop_file(path, f);
    pos as f64 / el.as_secs_f64() / 1e6
}

/// Truncates and removes a file, so dirty pages are dropped instead of written back.
pub fn drop_file(path: &Path, f: File) {
    let _ = f.set_len(0);
    drop(f);
    let _ = fs::remove_file(path);
}

/// Truncates every regular file under `dir` to zero bytes (dropping their dirty pages
/// without writing them back). Used before closing a log whose data is no longer needed,
/// so that the close's fdatasync has nothing to write.
pub fn truncate_all(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            truncate_all(&e.path())?;
        } else if ft.is_file() && e.file_name() != ".lock" {
            OpenOptions::new().write(true).open(e.path())?.set_len(0)?;
        }
    }
    Ok(())
}

/// Sum of the sizes of the `*.log` files under `dir` (recursively).
pub fn log_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                log_bytes(&p)
            } else if p.extension().is_some_and(|x| x == "log") {
                e.metadata().map_or(0, |m| m.len())
            } else {
                0
            }
        })
        .sum()
}

/// The `*.log` segment files of a partition directory, sorted by name (= base offset).
pub fn segment_files(pdir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(pdir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Drops `path` from the page cache (`dd iflag=nocache count=0` = posix_fadvise DONTNEED on
/// the whole file). Affects only this file, not the rest of the machine's cache.
pub fn evict_from_page_cache(path: &Path) {
    run_tool(
        Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0", "status=none"]),
    );
}

/// One uncompressed batch of records with `value_len`-byte values and no key, filled up to
/// (not past) `batch_bytes` bytes, with timestamps `ts0, ts0 + 1, ...`. Returns the batch
/// and its record count.
pub fn make_batch(value_len: usize, batch_bytes: usize, ts0: i64) -> (Bytes, usize) {
    let value: Vec<u8> = (0..value_len).map(|i| (i * 31 + 7) as u8).collect();
    let mut b = BatchBuilder::with_capacity(Compression::None, batch_bytes);
    let mut n = 0;
    loop {
        let before = b.size_bytes();
        b.push(ts0 + n as i64, None, Some(&value), &[]);
        n += 1;
        let per = b.size_bytes() - before;
        if b.size_bytes() + per > batch_bytes {
            break;
        }
    }
    (b.finish().expect("a non-empty batch"), n)
}

/// A monotonic stopwatch in seconds.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// xorshift64* — a tiny deterministic PRNG (no dependency needed for random offsets).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (seed 0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0; slight modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// CPU time counters: (busy ticks of the whole machine, ticks of this process and the
/// children it has waited for, ticks of wall time × CPUs).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSnap {
    busy: u64,
    ours: u64,
    total: u64,
}

impl CpuSnap {
    /// Reads `/proc/stat` and `/proc/self/stat` (zeros where unreadable).
    pub fn now() -> CpuSnap {
        let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let f = |i: usize| cpu.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal
        let busy = f(0) + f(1) + f(2) + f(5) + f(6) + f(7);
        let total = busy + f(3) + f(4);
        let me = fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name in parentheses; utime is field 14 overall.
        let rest = me.rsplit_once(')').map_or("", |x| x.1);
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let g = |i: usize| v.get(i).copied().unwrap_or(0);
        let ours = g(11) + g(12) + g(13) + g(14);
        CpuSnap { busy, ours, total }
    }

    /// Share of the machine's CPU capacity used by other processes since `earlier`, in
    /// percent of one CPU (200 = both CPUs of a 2-CPU machine fully busy).
    pub fn others_since(&self, earlier: &CpuSnap) -> f64 {
        let total = self.total.saturating_sub(earlier.total) as f64;
        if total == 0.0 {
            return f64::NAN;
        }
        let others = self
            .busy
            .saturating_sub(earlier.busy)
            .saturating_sub(self.ours.saturating_sub(earlier.ours)) as f64;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        100.0 * cpus * others / total
    }
}

/// Load average and the busiest other processes, to record how noisy the machine was.
pub fn machine_load() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "loadavg {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dd_and_sizes() {
        let t = "1024+0 records in\n1024+0 records out\n\
                 1073741824 bytes (1.1 GB, 1.0 GiB) copied, 0.201 s, 5.3 GB/s\n";
        assert_eq!(parse_dd(t), Some((1073741824, 0.201)));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("100"), Some(100));
        let s = Stats::new(vec![3.0, 1.0, 2.0, 10.0]);
        assert_eq!(s.median(), 2.5);
        assert_eq!(s.percentile(50.0), 2.0);
        assert_eq!(s.percentile(99.0), 10.0);
    }
}
