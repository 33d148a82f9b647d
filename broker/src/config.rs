//! `spoold` configuration: defaults < TOML file < `SPOOL_*` environment < command-line flags.
//!
//! Unknown keys in the file are rejected. An environment variable is taken as an override when
//! its name, after `SPOOL_`, names a top-level key (`SPOOL_DATA_DIR`) or a section
//! (`SPOOL_LIMITS__MAX_CONNECTIONS`, `__` separating section and key); within a section an
//! unknown key is rejected. Other `SPOOL_*` variables are left alone; those that are neither
//! the CLI's (`SPOOL_BROKER`, …) nor spoold's own (`SPOOL_LOG`) are most likely mistyped
//! settings, and [`Config::unknown_env_warnings`] says so (spoold logs it at start).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use spool_log_engine::{FsyncPolicy, TopicConfig};

use crate::affinity::CpuSet;
use crate::error::ConfigError;

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 7170;
/// Default metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 7171;
/// Longest `limits.idle_timeout_ms` (a day).
pub const MAX_IDLE_TIMEOUT_MS: u64 = 86_400_000;
/// Largest `limits.max_reply_memory_bytes` (1 TiB).
pub const MAX_REPLY_MEMORY_BYTES: u64 = 1 << 40;

/// Everything `spoold` can be configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the log.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; `None` (written `"off"` in TOML and in
    /// `SPOOL_METRICS_LISTEN`) disables metrics.
    #[serde(with = "metrics_listen")]
    pub metrics_listen: Option<SocketAddr>,
    /// Listening on a non-loopback address without TLS and tokens requires saying so
    /// explicitly (anything beyond loopback would then be unauthenticated); so does serving
    /// the metrics endpoint, which has neither, beyond loopback.
    pub allow_non_loopback: bool,
    /// Tokio worker threads; 0 means one per core.
    pub runtime_threads: usize,
    /// CPUs the runtime workers are pinned to, as a CPU list (`"0"`, `"0-1"`), narrowed to
    /// the mask the process started with; empty (the default): not pinned. See
    /// [`crate::affinity`].
    pub runtime_cpus: CpuSet,
    /// CPUs the blocking threads (appends, fsyncs, faulting reads, and the log's write-back,
    /// retention and compaction threads, which start from one) are pinned to, narrowed to the
    /// start mask; empty (the default): not pinned.
    pub blocking_cpus: CpuSet,
    /// Longest time a graceful shutdown waits for in-flight requests and streams.
    pub shutdown_timeout_ms: u64,
    /// How often retention runs over every partition.
    pub retention_check_interval_ms: u64,
    /// How often the log cleaner looks for compacted partitions to clean.
    pub cleaner_check_interval_ms: u64,
    /// Memory of the log cleaner's key map (24 bytes per key; a pass over more distinct keys
    /// cleans part of the partition and the next pass goes on).
    pub cleaner_dedupe_buffer_bytes: u64,
    /// Under `fsync = always`, how far ahead of each partition's writer the active segment is
    /// written with zeros and made durable, so group commits overwrite allocated blocks instead
    /// of growing the file (`spool_log_engine::LogOptions::zero_ahead_bytes`). 0 (the default)
    /// turns it off; otherwise 256 KiB..=8 MiB, a multiple of 4 KiB (2 MiB was measured). Costs
    /// up to this much disk per `fsync = always` partition (docs/operations.md).
    pub zero_ahead_bytes: u64,
    /// TLS for the gRPC listener; absent means plaintext.
    pub tls: Option<TlsConfig>,
    /// Bearer tokens and their ACLs; none means no authentication.
    pub auth: AuthConfig,
    /// Limits enforced before allocating.
    pub limits: LimitsConfig,
    /// Defaults for topics created without an explicit setting.
    pub topic_defaults: TopicDefaults,
    /// Consumer-group membership.
    pub groups: GroupsConfig,
    /// Transactions.
    pub transactions: TransactionsConfig,
}

/// Transactions (see docs/protocol.md, "Transactions").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransactionsConfig {
    /// Timeout of producers that do not ask for one: a transaction open longer is aborted.
    pub default_timeout_ms: u32,
    /// Longest timeout a producer may ask for (longer requests are refused).
    pub max_timeout_ms: u32,
    /// How often open transactions are checked against their timeout.
    pub abort_check_interval_ms: u64,
    /// Transactional ids the broker keeps (each is a few hundred bytes of memory).
    pub max_transactional_ids: usize,
    /// Partitions one transaction may touch.
    pub max_partitions_per_txn: usize,
}

impl Default for TransactionsConfig {
    fn default() -> Self {
        TransactionsConfig {
            default_timeout_ms: 60_000,
            max_timeout_ms: 900_000,
            abort_check_interval_ms: 1_000,
            max_transactional_ids: 100_000,
            max_partitions_per_txn: 10_000,
        }
    }
}

/// Consumer-group membership (see docs/protocol.md, "Consumer-group coordination").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupsConfig {
    /// Session timeout of members that do not ask for one: a member heard from for this long
    /// loses its partitions.
    pub session_timeout_ms: u64,
    /// Shortest session timeout a member may ask for (shorter requests are raised to it).
    pub min_session_timeout_ms: u64,
    /// Longest session timeout (sessions are also capped at `limits.idle_timeout_ms`, so
    /// that heartbeats keep the connection).
    pub max_session_timeout_ms: u64,
    /// Time a member has to acknowledge a revocation, unless it asks for another.
    pub rebalance_timeout_ms: u64,
    /// Longest rebalance timeout a member may ask for.
    pub max_rebalance_timeout_ms: u64,
    /// Members per group.
    pub max_members: usize,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig {
            session_timeout_ms: 10_000,
            min_session_timeout_ms: 1_000,
            max_session_timeout_ms: 300_000,
            rebalance_timeout_ms: 60_000,
            max_rebalance_timeout_ms: 600_000,
            max_members: 1000,
        }
    }
}

/// TLS settings (rustls, ring provider).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Authentication settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted tokens (by hash) with their ACLs.
    pub tokens: Vec<crate::auth::TokenConfig>,
}

/// Request and connection limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest gRPC message accepted or sent (tonic's decode and encode limits; services
    /// other than Produce decode less, derived from `max_partitions_per_request`).
    pub max_request_bytes: usize,
    /// Client connections open at once; past it the broker stops accepting until one closes.
    pub max_connections: usize,
    /// Client connections open at once from one source address; past it new connections from
    /// that address are closed at once.
    pub max_connections_per_address: usize,
    /// A connection that has not sent its first request this long after it was accepted
    /// (silent, or stuck in its TLS or HTTP/2 handshake) is closed (after `idle_timeout_ms`
    /// if that is shorter).
    pub handshake_timeout_ms: u64,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest `max_bytes` a fetch or subscription may ask for per partition.
    pub max_fetch_bytes: u32,
    /// Longest `max_wait_ms` of a fetch.
    pub max_fetch_wait_ms: u32,
    /// Partitions in one produce, fetch, subscribe or FetchOffsets request; also queries of a
    /// ListOffsets, offsets of a commit (CommitTxn: all groups together), groups of a
    /// CommitTxn, topics of a DeleteGroup or JoinGroup. Counted before decoding.
    pub max_partitions_per_request: usize,
    /// Records in one produce request's record lists together, each record's headers counted
    /// as records (before decoding), and in one `RecordList`.
    pub max_records_per_request: usize,
    /// Time limit of a unary request.
    pub request_timeout_ms: u64,
    /// Memory the broker holds at most for replies in flight (Fetch replies and Subscribe
    /// messages from the read of their data until written to the socket), across all
    /// connections. Past it, fetches wait (then fail with RESOURCE_EXHAUSTED) and
    /// subscriptions pause until memory is free.
    pub max_reply_memory_bytes: u64,
    /// The same, per connection: at least `max_request_bytes` (one reply of the largest size
    /// always fits), at most `max_reply_memory_bytes`.
    pub max_reply_memory_bytes_per_connection: u64,
    /// A connection on which no request or response data moved for this long is closed by
    /// the broker. Above `request_timeout_ms` (so a unary call is always answered first);
    /// Subscribe heartbeats come at least every half of it.
    pub idle_timeout_ms: u64,
}

/// Defaults for new topics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    /// Partitions when a request says 0.
    pub partitions: u32,
    /// `always`, `never` or `interval`.
    pub fsync: String,
    /// Interval for `fsync = "interval"`.
    pub fsync_interval_ms: u64,
    /// Segment roll size.
    pub segment_bytes: u64,
    /// Segment roll age.
    pub segment_ms: u64,
    /// Time retention; 0 keeps forever.
    pub retention_ms: u64,
    /// Size retention per partition; 0 means no limit.
    pub retention_bytes: u64,
    /// Largest batch accepted.
    pub max_message_bytes: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./spool-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT))),
            allow_non_loopback: false,
            tls: None,
            auth: AuthConfig::default(),
            runtime_threads: 0,
            runtime_cpus: CpuSet::default(),
            blocking_cpus: CpuSet::default(),
            shutdown_timeout_ms: 10_000,
            retention_check_interval_ms: 60_000,
            cleaner_check_interval_ms: 15_000,
            cleaner_dedupe_buffer_bytes: 64 << 20,
            zero_ahead_bytes: 0,
            limits: LimitsConfig::default(),
            topic_defaults: TopicDefaults::default(),
            groups: GroupsConfig::default(),
            transactions: TransactionsConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_bytes: 64 << 20,
            max_connections: 1024,
            max_connections_per_address: 256,
            handshake_timeout_ms: 10_000,
            max_concurrent_streams: 256,
            max_fetch_bytes: 16 << 20,
            max_fetch_wait_ms: 25_000,
            max_partitions_per_request: 10_000,
            max_records_per_request: 1 << 20,
            request_timeout_ms: 30_000,
            max_reply_memory_bytes: 1 << 30,
            max_reply_memory_bytes_per_connection: 256 << 20,
            idle_timeout_ms: 600_000,
        }
    }
}

impl Default for TopicDefaults {
    fn default() -> Self {
        let t = TopicConfig::default();
        TopicDefaults {
            partitions: 1,
            fsync: "always".into(),
            fsync_interval_ms: 1000,
            segment_bytes: t.segment_bytes,
            segment_ms: t.segment_ms,
            retention_ms: 0,
            retention_bytes: 0,
            max_message_bytes: t.max_batch_bytes,
        }
    }
}

impl TopicDefaults {
    /// The engine config these defaults describe.
    pub fn to_topic_config(&self) -> Result<TopicConfig, ConfigError> {
        let fsync = match self.fsync.as_str() {
            "always" => FsyncPolicy::Always,
            "never" => FsyncPolicy::Never,
            "interval" => FsyncPolicy::Interval {
                interval_ms: self.fsync_interval_ms,
            },
            other => {
                return Err(ConfigError::Invalid(format!(
                    "topic_defaults.fsync must be always, never or interval, not {other:?}"
                )));
            }
        };
        let cfg = TopicConfig {
            partitions: self.partitions.max(1),
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            retention_ms: (self.retention_ms > 0).then_some(self.retention_ms),
            retention_bytes: (self.retention_bytes > 0).then_some(self.retention_bytes),
            fsync,
            max_batch_bytes: self.max_message_bytes,
            ..TopicConfig::default()
        };
        cfg.validate()
            .map_err(|e| ConfigError::Invalid(format!("topic_defaults: {e}")))?;
        Ok(cfg)
    }
}

impl Config {
    /// Builds the effective config: defaults, then the TOML file (if any), then `SPOOL_*`
    /// variables from `env`. Flags are applied by the caller afterwards.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match file {
            Some(path) => {
                // The operator's configuration, not durable state: no I/O seam needed.
                #[allow(clippy::disallowed_methods)]
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!("reading {}: {e}", path.display()))
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        let known = known_keys().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("SPOOL_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if !known.contains_key(&path[0]) {
                continue;
            }
            let parsed = parse_env_value(&value);
            let mut cursor = &mut table;
            for key in &path[..path.len() - 1] {
                cursor = cursor
                    .entry(key.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!("{name}: {key} is not a section"))
                    })?;
            }
            cursor.insert(path[path.len() - 1].clone(), parsed);
        }
        let cfg: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        Ok(cfg)
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let secured = self.tls.is_some() && !self.auth.tokens.is_empty();
        if !self.allow_non_loopback && !secured && !self.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {} without TLS and tokens: only loopback addresses are \
                 allowed unless TLS and auth tokens are configured, or allow_non_loopback = true \
                 (--allow-non-loopback)",
                self.listen
            )));
        }
        // The metrics endpoint has neither TLS nor tokens.
        if let Some(m) = self.metrics_listen
            && !self.allow_non_loopback
            && !m.ip().is_loopback()
        {
            return Err(ConfigError::Invalid(format!(
                "refusing to serve metrics on {m}: the metrics endpoint is unauthenticated; \
                 use a loopback address or allow_non_loopback = true"
            )));
        }
        crate::auth::Auth::new(&self.auth.tokens)?;
        if self.limits.max_request_bytes < 1024 || self.limits.max_request_bytes > 1 << 30 {
            return Err(ConfigError::Invalid(
                "limits.max_request_bytes must be in 1 KiB..=1 GiB".into(),
            ));
        }
        if self.retention_check_interval_ms < 100 {
            return Err(ConfigError::Invalid(
                "retention_check_interval_ms must be at least 100".into(),
            ));
        }
        if self.cleaner_check_interval_ms < 100 {
            return Err(ConfigError::Invalid(
                "cleaner_check_interval_ms must be at least 100".into(),
            ));
        }
        if !(1 << 10..=16 << 30).contains(&self.cleaner_dedupe_buffer_bytes) {
            return Err(ConfigError::Invalid(
                "cleaner_dedupe_buffer_bytes must be in 1 KiB..=16 GiB".into(),
            ));
        }
        if self.zero_ahead_bytes != 0
            && (!(spool_log_engine::MIN_ZERO_AHEAD_BYTES..=spool_log_engine::MAX_ZERO_AHEAD_BYTES)
                .contains(&self.zero_ahead_bytes)
                || !self.zero_ahead_bytes.is_multiple_of(4096))
        {
            return Err(ConfigError::Invalid(format!(
                "zero_ahead_bytes must be 0 (off) or a multiple of 4096 in {}..={}",
                spool_log_engine::MIN_ZERO_AHEAD_BYTES,
                spool_log_engine::MAX_ZERO_AHEAD_BYTES
            )));
        }
        if u64::from(self.limits.max_fetch_wait_ms) >= self.limits.request_timeout_ms {
            return Err(ConfigError::Invalid(
                "limits.max_fetch_wait_ms must be below limits.request_timeout_ms".into(),
            ));
        }
        let idle = self.limits.idle_timeout_ms;
        if idle <= self.limits.request_timeout_ms || !(1000..=MAX_IDLE_TIMEOUT_MS).contains(&idle) {
            return Err(ConfigError::Invalid(format!(
                "limits.idle_timeout_ms must be above limits.request_timeout_ms and within \
                 1000..={MAX_IDLE_TIMEOUT_MS}"
            )));
        }
        let l = &self.limits;
        if l.max_reply_memory_bytes_per_connection < l.max_request_bytes as u64
            || l.max_reply_memory_bytes < l.max_reply_memory_bytes_per_connection
            || l.max_reply_memory_bytes > MAX_REPLY_MEMORY_BYTES
        {
            return Err(ConfigError::Invalid(format!(
                "need limits.max_request_bytes <= limits.max_reply_memory_bytes_per_connection \
                 <= limits.max_reply_memory_bytes <= {MAX_REPLY_MEMORY_BYTES}"
            )));
        }
        if !(100..=MAX_IDLE_TIMEOUT_MS).contains(&self.limits.handshake_timeout_ms) {
            return Err(ConfigError::Invalid(format!(
                "limits.handshake_timeout_ms must be within 100..={MAX_IDLE_TIMEOUT_MS}"
            )));
        }
        if self.limits.max_concurrent_streams == 0
            || self.limits.max_fetch_bytes == 0
            || self.limits.max_connections == 0
            || self.limits.max_connections_per_address == 0
        {
            return Err(ConfigError::Invalid("limits must be non-zero".into()));
        }
        self.topic_defaults.to_topic_config()?;
        let g = &self.groups;
        if g.min_session_timeout_ms < 100
            || g.min_session_timeout_ms > g.session_timeout_ms
            || g.session_timeout_ms > g.max_session_timeout_ms
        {
            return Err(ConfigError::Invalid(
                "groups: need 100 <= min_session_timeout_ms <= session_timeout_ms <= \
                 max_session_timeout_ms"
                    .into(),
            ));
        }
        if g.rebalance_timeout_ms < 100
            || g.rebalance_timeout_ms > g.max_rebalance_timeout_ms
            || g.max_members == 0
        {
            return Err(ConfigError::Invalid(
                "groups: need 100 <= rebalance_timeout_ms <= max_rebalance_timeout_ms and \
                 max_members > 0"
                    .into(),
            ));
        }
        let t = &self.transactions;
        if t.default_timeout_ms < 100
            || t.default_timeout_ms > t.max_timeout_ms
            || t.abort_check_interval_ms < 10
            || t.max_transactional_ids == 0
            || t.max_partitions_per_txn == 0
        {
            return Err(ConfigError::Invalid(
                "transactions: need 100 <= default_timeout_ms <= max_timeout_ms, \
                 abort_check_interval_ms >= 10 and non-zero limits"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The effective config as TOML (for `--print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// `SPOOL_*` variables that belong to other programs or to spoold outside its configuration:
/// not warned about.
const OTHER_SPOOL_VARS: &[&str] = &[
    // spoold itself: the log filter and the crash points of tests.
    "SPOOL_LOG",
    "SPOOL_FAILPOINTS",
    // The `spool` CLI and the client's programs (processors run with SPOOL_BROKER set).
    "SPOOL_BROKER",
    "SPOOL_PROFILE",
    "SPOOL_CLI_CONFIG",
    "SPOOL_TLS_CA",
    "SPOOL_TLS_DOMAIN",
    "SPOOL_TLS_CERT",
    "SPOOL_TLS_KEY",
    "SPOOL_TOKEN",
    "SPOOL_TOKEN_FILE",
];

impl Config {
    /// One warning for each `SPOOL_*` variable of `env` that names no configuration key (and
    /// is not one of the CLI's or of spoold outside its configuration), with the key it most
    /// likely meant. A mistyped override would otherwise be ignored silently.
    pub fn unknown_env_warnings(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
        let Ok(known) = known_keys() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, _) in env {
            let Some(rest) = name.strip_prefix("SPOOL_") else {
                continue;
            };
            if OTHER_SPOOL_VARS.contains(&name.as_str()) || name.starts_with("SPOOL_TEST_") {
                continue;
            }
            let first = rest
                .split("__")
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if known.contains_key(&first) {
                continue; // a section's unknown key is an error at load, not a warning
            }
            let hint = suggest(&first, &known)
                .map(|s| format!(" (did you mean SPOOL_{}?)", s.to_ascii_uppercase()))
                .unwrap_or_default();
            out.push(format!(
                "ignoring {name}: it is not a spoold setting{hint}; settings are SPOOL_<KEY> \
                 or SPOOL_<SECTION>__<KEY> (spoold --print-config lists them)"
            ));
        }
        out.sort();
        out
    }
}

/// Whether log lines get ANSI colours: only when stderr is a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>), so a log
/// redirected to a file or read by journald has no escape codes.
pub fn log_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Every key and section of the configuration (optional sections included, which the
/// defaults leave out), as a TOML table.
fn known_keys() -> Result<toml::Table, toml::ser::Error> {
    toml::Table::try_from(Config {
        tls: Some(TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: Some(PathBuf::new()),
        }),
        ..Config::default()
    })
}

/// The configuration key `name` most likely meant: `section_key` for `section__key`, or the
/// closest top-level key by edit distance (at most a third of the name's length away).
fn suggest(name: &str, known: &toml::Table) -> Option<String> {
    for (section, value) in known {
        if let (Some(key), Some(table)) = (
            name.strip_prefix(section.as_str())
                .and_then(|r| r.strip_prefix('_')),
            value.as_table(),
        ) && table.contains_key(key)
        {
            return Some(format!("{section}__{key}"));
        }
    }
    known
        .keys()
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= name.len().div_ceil(3))
        .min()
        .map(|(_, k)| k.clone())
}

/// Levenshtein distance (names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `metrics_listen` in TOML and the environment: an address, or `"off"` to disable.
mod metrics_listen {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        v: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("off"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "metrics_listen must be HOST:PORT (e.g. 127.0.0.1:7171) or \"off\", not {text:?}"
            ))
        })
    }
}

/// An environment value: a TOML scalar if it parses as one (numbers, booleans), else a string.
fn parse_env_value(v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match v {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(v.to_owned()),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // writes configuration files to load
mod tests {
    use super::*;

    #[test]
    fn cpu_sets_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("spoold.toml");
        std::fs::write(&f, "runtime_cpus = \"0\"\nblocking_cpus = \"0-1\"\n").unwrap();
        let c = Config::load(Some(&f), Vec::<(String, String)>::new()).unwrap();
        assert_eq!(c.runtime_cpus.cpus(), &[0]);
        assert_eq!(c.blocking_cpus.cpus(), &[0, 1]);
        // An integer in the environment is one CPU.
        let env = vec![("SPOOL_RUNTIME_CPUS".to_owned(), "1".to_owned())];
        let c = Config::load(Some(&f), env).unwrap();
        assert_eq!(c.runtime_cpus.cpus(), &[1]);
        let round: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(round, c);
        let env = vec![("SPOOL_BLOCKING_CPUS".to_owned(), "2-1".to_owned())];
        assert!(
            Config::load(None, env).is_err(),
            "a backwards range is refused"
        );
        assert!(Config::default().runtime_cpus.is_empty(), "off by default");
    }

    #[test]
    fn layering_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("spoold.toml");
        std::fs::write(
            &f,
            "data_dir = \"/var/lib/spool\"\n[limits]\nmax_concurrent_streams = 10\n",
        )
        .unwrap();
        let env = vec![
            (
                "SPOOL_LIMITS__MAX_CONCURRENT_STREAMS".to_owned(),
                "20".to_owned(),
            ),
            ("SPOOL_BROKER".to_owned(), "somewhere:1".to_owned()),
            ("SPOOL_LISTEN".to_owned(), "127.0.0.1:9999".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let c = Config::load(Some(&f), env).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/spool"));
        assert_eq!(c.limits.max_concurrent_streams, 20, "env beats file");
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(
            c.limits.max_fetch_bytes,
            LimitsConfig::default().max_fetch_bytes
        );

        std::fs::write(&f, "data_dirr = \"x\"\n").unwrap();
        let err = Config::load(Some(&f), vec![]).unwrap_err();
        assert!(err.to_string().contains("data_dirr"), "{err}");
        // The optional [tls] section is reachable from the environment too.
        let c = Config::load(
            None,
            vec![
                ("SPOOL_TLS__CERT".into(), "/tls/server.crt".into()),
                ("SPOOL_TLS__KEY".into(), "/tls/server.key".into()),
            ],
        )
        .unwrap();
        assert_eq!(
            c.tls.map(|t| t.cert),
            Some(PathBuf::from("/tls/server.crt"))
        );
        let err = Config::load(None, vec![("SPOOL_LIMITS__NOPE".into(), "1".into())]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn metrics_can_be_switched_off_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("spoold.toml");
        std::fs::write(&f, "metrics_listen = \"off\"\n").unwrap();
        assert_eq!(Config::load(Some(&f), vec![]).unwrap().metrics_listen, None);
        let env = vec![("SPOOL_METRICS_LISTEN".to_owned(), "off".to_owned())];
        assert_eq!(Config::load(None, env).unwrap().metrics_listen, None);
        let env = vec![("SPOOL_METRICS_LISTEN".to_owned(), "127.0.0.1:9".to_owned())];
        let c = Config::load(Some(&f), env).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9".parse().unwrap()));
        // --print-config of a broker without metrics reads back without metrics.
        let off = Config {
            metrics_listen: None,
            ..Config::default()
        };
        std::fs::write(&f, off.to_toml()).unwrap();
        assert_eq!(Config::load(Some(&f), vec![]).unwrap(), off);
        std::fs::write(&f, "metrics_listen = \"nope\"\n").unwrap();
        let err = Config::load(Some(&f), vec![]).unwrap_err().to_string();
        assert!(err.contains("\"off\""), "{err}");
    }

    #[test]
    fn unknown_spool_variables_are_warned_about() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        let w = Config::unknown_env_warnings(env(&[
            ("SPOOL_DATADIR", "/x"),
            ("SPOOL_LIMITS_MAX_CONNECTIONS", "5"),
            ("SPOOL_WHATEVER", "1"),
            // Known, or someone else's: no warning.
            ("SPOOL_DATA_DIR", "/x"),
            ("SPOOL_LIMITS__MAX_CONNECTIONS", "5"),
            ("SPOOL_TLS__CERT", "/etc/spool/tls/server.crt"),
            ("SPOOL_BROKER", "h:1"),
            ("SPOOL_LOG", "info"),
            ("SPOOL_TOKEN", "t"),
            ("HOME", "/root"),
        ]));
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].contains("SPOOL_DATADIR") && w[0].contains("did you mean SPOOL_DATA_DIR?"));
        assert!(
            w[1].contains("SPOOL_LIMITS_MAX_CONNECTIONS")
                && w[1].contains("did you mean SPOOL_LIMITS__MAX_CONNECTIONS?"),
            "{}",
            w[1]
        );
        assert!(w[2].contains("SPOOL_WHATEVER") && !w[2].contains("did you mean"));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(log_colour(true, None));
        assert!(
            log_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None));
    }

    #[test]
    fn non_loopback_needs_opt_in() {
        let mut c = Config {
            listen: "0.0.0.0:7170".parse().unwrap(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        c.allow_non_loopback = true;
        c.validate().unwrap();
        let round: Config = toml::from_str(&Config::default().to_toml()).unwrap();
        assert_eq!(round, Config::default());
    }

    #[test]
    fn idle_timeout_bounds() {
        let with = |idle_timeout_ms, request_timeout_ms| Config {
            limits: LimitsConfig {
                idle_timeout_ms,
                request_timeout_ms,
                max_fetch_wait_ms: 100,
                ..LimitsConfig::default()
            },
            ..Config::default()
        };
        with(1_500, 1_000).validate().unwrap();
        with(MAX_IDLE_TIMEOUT_MS, 30_000).validate().unwrap();
        for (idle, request) in [
            (1_000, 1_000),
            (900, 500),
            (MAX_IDLE_TIMEOUT_MS + 1, 30_000),
        ] {
            let err = with(idle, request).validate().unwrap_err();
            assert!(err.to_string().contains("idle_timeout_ms"), "{err}");
        }
        let defaults = LimitsConfig::default();
        assert!(
            defaults.idle_timeout_ms >= 10 * defaults.request_timeout_ms,
            "comfortably above the longest unary call and fetch wait"
        );
        let c = Config::load(
            None,
            vec![("SPOOL_LIMITS__IDLE_TIMEOUT_MS".into(), "45000".into())],
        )
        .unwrap();
        assert_eq!(c.limits.idle_timeout_ms, 45_000);
    }

    #[test]
    fn zero_ahead_bytes_is_off_or_bounded_and_block_aligned() {
        let with = |n: u64| Config {
            zero_ahead_bytes: n,
            ..Config::default()
        };
        assert!(with(0).validate().is_ok(), "off");
        assert!(with(2 << 20).validate().is_ok());
        assert!(with(256 << 10).validate().is_ok());
        assert!(with(8 << 20).validate().is_ok());
        for bad in [4096, (256 << 10) - 4096, (8 << 20) + 4096, (2 << 20) + 1] {
            assert!(with(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn shipped_example_config_is_valid_and_matches_defaults() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/spoold.toml");
        let c = Config::load(Some(&path), vec![]).unwrap();
        c.validate().unwrap();
        let defaults = Config {
            data_dir: "/var/lib/spool".into(),
            ..Config::default()
        };
        assert_eq!(
            c, defaults,
            "deploy/systemd/spoold.toml documents the defaults"
        );
    }
}
