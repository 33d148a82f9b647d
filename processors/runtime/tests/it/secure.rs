//! A processor reaches a secured broker: TLS with a client certificate (mutual TLS) and a
//! bearer token, from its `[connection]` section, against the real `spoold` configured with
//! `[tls]` and `[[auth.tokens]]`; and one without its token is refused with a clear error.

use std::path::Path;
use std::time::Duration;

use spool_client::{Client, ProducerConfig};
use spool_processor::config::ConnectionConfig;
use spool_testkit::Broker;

use crate::{
    Proc, assert_passthrough_exactly_once, create, passthrough_bin, produce_inputs,
    wait_passthrough_caught_up, write_config,
};

const ADMIN: &str = "admin-token-0123456789abcdef";
const PROCESSOR: &str = "proc-token-0123456789abcdef";
const PARTITIONS: u32 = 2;

/// A broker serving mutual TLS with the certificates in `certs`, and two tokens.
fn secured_broker(certs: &Path) -> Broker {
    let (admin, processor) = (
        spool_testkit::hash_token(ADMIN),
        spool_testkit::hash_token(PROCESSOR),
    );
    let certs = certs.to_owned();
    Broker::start_with_config(move |_| {
        Some(format!(
            r#"
[tls]
cert = "{dir}/server.crt"
key = "{dir}/server.key"
client_ca = "{dir}/ca.crt"

[[auth.tokens]]
name = "ops"
sha256 = "{admin}"
admin = ["*"]
consume = ["*"]
produce = ["*"]
groups = ["*"]

[[auth.tokens]]
name = "passthrough"
sha256 = "{processor}"
admin = ["*"]
consume = ["*"]
produce = ["*"]
groups = ["*"]
"#,
            dir = certs.display()
        ))
    })
}

/// The `[connection]` of a client with the test's client certificate and `token_file`.
fn connection(certs: &Path, token_file: Option<&Path>) -> ConnectionConfig {
    ConnectionConfig {
        tls_ca: Some(certs.join("ca.crt")),
        tls_domain: None,
        tls_cert: Some(certs.join("client.crt")),
        tls_key: Some(certs.join("client.key")),
        token_file: token_file.map(Path::to_owned),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_reaches_a_broker_with_mutual_tls_and_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    spool_testkit::gen_dev_certs(&certs, &["localhost", "127.0.0.1"]);
    let broker = secured_broker(&certs);
    let addr = broker.addr();
    let admin_token = dir.path().join("admin.token");
    std::fs::write(&admin_token, format!("{ADMIN}\n")).unwrap();
    let proc_token = dir.path().join("proc.token");
    std::fs::write(&proc_token, format!("{PROCESSOR}\n")).unwrap();

    let c: Client = connection(&certs, Some(&admin_token))
        .client_builder(&addr)
        .unwrap()
        .connect()
        .await
        .expect("the test's client connects with TLS and its token");
    create(&c, "in", PARTITIONS).await;
    create(&c, "out", PARTITIONS).await;
    let mut produced = Vec::new();
    produce_inputs(&c, ProducerConfig::default(), 500, 7, &mut produced).await;

    // The processor's [connection]: the same CA and client certificate, its own token.
    let conn = format!(
        "[connection]\ntls_ca = \"{ca}\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n",
        ca = certs.join("ca.crt").display(),
        cert = certs.join("client.crt").display(),
        key = certs.join("client.key").display(),
    );
    let body = |token: Option<&Path>| {
        let mut b =
            format!("name = \"passthrough\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n{conn}");
        if let Some(t) = token {
            b.push_str(&format!("token_file = \"{}\"\n", t.display()));
        }
        b.push_str("[app]\noutput = \"out\"\n");
        b
    };
    let state = dir.path().join("state");
    let args = [
        "--instance-id",
        "p0",
        "--state-dir",
        state.to_str().unwrap(),
    ];

    // Without the token: refused, and the processor says so and exits.
    let cfg = write_config(dir.path(), "no-token", &body(None));
    let out = tokio::task::block_in_place(|| run_to_exit(&cfg, &addr, &args));
    eprintln!("without its token: {}", out.1.trim());
    assert!(!out.0, "a processor without its token must not run");
    assert!(
        out.1.to_ascii_lowercase().contains("token")
            || out.1.to_ascii_lowercase().contains("unauthenticated"),
        "the error should name the missing token: {}",
        out.1
    );

    // With it: processes every input exactly once.
    let cfg = write_config(dir.path(), "passthrough", &body(Some(&proc_token)));
    let mut p = Proc::start(&passthrough_bin(), &cfg, &addr, &args);
    assert!(
        p.wait_ready(Duration::from_secs(30)),
        "processor never got ready"
    );
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    let (_, outputs) = assert_passthrough_exactly_once(&c, &produced, PARTITIONS).await;
    assert_eq!(outputs, produced.len());
    assert!(tokio::task::block_in_place(
        || p.terminate(Duration::from_secs(10))
    ));
}

/// Runs the pass-through processor with `config` until it exits (at most 30 s); returns
/// whether it exited 0, and its stderr.
fn run_to_exit(config: &Path, broker: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(passthrough_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SPOOL_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .arg("--config")
        .arg(config)
        .args(["--metrics-listen", "off"])
        .args(args)
        .env("SPOOL_BROKER", broker)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting spool-passthrough");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("waiting").is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("its output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
