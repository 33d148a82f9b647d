//! What the CLI says when it cannot talk to the broker: the address, the cause, and what to
//! do for the usual mistakes (nothing listening, a certificate for other names, a CA
//! certificate as server certificate, TLS against plaintext and back, no client certificate
//! for mutual TLS); and `spoold gen-dev-certs` making certificates that work.

mod common;

use common::Broker;

/// A broker serving TLS with `server.crt`/`server.key` from `certs`, and with `client_ca` when
/// `mutual`.
fn tls_broker(certs: &std::path::Path, mutual: bool) -> Broker {
    let certs = certs.to_owned();
    Broker::start_with_config(move |_| {
        let mut toml = format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            certs.join("server.crt").display(),
            certs.join("server.key").display()
        );
        if mutual {
            toml.push_str(&format!(
                "client_ca = \"{}\"\n",
                certs.join("ca.crt").display()
            ));
        }
        Some(toml)
    })
}

/// Runs `spool -b BROKER args…` (no TLS unless the args say so); returns (code, stderr).
fn spool(broker: &str, args: &[&str]) -> (i32, String) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_spool"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SPOOL_") {
            c.env_remove(k);
        }
    }
    let out = c
        .env("SPOOL_CLI_CONFIG", "/nonexistent/spool-cli.toml")
        .env("SPOOL_BROKER", broker)
        .args(args)
        .output()
        .expect("running spool");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refused_connections_name_the_address_and_the_cause() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, err) = spool(&format!("127.0.0.1:{port}"), &["topic", "list"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!("cannot connect to 127.0.0.1:{port}"))
            && err.contains("Connection refused")
            && !err.contains("transport error"),
        "{err}"
    );
}

#[test]
fn tls_mistakes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let usage = spool_testkit::gen_dev_certs(&certs, &["localhost", "127.0.0.1"]);
    assert!(usage.contains("[tls]"), "{usage}");
    let b = tls_broker(&certs, true);
    let at = |host: &str| format!("{host}:{}", b.port());
    let ca = certs.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let cert = certs.join("client.crt");
    let key = certs.join("client.key");
    let mtls = [
        "--tls-ca",
        ca,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];

    // The generated chain works, by name and by address.
    for host in ["localhost", "127.0.0.1"] {
        let (code, err) = spool(&at(host), &[&mtls[..], &["topic", "list"]].concat());
        assert_eq!(code, 0, "{host}: {err}");
    }
    // A name the certificate does not have.
    let (code, err) = spool(
        &at("127.0.0.1"),
        &[&mtls[..], &["--tls-domain", "example.com", "topic", "list"]].concat(),
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("not valid for name \"example.com\"") && err.contains("--tls-domain"),
        "{err}"
    );
    // No client certificate where the broker wants one.
    let (code, err) = spool(&at("localhost"), &["--tls-ca", ca, "topic", "list"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&at("localhost")) && err.contains("--tls-cert"),
        "{err}"
    );
    // Plaintext against the TLS port.
    let (code, err) = spool(&at("127.0.0.1"), &["topic", "list"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&at("127.0.0.1")) && err.contains("may be serving TLS"),
        "{err}"
    );
    // A CA the broker's certificate does not come from.
    let other = dir.path().join("other");
    spool_testkit::gen_dev_certs(&other, &["localhost"]);
    let other_ca = other.join("ca.crt");
    let (code, err) = spool(
        &at("localhost"),
        &["--tls-ca", other_ca.to_str().unwrap(), "topic", "list"],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("UnknownIssuer") && err.contains("--tls-ca"),
        "{err}"
    );

    // TLS against a plaintext broker.
    let plain = Broker::start();
    let (code, err) = spool(
        &format!("localhost:{}", plain.port()),
        &["--tls-ca", ca, "topic", "list"],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("does not seem to speak TLS"), "{err}");
}

#[test]
fn a_ca_certificate_as_server_certificate_is_named() {
    // What `openssl req -x509 -newkey … -subj /CN=localhost` makes: self-signed, CA:TRUE.
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    let b = tls_broker(dir.path(), false);
    let ca = dir.path().join("server.crt");
    let (code, err) = spool(
        &format!("localhost:{}", b.port()),
        &["--tls-ca", ca.to_str().unwrap(), "topic", "list"],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("CaUsedAsEndEntity")
            && err.contains("CA:TRUE")
            && err.contains("gen-dev-certs"),
        "{err}"
    );
}
