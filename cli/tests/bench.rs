//! `spool bench` against the real `spoold`: short runs with small records. They check that the
//! commands work and report sane numbers, never how fast anything is.

mod common;

use common::{Broker, spool};

fn report(out: &str) -> serde_json::Value {
    let mut lines = out.lines();
    let v: serde_json::Value = serde_json::from_str(lines.next().expect("a JSON line")).unwrap();
    assert_eq!(lines.next(), None, "one JSON object: {out}");
    v
}

#[track_caller]
fn check(v: &serde_json::Value, latency: bool) {
    assert!(v["records"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["records_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["mb_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    if latency {
        let l = &v["latency"];
        let f = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("no {k}: {v}"));
        assert!(l["count"].as_u64().unwrap() > 0, "{v}");
        let (p50, p99, p999, max) = (f("p50_us"), f("p99_us"), f("p999_us"), f("max_us"));
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{v}");
        // HdrHistogram percentiles are bucket values (3 significant digits).
        assert!(p999 <= max * 1.01 && max < 60e6, "{v}");
    } else {
        assert!(v["latency"].is_null(), "{v}");
    }
}

const SHORT: &[&str] = &[
    "--record-size",
    "100",
    "--batch-bytes",
    "16384",
    "--duration",
    "0m1s",
    "--warmup",
    "200ms",
];

fn args<'a>(cmd: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["bench", cmd, "--json"];
    v.extend_from_slice(SHORT);
    v.extend_from_slice(extra);
    v
}

#[test]
fn produce_consume_and_e2e_report_sane_numbers() {
    let broker = Broker::start();

    // Closed loop, two producers, keyed, a topic created by the bench.
    let out = spool(
        &broker,
        &args(
            "produce",
            &[
                "--topic",
                "b",
                "--partitions",
                "2",
                "--producers",
                "2",
                "--keyed",
                "--acks",
                "durable",
            ],
        ),
    )
    .ok();
    let v = report(&out);
    check(&v, true);
    assert_eq!(v["config"]["mode"], "produce");
    assert_eq!(v["config"]["topic"], "b");
    assert_eq!(v["config"]["keyed"], true);
    assert_eq!(v["config"]["acks"], "durable");
    assert!(v["config"]["rate"].is_null());
    // Durations are plain numbers with the unit in the key.
    assert_eq!(v["config"]["duration_ms"], 1000.0);
    assert_eq!(v["config"]["warmup_ms"], 200.0);
    assert!(v["config"]["linger_ms"].is_number(), "{}", v["config"]);

    // Open loop at a fixed rate, compressed, linger given.
    let v = report(
        &spool(
            &broker,
            &args(
                "produce",
                &["--topic", "b", "--rate", "2000/s", "--compression", "lz4"],
            ),
        )
        .ok(),
    );
    check(&v, true);
    assert_eq!(v["config"]["rate"], 2000.0);

    // Catch-up read of what is there (the bench preloads up to --preload-bytes first).
    let v = report(
        &spool(
            &broker,
            &args(
                "consume",
                &[
                    "--topic",
                    "c",
                    "--preload-bytes",
                    "200000",
                    "--consumers",
                    "1",
                ],
            ),
        )
        .ok(),
    );
    check(&v, false);

    let v = report(
        &spool(
            &broker,
            &args(
                "e2e",
                &["--topic", "e", "--rate", "1000", "--linger-ms", "2"],
            ),
        )
        .ok(),
    );
    check(&v, true);

    // The text report is one line with the figures.
    let run = spool(
        &broker,
        &[
            "bench",
            "produce",
            "--topic",
            "b",
            "--duration",
            "300ms",
            "--warmup",
            "0",
            "--record-size",
            "64",
            "--batch-bytes",
            "8192",
        ],
    );
    let out = run.ok();
    assert!(
        out.contains("MB/s") && out.contains("records/s") && out.contains("p99.9"),
        "{out}"
    );
}

#[test]
fn usage_errors_and_unreachable_broker() {
    let broker = Broker::start();
    // e2e is open loop only.
    let run = spool(&broker, &["bench", "e2e", "--rate", "max"]).expect(2);
    assert!(run.stderr.contains("needs --rate"), "{}", run.stderr);
    spool(&broker, &["bench", "produce", "--rate", "-5"]).expect(2);
    spool(&broker, &["bench", "produce", "--duration", "soon"]).expect(2);
    // Nothing listens there: exit 3, as for every online command.
    spool(
        &broker,
        &[
            "bench",
            "produce",
            "--broker",
            "127.0.0.1:1",
            "--duration",
            "1",
        ],
    )
    .expect(3);
}

#[test]
fn a_broker_with_tokens_is_reached_with_the_cli_token() {
    const TOKEN: &str = "bench-token-0123456789abcdef";
    let broker = Broker::start_with_config(|_| {
        Some(format!(
            r#"
[[auth.tokens]]
name = "ops"
sha256 = "{}"
admin = ["*"]
consume = ["*"]
produce = ["*"]
"#,
            spool_testkit::hash_token(TOKEN)
        ))
    });
    // Without the token the broker refuses: exit 4.
    spool(&broker, &args("produce", &["--topic", "t"])).expect(4);
    // With it (from the environment, as for every command), every connection of the run
    // carries it: the admin calls and each producer's and consumer's own stream.
    let mut c = common::cmd(&broker, &args("e2e", &["--topic", "t", "--rate", "500"]));
    let out = c.env("SPOOL_TOKEN", TOKEN).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&report(&String::from_utf8(out.stdout).unwrap()), true);
}
