//! A processor binary's configuration: defaults < TOML file < `SPOOL_*` environment < flags,
//! the same layering as `spoold` (see `broker/src/config.rs`).
//!
//! Unknown keys are rejected, except inside `[app]`, which belongs to the processor (it
//! parses it with [`ProcessorConfig::app`], into its own type, which should reject unknown
//! keys itself). An environment variable is an override when its name after `SPOOL_` names a
//! top-level key (`SPOOL_BROKER`) or a section and key (`SPOOL_COMMIT__INTERVAL_MS`,
//! `SPOOL_APP__MIN_DROP_PERCENT`); other `SPOOL_*` variables are left alone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::effects::EffectsRetention;
use crate::engine::RetryPolicy;
use crate::flow::{LaneConfig, LaneYield};
use crate::runtime::RuntimeConfig;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid processor configuration: {0}")]
pub struct ConfigError(pub String);

/// Everything a processor binary is configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessorConfig {
    /// The processor's name: its consumer group, transactional ids, changelog
    /// (`<name>.changelog`) and dead-letter topics (`<input>.<name>.dlq`).
    pub name: String,
    /// The broker (`host:port`).
    pub broker: String,
    /// How to reach a broker that requires TLS and/or a bearer token (`[connection]`).
    pub connection: ConnectionConfig,
    /// Input topics.
    pub inputs: Vec<String>,
    /// Output topics (created if missing; prefixed in replay mode).
    pub outputs: Vec<String>,
    /// Stable id of this instance; empty: the host name.
    pub instance_id: String,
    /// Local state directory; empty: `$STATE_DIRECTORY` (systemd's `StateDirectory=`), else
    /// `./spool-processor-state/<name>`.
    pub state_dir: PathBuf,
    /// Prometheus `/metrics` and `/health`; absent: off.
    pub metrics_listen: Option<SocketAddr>,
    /// Tokio worker threads (0: one per core).
    pub runtime_threads: usize,
    /// Transaction cadence.
    pub commit: CommitConfig,
    /// Local state stores.
    pub state: StateConfig,
    /// Group membership and transactions.
    pub group: GroupSettings,
    /// Flow control beyond lanes (`[flow]`).
    pub flow: FlowSettings,
    /// Retries and dead letters.
    pub retry: RetryPolicy,
    /// How long idempotency keys of external effects are kept.
    pub effects: EffectsRetention,
    /// Priority lanes, throttles and quiet hours (`[[lanes]]`).
    pub lanes: Vec<LaneConfig>,
    /// Inputs read as tables: a task reads its partitions of these up to where they ended
    /// before it handles a record of another input (see [`RuntimeConfig::tables`]).
    pub tables: Vec<String>,
    /// Go on when an input gains partitions, growing the changelog, dead-letter and retry
    /// topics to match (default false: the processor stops with an error, as Kafka Streams
    /// does). Keyed state does not follow its keys to their new partitions: set it only for
    /// a processor without keyed state, or whose keys may start again empty
    /// ([`RuntimeConfig::allow_input_growth`]).
    pub allow_input_growth: bool,
    /// The processor's own settings (free-form; see [`ProcessorConfig::app`]).
    pub app: toml::Table,
}

/// How a processor reaches a secured broker: its `[tls]` (with a client certificate for
/// mutual TLS) and a bearer token of its `[[auth.tokens]]`. Paths, not secrets: the token is
/// read from a file (systemd's `LoadCredential=` puts it in `$CREDENTIALS_DIRECTORY`), never
/// from the configuration or a flag, which `--print-config` and `ps` would show. Files are
/// read at start, each at most [`MAX_SECRET_FILE`] bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionConfig {
    /// PEM bundle of the CA(s) that signed the broker's certificate; set: TLS.
    pub tls_ca: Option<PathBuf>,
    /// Name checked against the broker's certificate; default: the broker address's host.
    pub tls_domain: Option<String>,
    /// Client certificate (PEM) for a broker that requires mutual TLS; with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// File whose first line is the bearer token sent with every request.
    pub token_file: Option<PathBuf>,
}

/// Largest certificate, key or token file read.
pub const MAX_SECRET_FILE: u64 = 1 << 20;

impl ConnectionConfig {
    /// Checks the combination: a client certificate needs its key and TLS.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError(
                "connection: tls_cert and tls_key go together".into(),
            ));
        }
        if self.tls_ca.is_none() && (self.tls_cert.is_some() || self.tls_domain.is_some()) {
            return Err(ConfigError(
                "connection: tls_cert, tls_key and tls_domain need tls_ca".into(),
            ));
        }
        Ok(())
    }

    /// A client builder for `broker` with these settings (files read now).
    pub fn client_builder(&self, broker: &str) -> Result<spool_client::ClientBuilder, ConfigError> {
        let mut b = spool_client::Client::builder(broker);
        if let Some(ca) = &self.tls_ca {
            let identity = match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(spool_client::ClientIdentity {
                    cert_pem: read_secret(cert)?,
                    key_pem: read_secret(key)?,
                }),
                _ => None,
            };
            b = b.tls(spool_client::TlsOptions {
                ca_pem: read_secret(ca)?,
                domain: self.tls_domain.clone(),
                identity,
            });
        }
        if let Some(path) = &self.token_file {
            let text = String::from_utf8(read_secret(path)?)
                .map_err(|_| ConfigError(format!("{}: not UTF-8", path.display())))?;
            let token = text.lines().next().unwrap_or_default().trim();
            spool_client::BearerToken::new(token)
                .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
            b = b.bearer_token(token);
        }
        Ok(b)
    }
}

/// Reads a certificate, key or token file of at most [`MAX_SECRET_FILE`] bytes.
fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
    let mut buf = Vec::new();
    f.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
    if buf.len() as u64 > MAX_SECRET_FILE {
        return Err(ConfigError(format!(
            "{} is over {MAX_SECRET_FILE} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

/// When transactions commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommitConfig {
    /// At least this often while there is work (ms): the bound on a transaction's age under
    /// load.
    pub interval_ms: u64,
    /// Commit as soon as no input has arrived for this long (ms; default 2), like a
    /// producer's `linger.ms`: a trickle of inputs is committed (and visible downstream)
    /// within about linger + one commit instead of waiting for the interval, while a
    /// continuous flow still commits once per interval. 0 = as soon as the input is drained;
    /// `>= interval_ms` = only on the interval.
    pub linger_ms: u64,
    /// After this many inputs (default 100 000: a bound for very fast inputs; at the default
    /// the interval decides, as in Kafka Streams).
    pub max_records: usize,
    /// When buffered state writes reach this many bytes (also the bound on outputs held
    /// while a commit is in flight).
    pub max_txn_bytes: usize,
    /// Go on handling records while a transaction commits (default true); false: wait for
    /// every commit ([`RuntimeConfig::overlap_commits`]).
    pub overlap: bool,
    /// Full 1 MiB output batches written at once, each of a different partition (default 4;
    /// [`RuntimeConfig::output_writes_in_flight`]).
    pub writes_in_flight: usize,
}

/// Local state stores.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Page cache per partition (bytes).
    pub cache_bytes: usize,
    /// Committed writes per partition buffered before one local apply (bytes).
    pub apply_bytes: usize,
    /// Values read from the local store kept in memory per partition (bytes; 0: none).
    pub read_cache_bytes: usize,
    /// How often local stores are fsynced (ms).
    pub durable_interval_ms: u64,
}

/// Flow control beyond lanes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowSettings {
    /// Records set aside for partitions held back (restoring, or holding a record not due
    /// yet) while their lane's stream goes on for the others (bytes; default 8 MiB; 0: such
    /// a partition is paused in the consumer at once, reopening its lane's stream). See
    /// [`RuntimeConfig::max_parked_bytes`].
    pub max_parked_bytes: usize,
    /// Lower lanes yield the loop to a higher lane that handled a record within this long
    /// (ms; default 250; 0: off, priorities then order records only). See
    /// [`RuntimeConfig::lane_yield`] and `crate::flow`.
    pub yield_window_ms: u64,
    /// While yielding, a lane gets its `min_share` of the loop's time in each period of this
    /// length (ms; default 10; 1..=1000).
    pub yield_period_ms: u64,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            max_parked_bytes: 8 << 20,
            yield_window_ms: 250,
            yield_period_ms: 10,
        }
    }
}

/// Group membership and transactions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupSettings {
    /// Session timeout (ms).
    pub session_timeout_ms: u64,
    /// Transaction timeout (ms).
    pub transaction_timeout_ms: u64,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            name: String::new(),
            broker: spool_client::DEFAULT_BROKER.to_owned(),
            connection: ConnectionConfig::default(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            instance_id: String::new(),
            state_dir: PathBuf::new(),
            metrics_listen: None,
            runtime_threads: 0,
            commit: CommitConfig::default(),
            state: StateConfig::default(),
            group: GroupSettings::default(),
            flow: FlowSettings::default(),
            retry: RetryPolicy::default(),
            effects: EffectsRetention::default(),
            lanes: Vec::new(),
            tables: Vec::new(),
            allow_input_growth: false,
            app: toml::Table::new(),
        }
    }
}

impl Default for CommitConfig {
    fn default() -> Self {
        CommitConfig {
            interval_ms: 100,
            linger_ms: 2,
            max_records: 100_000,
            max_txn_bytes: 32 << 20,
            overlap: true,
            writes_in_flight: 4,
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            cache_bytes: 8 << 20,
            apply_bytes: 16 << 20,
            read_cache_bytes: 16 << 20,
            durable_interval_ms: 5_000,
        }
    }
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            session_timeout_ms: 10_000,
            transaction_timeout_ms: 30_000,
        }
    }
}

impl ProcessorConfig {
    /// Defaults, then the TOML file (if any), then `SPOOL_*` variables of `env`.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ProcessorConfig, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?
            }
            None => toml::Table::new(),
        };
        let mut known = toml::Table::try_from(ProcessorConfig::default())
            .map_err(|e| ConfigError(e.to_string()))?;
        known.insert("metrics_listen".into(), toml::Value::String(String::new()));
        known.insert("app".into(), toml::Value::Table(toml::Table::new()));
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("SPOOL_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if !known.contains_key(&path[0]) {
                continue;
            }
            let parsed = env_value(&path[0], &value);
            let mut cursor = &mut table;
            for key in &path[..path.len() - 1] {
                cursor = cursor
                    .entry(key.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| ConfigError(format!("{name}: {key} is not a section")))?;
            }
            cursor.insert(path[path.len() - 1].clone(), parsed);
        }
        table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(e.to_string()))
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 200
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !name_ok(&self.name) {
            return Err(ConfigError(format!(
                "name {:?}: 1..=200 characters of [A-Za-z0-9._-]",
                self.name
            )));
        }
        if self.inputs.is_empty() {
            return Err(ConfigError("inputs: at least one input topic".into()));
        }
        if !self.instance_id.is_empty() && !name_ok(&self.instance_id) {
            return Err(ConfigError(format!(
                "instance_id {:?}: characters of [A-Za-z0-9._-]",
                self.instance_id
            )));
        }
        if self.commit.interval_ms == 0
            || self.commit.max_records == 0
            || self.commit.max_txn_bytes < 1024
            || !(1..=64).contains(&self.commit.writes_in_flight)
        {
            return Err(ConfigError(
                "commit: interval_ms and max_records > 0, max_txn_bytes >= 1024, writes_in_flight 1..=64"
                    .into(),
            ));
        }
        if self.state.cache_bytes < 64 << 10 || self.state.durable_interval_ms == 0 {
            return Err(ConfigError(
                "state: cache_bytes >= 64 KiB, durable_interval_ms > 0".into(),
            ));
        }
        if self.group.session_timeout_ms < 100 || self.group.transaction_timeout_ms < 1000 {
            return Err(ConfigError(
                "group: session_timeout_ms >= 100, transaction_timeout_ms >= 1000".into(),
            ));
        }
        if !(1..=1000).contains(&self.flow.yield_period_ms) || self.flow.yield_window_ms > 3_600_000
        {
            return Err(ConfigError(
                "flow: yield_period_ms 1..=1000, yield_window_ms at most an hour (0: off)".into(),
            ));
        }
        self.connection.validate()?;
        self.retry.validate().map_err(ConfigError)?;
        self.effects.validate().map_err(ConfigError)?;
        if let Some(t) = self.tables.iter().find(|t| !self.inputs.contains(t)) {
            return Err(ConfigError(format!("tables: {t} is not an input")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for l in &self.lanes {
            l.validate().map_err(ConfigError)?;
            for t in &l.topics {
                if !self.inputs.contains(t) || !seen.insert(t.clone()) {
                    return Err(ConfigError(format!(
                        "lane {}: topic {t} must be an input and in one lane only",
                        l.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The processor's own settings (`[app]`), as its type.
    pub fn app<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        self.app
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(format!("[app]: {e}")))
    }

    /// The effective configuration as TOML (`--print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    /// The instance id in force (the host name when not set).
    pub fn effective_instance_id(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let clean: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if clean.is_empty() { "0".into() } else { clean }
    }

    /// The state directory in force.
    pub fn effective_state_dir(&self) -> PathBuf {
        if !self.state_dir.as_os_str().is_empty() {
            return self.state_dir.clone();
        }
        match std::env::var_os("STATE_DIRECTORY") {
            // systemd may pass several, colon-separated: the first is ours.
            Some(d) => PathBuf::from(
                d.to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            None => PathBuf::from("./spool-processor-state").join(&self.name),
        }
    }

    /// Connects to the broker as `[connection]` says.
    pub async fn connect(&self) -> anyhow::Result<spool_client::Client> {
        use anyhow::Context;
        self.connection
            .client_builder(&self.broker)?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.broker))
    }

    /// The runtime settings this configuration describes.
    pub fn runtime_config(&self) -> RuntimeConfig {
        let mut r = RuntimeConfig::new(self.name.clone(), self.inputs.clone());
        r.outputs = self.outputs.clone();
        r.instance_id = self.effective_instance_id();
        r.state_dir = self.effective_state_dir();
        r.commit_interval = Duration::from_millis(self.commit.interval_ms);
        r.commit_linger = Duration::from_millis(self.commit.linger_ms);
        r.commit_max_records = self.commit.max_records;
        r.max_txn_bytes = self.commit.max_txn_bytes;
        r.overlap_commits = self.commit.overlap;
        r.output_writes_in_flight = self.commit.writes_in_flight.max(1);
        r.cache_bytes = self.state.cache_bytes;
        r.apply_bytes = self.state.apply_bytes;
        r.read_cache_bytes = self.state.read_cache_bytes;
        r.max_parked_bytes = self.flow.max_parked_bytes;
        r.lane_yield = (self.flow.yield_window_ms > 0).then(|| LaneYield {
            active_window: Duration::from_millis(self.flow.yield_window_ms),
            period: Duration::from_millis(self.flow.yield_period_ms),
        });
        r.durable_interval = Duration::from_millis(self.state.durable_interval_ms);
        r.session_timeout = Duration::from_millis(self.group.session_timeout_ms);
        r.transaction_timeout = Duration::from_millis(self.group.transaction_timeout_ms);
        r.retry = self.retry.clone();
        r.effects_retention = self.effects;
        r.lanes = self.lanes.clone();
        r.tables = self.tables.clone();
        r.allow_input_growth = self.allow_input_growth;
        r
    }
}

/// An environment value: a TOML value if it parses as one (numbers, booleans, arrays), else
/// a string.
fn env_value(key: &str, v: &str) -> toml::Value {
    if let Ok(i) = v.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match v {
        "true" => return toml::Value::Boolean(true),
        "false" => return toml::Value::Boolean(false),
        _ => {}
    }
    if matches!(key, "inputs" | "outputs" | "tables") {
        return toml::Value::Array(
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.trim().to_owned()))
                .collect(),
        );
    }
    toml::Value::String(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layering_unknown_keys_and_app_section() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.toml");
        std::fs::write(
            &f,
            "name = \"deals\"\ninputs = [\"prices\"]\n[commit]\ninterval_ms = 50\n[app]\nmin_drop = 20\n",
        )
        .unwrap();
        let env = vec![
            ("SPOOL_COMMIT__INTERVAL_MS".to_owned(), "25".to_owned()),
            ("SPOOL_BROKER".to_owned(), "127.0.0.1:9".to_owned()),
            ("SPOOL_LOG".to_owned(), "debug".to_owned()),
            ("SPOOL_OUTPUTS".to_owned(), "a,b".to_owned()),
            ("SPOOL_APP__REGION".to_owned(), "eu".to_owned()),
        ];
        let c = ProcessorConfig::load(Some(&f), env).unwrap();
        c.validate().unwrap();
        assert_eq!(c.commit.interval_ms, 25, "env beats file");
        assert_eq!(c.broker, "127.0.0.1:9");
        assert_eq!(c.outputs, vec!["a".to_owned(), "b".to_owned()]);
        #[derive(Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct App {
            min_drop: u32,
            region: String,
        }
        assert_eq!(
            c.app::<App>().unwrap(),
            App {
                min_drop: 20,
                region: "eu".into()
            }
        );
        std::fs::write(&f, "name = \"x\"\ninputs = [\"a\"]\ncomit = 1\n").unwrap();
        let e = ProcessorConfig::load(Some(&f), vec![]).unwrap_err();
        assert!(e.to_string().contains("comit"), "{e}");
        let e = ProcessorConfig::load(None, vec![("SPOOL_COMMIT__NOPE".into(), "1".into())])
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let round: ProcessorConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(round, c);
        let tables = ProcessorConfig {
            inputs: vec!["deals".into(), "settings".into()],
            tables: vec!["settings".into()],
            ..c.clone()
        };
        tables.validate().unwrap();
        assert_eq!(tables.runtime_config().tables, vec!["settings".to_owned()]);
        let e = ProcessorConfig {
            tables: vec!["elsewhere".into()],
            ..tables
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("elsewhere is not an input"), "{e}");
        // The yield's ranges: period 1..=1000 ms, window at most an hour, 0 turns it off.
        for (window, period, ok) in [
            (250, 10, true),
            (0, 10, true),
            (3_600_000, 1000, true),
            (5, 10, true),
            (250, 0, false),
            (250, 1001, false),
            (3_600_001, 10, false),
        ] {
            let mut y = c.clone();
            y.flow.yield_window_ms = window;
            y.flow.yield_period_ms = period;
            assert_eq!(y.validate().is_ok(), ok, "window {window}, period {period}");
            if ok {
                let r = y.runtime_config().lane_yield;
                assert_eq!(r.is_some(), window > 0, "window {window}");
                if let Some(r) = r {
                    assert_eq!(r.active_window, Duration::from_millis(window));
                    assert_eq!(r.period, Duration::from_millis(period));
                }
            }
        }
        let bad = ProcessorConfig {
            name: "has space".into(),
            ..c
        };
        assert!(bad.validate().is_err());
    }
}
