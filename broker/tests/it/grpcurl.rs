//! The real operator tool against the real broker: grpcurl, through server reflection only
//! (no .proto files), exactly as README's walkthrough uses it.

use std::path::PathBuf;
use std::process::Command;

use crate::common::Spoold;

fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/grpcurl");
    if local.exists() {
        return local;
    }
    if Command::new("grpcurl").arg("-version").output().is_ok() {
        return PathBuf::from("grpcurl");
    }
    panic!(
        "grpcurl not found: run `bash .ci/install-test-tools` (or set GRPCURL=/path/to/grpcurl)"
    );
}

fn call(b: &Spoold, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(grpcurl());
    cmd.arg("-plaintext").args(args);
    let out = cmd.output().expect("running grpcurl");
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}\nspoold:\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.stderr()
    );
    let text = String::from_utf8(out.stdout).unwrap();
    if text.trim().is_empty() || !text.trim_start().starts_with('{') {
        return serde_json::Value::String(text);
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_walkthrough_from_the_readme() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let addr = b.addr.clone();
    let b = tokio::task::spawn_blocking(move || {
        let listed = call(&b, &[&addr, "list"]);
        let listed = listed.as_str().unwrap();
        for svc in ["spool.v1.AdminService", "spool.v1.ProduceService", "spool.v1.ConsumeService", "spool.v1.OffsetService", "grpc.health.v1.Health"] {
            assert!(listed.contains(svc), "{svc} not listed:\n{listed}");
        }
        let created = call(&b, &["-d", r#"{"topic":"prices","partitions":2}"#, &addr, "spool.v1.AdminService/CreateTopic"]);
        assert_eq!(created["config"]["fsyncPolicy"], "FSYNC_POLICY_ALWAYS");
        let produced = call(
            &b,
            &[
                "-d",
                r#"{"partitions":[{"topic":"prices","partition":0,"records":{"records":[{"key":"a2V5","value":"eyJwcmljZSI6MTJ9"},{"value":"eyJwcmljZSI6MTN9"}]}}]}"#,
                &addr,
                "spool.v1.ProduceService/Produce",
            ],
        );
        assert_eq!(produced["results"][0]["lastOffset"], "1", "{produced}");
        let fetched = call(
            &b,
            &["-d", r#"{"partitions":[{"topic":"prices","partition":0,"offset":0}],"decodeRecords":true}"#, &addr, "spool.v1.ConsumeService/Fetch"],
        );
        let recs = fetched["partitions"][0]["records"].as_array().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0]["key"], "a2V5");
        assert_eq!(recs[1]["value"], "eyJwcmljZSI6MTN9");
        let health = call(&b, &["-d", r#"{"service":"spool.v1.ConsumeService"}"#, &addr, "grpc.health.v1.Health/Check"]);
        assert_eq!(health["status"], "SERVING");
        let described = call(&b, &[&addr, "describe", "spool.v1.ProduceService.Produce"]);
        assert!(described.as_str().unwrap().contains("ProduceRequest"));
        b
    })
    .await
    .unwrap();
    b.stop();
}
