//! Which broker to talk to, and how: flags, `SPOOL_*` environment, and a profile file.
//!
//! Precedence, per setting: flag > environment variable > the selected profile > default.
//! The profile file is TOML, `$SPOOL_CLI_CONFIG` or `~/.config/spool/cli.toml`:
//!
//! ```toml
//! default_profile = "prod"
//!
//! [profiles.prod]
//! broker = "spool-1.internal:7170"
//! tls_ca = "/etc/spool/ca.pem"
//! token_file = "/home/me/.config/spool/prod.token"
//! ```
//!
//! Tokens are read from a file or the environment rather than from a flag where possible
//! (flags show up in `ps`); `--token` exists for quick tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use spool_client::{Client, ClientIdentity, DEFAULT_BROKER, TlsOptions};

use crate::exit::{CliResult, usage};

/// Largest profile or token file read.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Connection flags shared by every online command, under their own heading in `--help`.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Connection")]
pub(crate) struct ConnArgs {
    /// Broker address HOST:PORT [default: 127.0.0.1:7170].
    #[arg(long, short = 'b', env = "SPOOL_BROKER", global = true)]
    broker: Option<String>,
    /// Profile to use from the profile file.
    #[arg(long, env = "SPOOL_PROFILE", global = true)]
    profile: Option<String>,
    /// PEM file of the CA that signed the broker's certificate; turns TLS on.
    #[arg(long, env = "SPOOL_TLS_CA", global = true, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// Name to check the broker's certificate against [default: the broker's host].
    #[arg(long, env = "SPOOL_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "SPOOL_TLS_CERT", global = true, value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "SPOOL_TLS_KEY", global = true, value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Bearer token (prefer SPOOL_TOKEN or --token-file: flags are visible in `ps`).
    #[arg(long, env = "SPOOL_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (first line).
    #[arg(long, env = "SPOOL_TOKEN_FILE", global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Per-request timeout, e.g. 30s [default: 30s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
}

/// One profile of the profile file; every field optional.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Profile {
    broker: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_domain: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    default_profile: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

/// A duration flag, in the one grammar of every Spool command line (`spool_loadgen::units`).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    spool_loadgen::units::parse_duration(s)
}

fn profile_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPOOL_CLI_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("spool").join("cli.toml"))
}

fn read_small(path: &Path) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= MAX_CONFIG_FILE,
        "{} is {len} bytes; the limit is {MAX_CONFIG_FILE}",
        path.display()
    );
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

impl ConnArgs {
    /// The profile selected (by flag/env, else the file's default), or an empty one.
    fn profile(&self) -> CliResult<Profile> {
        let Some(path) = profile_path() else {
            return Ok(Profile::default());
        };
        if !path.exists() {
            if let Some(name) = &self.profile {
                return Err(usage(format!(
                    "profile {name:?} asked for, but {} does not exist",
                    path.display()
                )));
            }
            return Ok(Profile::default());
        }
        let text = read_small(&path)?;
        let file: ProfileFile =
            toml::from_str(&text).map_err(|e| usage(format!("{}: {e}", path.display())))?;
        let name = self.profile.clone().or(file.default_profile);
        match name {
            None => Ok(Profile::default()),
            Some(name) => file.profiles.get(&name).cloned().ok_or_else(|| {
                usage(format!(
                    "no profile {name:?} in {} (it has: {})",
                    path.display(),
                    file.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            }),
        }
    }

    /// The bearer token from the flags, the environment or the profile, if any: for commands
    /// that open connections of their own besides [`ConnArgs::connect`]'s (`spool bench`).
    pub(crate) fn token(&self) -> CliResult<Option<String>> {
        self.token_from(&self.profile()?)
    }

    fn token_from(&self, p: &Profile) -> CliResult<Option<String>> {
        Ok(match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(first_line(f)?),
            (None, None) => match (&p.token, &p.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(f)) => Some(first_line(f)?),
                (None, None) => None,
            },
        })
    }

    /// Connects, failing fast (exit 3) when the broker is not reachable.
    pub(crate) async fn connect(&self) -> CliResult<Client> {
        let p = self.profile()?;
        let token = self.token_from(&p)?;
        let addr = self
            .broker
            .clone()
            .or(p.broker)
            .unwrap_or_else(|| DEFAULT_BROKER.to_owned());
        let mut b = Client::builder(addr).connect_timeout(Duration::from_secs(5));
        if let Some(t) = self.timeout {
            b = b.request_timeout(t);
        }
        let ca = self.tls_ca.clone().or(p.tls_ca);
        let cert = self.tls_cert.clone().or(p.tls_cert);
        let key = self.tls_key.clone().or(p.tls_key);
        if let Some(ca) = ca {
            let identity = match (cert, key) {
                (Some(c), Some(k)) => Some(ClientIdentity {
                    cert_pem: std::fs::read(&c)
                        .with_context(|| format!("reading {}", c.display()))?,
                    key_pem: std::fs::read(&k)
                        .with_context(|| format!("reading {}", k.display()))?,
                }),
                (None, None) => None,
                _ => return Err(usage("--tls-cert and --tls-key go together")),
            };
            b = b.tls(TlsOptions {
                ca_pem: std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?,
                domain: self.tls_domain.clone().or(p.tls_domain),
                identity,
            });
        } else if cert.is_some() || key.is_some() {
            return Err(usage("--tls-cert/--tls-key need --tls-ca"));
        }
        if let Some(t) = token {
            b = b.bearer_token(&t);
        }
        Ok(b.connect().await?)
    }
}

fn first_line(path: &Path) -> CliResult<String> {
    let text = read_small(path)?;
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("-1h").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
