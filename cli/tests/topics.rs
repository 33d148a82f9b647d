//! `spool topic …` against a real spoold: every subcommand, its table and JSON output (golden
//! files under snapshots/), and the exit codes of the ways it fails.

mod common;

use common::{Broker, cmd, spool};

#[test]
fn topic_lifecycle() {
    let b = Broker::start();
    let out = spool(
        &b,
        &[
            "topic",
            "create",
            "prices",
            "-p",
            "3",
            "-c",
            "retention.ms=7d",
            "-c",
            "segment.bytes=1048576",
            "-c",
            "fsync=interval:200",
        ],
    )
    .ok();
    assert_eq!(out, "created topic prices with 3 partition(s)\n");
    spool(&b, &["topic", "create", "alerts"]).ok();

    insta::assert_snapshot!("list", spool(&b, &["topic", "list"]).ok());
    insta::assert_snapshot!("list_all", spool(&b, &["topic", "ls", "--all"]).ok());
    let json: serde_json::Value =
        serde_json::from_str(&spool(&b, &["topic", "list", "--json"]).ok()).unwrap();
    assert_eq!(json[1]["topic"], "prices");
    assert_eq!(json[1]["partitions"], 3);

    spool(&b, &["produce", "prices/1", "--linger", "1s", "a", "b"]).ok();
    insta::assert_snapshot!("describe", spool(&b, &["topic", "describe", "prices"]).ok());
    let d: serde_json::Value =
        serde_json::from_str(&spool(&b, &["topic", "describe", "prices", "--json"]).ok()).unwrap();
    assert_eq!(d["config"]["retention.ms"], 7 * 24 * 3_600_000u64);
    assert_eq!(d["config"]["fsync"], "interval:200");
    assert_eq!(d["partitions"][1]["high_watermark"], 2);
    assert_eq!(d["partitions"][1]["records"], 2);

    insta::assert_snapshot!(
        "alter",
        spool(
            &b,
            &[
                "topic",
                "alter",
                "prices",
                "-c",
                "retention.ms=none",
                "-c",
                "fsync=always"
            ]
        )
        .ok()
    );
    assert_eq!(
        spool(&b, &["topic", "add-partitions", "prices", "--total", "5"]).ok(),
        "topic prices now has 5 partition(s)\n"
    );
    assert_eq!(
        spool(&b, &["topic", "delete", "prices", "alerts"]).ok(),
        "deleted topic prices\ndeleted topic alerts\n"
    );
    assert_eq!(spool(&b, &["topic", "list"]).ok(), "TOPIC  PARTITIONS\n");
}

#[test]
fn failures_have_exit_codes_and_say_why() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();

    // The broker refuses: 4.
    let dup = spool(&b, &["topic", "create", "t"]).expect(4);
    assert!(dup.stderr.contains("already exists"), "{}", dup.stderr);
    spool(&b, &["topic", "create", "t", "--if-not-exists"]).ok();
    let missing = spool(&b, &["topic", "describe", "nope"]).expect(4);
    assert!(missing.stderr.contains("nope"), "{}", missing.stderr);
    spool(&b, &["topic", "delete", "nope"]).expect(4);
    spool(&b, &["topic", "delete", "nope", "--if-exists"]).ok();
    let shrink = spool(&b, &["topic", "add-partitions", "t", "--total", "1"]).expect(4);
    assert!(!shrink.stderr.is_empty());

    // Bad input: 2, before anything is sent.
    let bad = spool(&b, &["topic", "create", "u", "-c", "colour=blue"]).expect(2);
    assert!(bad.stderr.contains("unknown config key"), "{}", bad.stderr);
    spool(&b, &["topic", "create", "u", "-c", "retention.ms"]).expect(2);
    spool(&b, &["topic", "frobnicate"]).expect(2);
    assert_eq!(
        spool(&b, &["topic", "list"]).ok(),
        "TOPIC  PARTITIONS\nt      1\n"
    );

    // Nobody listening: 3, quickly.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = cmd(&b, &["topic", "list"])
        .env("SPOOL_BROKER", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn profile_file_supplies_the_broker() {
    let b = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cli.toml");
    std::fs::write(
        &file,
        format!(
            "default_profile = \"local\"\n[profiles.local]\nbroker = \"{}\"\n[profiles.elsewhere]\nbroker = \"127.0.0.1:1\"\n",
            b.addr()
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut c = cmd(&b, &["topic", "list"]);
        c.env_remove("SPOOL_BROKER")
            .env("SPOOL_CLI_CONFIG", &file)
            .args(extra);
        c.output().unwrap()
    };
    assert_eq!(run(&[]).status.code(), Some(0));
    assert_eq!(run(&["--profile", "elsewhere"]).status.code(), Some(3));
    // A flag beats the profile.
    assert_eq!(
        run(&["--profile", "elsewhere", "--broker", &b.addr()])
            .status
            .code(),
        Some(0)
    );
    let unknown = run(&["--profile", "nope"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("elsewhere, local"));
}

#[test]
fn completions_and_help() {
    let b = Broker::start();
    let bash = spool(&b, &["completions", "bash"]).ok();
    assert!(bash.contains("_spool()"), "{bash}");
    for sub in [
        vec!["topic", "create", "--help"],
        vec!["produce", "--help"],
        vec!["tail", "--help"],
    ] {
        let help = spool(&b, &sub).ok();
        assert!(help.contains("Example"), "{sub:?} has no example:\n{help}");
    }
}
