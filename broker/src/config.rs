//! `spoold` configuration: defaults < TOML file < `SPOOL_*` environment < command-line flags.
//!
//! Unknown keys in the file are rejected. An environment variable is taken as an override when
//! its name, after `SPOOL_`, names a top-level key (`SPOOL_DATA_DIR`) or a section
//! (`SPOOL_LIMITS__MAX_CONNECTIONS`, `__` separating section and key); within a section an
//! unknown key is rejected. Other `SPOOL_*` variables (the CLI's `SPOOL_BROKER`, …) are not
//! the broker's and are left alone.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use spool_log_engine::{FsyncPolicy, TopicConfig};

use crate::error::ConfigError;

/// Default gRPC port.
pub const DEFAULT_PORT: u16 = 7170;
/// Default metrics port.
pub const DEFAULT_METRICS_PORT: u16 = 7171;
/// Longest `limits.idle_timeout_ms` (a day).
pub const MAX_IDLE_TIMEOUT_MS: u64 = 86_400_000;

/// Everything `spoold` can be configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the log.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; absent disables metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Listening on a non-loopback address requires saying so explicitly (until TLS and
    /// tokens exist, anything beyond loopback is unauthenticated).
    pub allow_non_loopback: bool,
    /// Tokio worker threads; 0 means one per core.
    pub runtime_threads: usize,
    /// Longest time a graceful shutdown waits for in-flight requests and streams.
    pub shutdown_timeout_ms: u64,
    /// How often retention runs over every partition.
    pub retention_check_interval_ms: u64,
    /// How often the log cleaner looks for compacted partitions to clean.
    pub cleaner_check_interval_ms: u64,
    /// Memory of the log cleaner's key map (24 bytes per key; a pass over more distinct keys
    /// cleans part of the partition and the next pass goes on).
    pub cleaner_dedupe_buffer_bytes: u64,
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
    /// Largest gRPC message accepted or sent (tonic's decode and encode limits).
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
    /// Partitions in one produce, fetch or subscribe request.
    pub max_partitions_per_request: usize,
    /// Records in one `RecordList`.
    pub max_records_per_request: usize,
    /// Time limit of a unary request.
    pub request_timeout_ms: u64,
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
            shutdown_timeout_ms: 10_000,
            retention_check_interval_ms: 60_000,
            cleaner_check_interval_ms: 15_000,
            cleaner_dedupe_buffer_bytes: 64 << 20,
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
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!("reading {}: {e}", path.display()))
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        let known = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
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
mod tests {
    use super::*;

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
        let err = Config::load(None, vec![("SPOOL_LIMITS__NOPE".into(), "1".into())]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
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
