//! `spoold gen-dev-certs`: a development CA, a server certificate signed by it and a client
//! certificate for mutual TLS, written as PEM files ready for `[tls]` and the CLI's `--tls-*`
//! flags.
//!
//! The usual `openssl req -x509 -newkey …` one-liner makes a self-signed certificate with
//! `basicConstraints CA:TRUE`, which rustls (rightly) refuses as a server certificate
//! (`CaUsedAsEndEntity`); a real chain of a CA and an end-entity certificate is what rustls
//! and every other TLS stack accept. The files are for development and tests: the CA's key
//! sits beside them, unprotected. Production certificates come from your own PKI.
//!
//! Invariants: existing files are never overwritten unless `force`; private keys are created
//! with mode 0600 (the directory is left as it is).
// Development key material for the operator, not the broker's durable state (which goes
// through the engine's I/O seam): plain std::fs here, allowed for this module only.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files [`generate`] writes, by name inside the directory.
pub const FILES: [&str; 6] = [
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "client.crt",
    "client.key",
];

/// What went wrong generating development certificates.
#[derive(Debug, thiserror::Error)]
pub enum DevCertsError {
    /// A file exists and `force` was not given.
    #[error("{0} exists; remove it, choose another directory, or pass --force to replace it")]
    Exists(PathBuf),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused (e.g. a name that is not a valid DNS name or IP address).
    #[error("making the certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Writes `ca.crt`/`ca.key` (the CA), `server.crt`/`server.key` (valid for `names`: DNS names
/// or IP addresses) and `client.crt`/`client.key` (common name `client`) into `dir`, which is
/// created if missing. Valid from the start of this year for ten years.
pub fn generate(dir: &Path, names: &[String], force: bool) -> Result<(), DevCertsError> {
    if !force {
        for f in FILES {
            let p = dir.join(f);
            if p.exists() {
                return Err(DevCertsError::Exists(p));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| DevCertsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let year = this_year();
    let validity = |p: &mut CertificateParams| {
        p.not_before = rcgen::date_time_ymd(year, 1, 1);
        p.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    // A name of its own: a client given another development CA then hears "unknown issuer",
    // not "bad signature" from a CA of the same name.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("Spool development CA {:x}", stamp & 0xffff_ffff_ffff),
    );
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, "ca.crt", &ca_cert.pem(), false)?;
    write(dir, "ca.key", &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(names.to_vec())?;
    server.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("spoold", String::as_str),
    );
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    let server_cert = server.signed_by(&server_key, &issuer)?;
    write(dir, "server.crt", &server_cert.pem(), false)?;
    write(dir, "server.key", &server_key.serialize_pem(), true)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client.distinguished_name.push(DnType::CommonName, "client");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client);
    let client_cert = client.signed_by(&client_key, &issuer)?;
    write(dir, "client.crt", &client_cert.pem(), false)?;
    write(dir, "client.key", &client_key.serialize_pem(), true)?;
    Ok(())
}

/// The configuration and commands that use the files in `dir`, for the operator to paste.
pub fn usage(dir: &Path, names: &[String]) -> String {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let d = abs.display();
    let host = names.first().map_or("localhost", String::as_str);
    format!(
        "wrote {d}/{{ca,server,client}}.{{crt,key}} (development only: keep ca.key private)\n\
         \n\
         # spoold.toml\n\
         [tls]\n\
         cert = \"{d}/server.crt\"\n\
         key = \"{d}/server.key\"\n\
         client_ca = \"{d}/ca.crt\"        # optional: require client certificates\n\
         \n\
         # the CLI (the server certificate names: {names})\n\
         spool -b {host}:7170 --tls-ca {d}/ca.crt --tls-cert {d}/client.crt --tls-key {d}/client.key topic list\n",
        names = names.join(", "),
    )
}

fn write(dir: &Path, name: &str, pem: &str, private: bool) -> Result<(), DevCertsError> {
    let path = dir.join(name);
    let io = |source| DevCertsError::Io {
        path: path.clone(),
        source,
    };
    // A key replaced with --force keeps no old, wider permissions: remove, then create.
    if path.exists() {
        std::fs::remove_file(&path).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(io)?;
    f.write_all(pem.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The current calendar year (UTC), from the system clock.
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days since 1970-01-01 to a civil year (Howard Hinnant's algorithm, year part only).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let year = yoe + era * 400 + i64::from(mp >= 10);
    i32::try_from(year).unwrap_or(2026)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn writes_a_chain_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        generate(dir.path(), &names, false).unwrap();
        for f in FILES {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{f}");
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            let want = if f.ends_with(".key") { 0o600 } else { 0o644 };
            assert_eq!(mode & 0o777, want, "{f}");
        }
        let err = generate(dir.path(), &names, false).unwrap_err();
        assert!(matches!(err, DevCertsError::Exists(_)), "{err}");
        let before = std::fs::read(dir.path().join("ca.crt")).unwrap();
        generate(dir.path(), &names, true).unwrap();
        assert_ne!(before, std::fs::read(dir.path().join("ca.crt")).unwrap());
        let text = usage(dir.path(), &names);
        assert!(
            text.contains("[tls]") && text.contains("--tls-ca"),
            "{text}"
        );
    }

    #[test]
    fn year() {
        let y = this_year();
        assert!((2024..2200).contains(&y), "{y}");
    }
}
