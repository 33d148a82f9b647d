//! `spool group list | describe | seek | delete` against a real spoold. Offsets are committed
//! through `spool_client` (the CLI has no commit command; consumers commit).

#[allow(unreachable_pub)] // common's helpers are pub for the test files that use them
mod common;

use common::{Broker, spool, spool_in};
use serde_json::Value;
use spool_client::OffsetCommit;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn commit(b: &Broker, group: &str, offsets: &[(&str, u32, u64)]) {
    let offsets: Vec<OffsetCommit> = offsets
        .iter()
        .map(|(t, p, o)| OffsetCommit {
            topic: (*t).to_owned(),
            partition: *p,
            offset: *o,
            metadata: format!("meta-{t}-{p}"),
        })
        .collect();
    rt().block_on(async { b.client().await.commit_offsets(group, &offsets).await })
        .unwrap();
}

/// The group's committed offsets as (topic, partition, offset, metadata).
fn committed(b: &Broker, group: &str) -> Vec<(String, u32, u64, String)> {
    let c = rt()
        .block_on(async { b.client().await.fetch_offsets(group, &[]).await })
        .unwrap();
    c.into_iter()
        .filter_map(|c| Some((c.topic, c.partition, c.offset?, c.metadata)))
        .collect()
}

/// `n` records into `target`, with timestamps `ts0`, `ts0 + 1000`, ….
fn produce(b: &Broker, target: &str, n: u64, ts0: i64) {
    let lines: String = (0..n)
        .map(|i| {
            format!(
                "{{\"key\":\"k{i}\",\"value\":\"v{i}\",\"timestamp\":{}}}\n",
                ts0 + 1000 * i as i64
            )
        })
        .collect();
    spool_in(b, &["produce", target, "--json"], lines.as_bytes()).ok();
}

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn list_and_describe_show_lag_in_records_and_time() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t", "-p", "2"]).ok();
    spool(&b, &["topic", "create", "u"]).ok();
    let two_hours_ago = now_ms() - 7_200_000;
    produce(&b, "t/0", 10, two_hours_ago);
    produce(&b, "t/1", 4, now_ms());
    produce(&b, "u/0", 3, now_ms());
    commit(&b, "billing", &[("t", 0, 6), ("t", 1, 4)]);
    commit(&b, "audit", &[("u", 0, 0)]);

    // list: one line per group, total lag, sortable by lag.
    let out = spool(&b, &["group", "list"]).ok();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "GROUP    PARTITIONS  TOPICS  TOTAL-LAG  LAST-COMMIT"
    );
    assert!(
        lines[1].starts_with("audit    1           u       3  "),
        "{out}"
    );
    assert!(
        lines[2].starts_with("billing  2           t       4  "),
        "{out}"
    );
    let out = spool(&b, &["group", "list", "--sort", "lag", "--json"]).ok();
    let v = json(&out);
    assert_eq!(v[0]["group"], "billing");
    assert_eq!(v[0]["total_lag"], 4);
    assert_eq!(v[0]["topics"], serde_json::json!(["t"]));
    assert_eq!(v[1]["group"], "audit");
    assert_eq!(v[1]["total_lag"], 3);

    // describe, JSON: lag = hwm - committed; lag in time = age of the record at the committed
    // offset (produced with a timestamp two hours less 6 s back); 0 when caught up.
    let out = spool(&b, &["group", "describe", "billing", "--json"]).ok();
    let v = json(&out);
    assert_eq!(v["group"], "billing");
    assert_eq!(v["total_lag"], 4);
    let p = &v["partitions"];
    assert_eq!(
        (&p[0]["topic"], &p[0]["partition"]),
        (&Value::from("t"), &Value::from(0))
    );
    assert_eq!(p[0]["current_offset"], 6);
    assert_eq!(p[0]["log_start_offset"], 0);
    assert_eq!(p[0]["log_end_offset"], 10);
    assert_eq!(p[0]["lag"], 4);
    let age = p[0]["lag_ms"].as_u64().unwrap();
    assert!(
        (7_194_000..7_194_000 + 120_000).contains(&age),
        "lag_ms {age}"
    );
    assert_eq!(p[1]["lag"], 0);
    assert_eq!(p[1]["lag_ms"], 0);
    assert_eq!(v["lag_ms"].as_u64(), Some(age));
    assert_eq!(v["topics"][0]["lag"], 4);

    // describe, table: partitions, then per topic and total.
    let out = spool(&b, &["group", "describe", "billing"]).ok();
    assert!(out.starts_with("GROUP        billing\n"), "{out}");
    assert!(out.contains("TOTAL-LAG    4\n"), "{out}");
    assert!(
        out.contains(
            "TOPIC  PARTITION  CURRENT-OFFSET  LOG-START-OFFSET  LOG-END-OFFSET  LAG  LAG-TIME  \
             LAST-COMMIT  MEMBER\nt      0          6               0                 10              4    1h59m"
        ),
        "{out}"
    );
    assert!(out.contains("\nTOTAL  2           4    1h59m"), "{out}");

    // --topic names topics the group never committed: `-` where nothing is committed.
    let out = spool(
        &b,
        &[
            "group", "describe", "billing", "--topic", "u", "--topic", "t", "--sort", "lag",
        ],
    )
    .ok();
    let rows: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("TOPIC  PARTITION"))
        .skip(1)
        .take(3)
        .collect();
    assert!(rows[0].starts_with("t      0          6  "), "{out}");
    assert!(rows[1].starts_with("t      1          4  "), "{out}");
    assert!(
        rows[2].starts_with(
            "u      0          -               0                 3               -    -  "
        ),
        "{out}"
    );

    // --watch off a terminal: successive tables, no escape codes.
    let out = spool(
        &b,
        &[
            "group",
            "describe",
            "billing",
            "--watch",
            "100ms",
            "--watch-count",
            "2",
        ],
    )
    .ok();
    assert_eq!(out.matches("GROUP        billing").count(), 2, "{out}");
    assert!(out.contains("lag 4 -> 4 (+0 in"), "{out}");
    assert!(!out.contains('\x1b'), "{out:?}");

    // A group with nothing committed: exit 4.
    let r = spool(&b, &["group", "describe", "nobody"]).expect(4);
    assert!(r.stderr.contains("no committed offsets"), "{}", r.stderr);
}

#[test]
fn seek_prints_a_plan_and_executes_it_atomically() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t", "-p", "2"]).ok();
    let ts0 = 1_700_000_000_000;
    produce(&b, "t/0", 10, ts0);
    produce(&b, "t/1", 10, ts0);
    commit(&b, "g", &[("t", 0, 2), ("t", 1, 3)]);

    // Dry run: a plan, nothing changed.
    let r = spool(&b, &["group", "seek", "g", "--to", "end"]).expect(0);
    assert_eq!(
        r.stdout,
        "TOPIC  PARTITION  PRIOR-OFFSET  NEW-OFFSET  LOG-START-OFFSET  LOG-END-OFFSET\n\
         t      0          2             10          0                 10\n\
         t      1          3             10          0                 10\n"
    );
    assert!(
        r.stderr.contains("dry run: nothing changed"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("--execute would fail now"),
        "{}",
        r.stderr
    );
    let before = committed(&b, "g");
    assert_eq!(before.iter().map(|c| c.2).collect::<Vec<_>>(), [2, 3]);

    // Just committed: refused without --force, and still nothing changed.
    let r = spool(&b, &["group", "seek", "g", "--to", "end", "--execute"]).expect(1);
    assert!(
        r.stderr.contains("refusing to seek") && r.stderr.contains("committed offsets"),
        "{}",
        r.stderr
    );
    assert_eq!(committed(&b, "g"), before);

    // --force: committed, metadata kept, prior/current printed.
    let r = spool(
        &b,
        &["group", "seek", "g", "--to", "end", "--execute", "--force"],
    )
    .expect(0);
    assert_eq!(
        r.stdout,
        "TOPIC  PARTITION  PRIOR-OFFSET  CURRENT-OFFSET\n\
         t      0          2             10\n\
         t      1          3             10\n"
    );
    assert_eq!(
        committed(&b, "g"),
        [
            ("t".to_owned(), 0, 10, "meta-t-0".to_owned()),
            ("t".to_owned(), 1, 10, "meta-t-1".to_owned())
        ]
    );

    // A time: the first record at or after it (records are 1 s apart), via the time index.
    let at = format!("@{}", ts0 + 4_500);
    spool(
        &b,
        &[
            "group",
            "seek",
            "g",
            "--to",
            &at,
            "--execute",
            "--active-window",
            "0s",
        ],
    )
    .ok();
    assert_eq!(
        committed(&b, "g").iter().map(|c| c.2).collect::<Vec<_>>(),
        [5, 5]
    );

    // A shift, limited to one partition; clamped into the log with a note.
    let r = spool(
        &b,
        &[
            "group",
            "seek",
            "g",
            "--to",
            "-7",
            "--topic",
            "t/1",
            "--execute",
            "--force",
            "--json",
        ],
    )
    .expect(0);
    let v = json(&r.stdout);
    assert_eq!(v["executed"], true);
    assert_eq!(v["partitions"].as_array().unwrap().len(), 1);
    assert_eq!(v["partitions"][0]["prior_offset"], 5);
    assert_eq!(v["partitions"][0]["new_offset"], 0);
    assert_eq!(v["partitions"][0]["current_offset"], 0);
    assert!(r.stderr.contains("using the log start"), "{}", r.stderr);
    assert_eq!(
        committed(&b, "g").iter().map(|c| c.2).collect::<Vec<_>>(),
        [5, 0]
    );

    // A new group needs --topic; an unknown target is a usage error.
    spool(&b, &["group", "seek", "fresh", "--to", "start"]).expect(4);
    spool(
        &b,
        &[
            "group",
            "seek",
            "fresh",
            "--to",
            "start",
            "--topic",
            "t",
            "--execute",
        ],
    )
    .ok();
    assert_eq!(committed(&b, "fresh").len(), 2);
    spool(&b, &["group", "seek", "g", "--to", "soon"]).expect(2);
    spool(
        &b,
        &["group", "seek", "fresh", "--to", "+1", "--topic", "nosuch"],
    )
    .expect(4);
}

#[test]
fn export_and_from_file_round_trip() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t", "-p", "2"]).ok();
    produce(&b, "t/0", 5, 1_700_000_000_000);
    produce(&b, "t/1", 8, 1_700_000_000_000);
    commit(&b, "g", &[("t", 0, 4), ("t", 1, 6)]);

    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.csv");
    let plan_s = plan.to_str().unwrap();
    // Export the current positions (shift by 0) without executing.
    spool(
        &b,
        &["group", "seek", "g", "--to", "+0", "--export", plan_s],
    )
    .ok();
    assert_eq!(std::fs::read_to_string(&plan).unwrap(), "t,0,4\nt,1,6\n");

    spool(
        &b,
        &[
            "group",
            "seek",
            "g",
            "--to",
            "start",
            "--execute",
            "--force",
        ],
    )
    .ok();
    assert_eq!(
        committed(&b, "g").iter().map(|c| c.2).collect::<Vec<_>>(),
        [0, 0]
    );
    // Restore from the file.
    let r = spool(
        &b,
        &[
            "group",
            "seek",
            "g",
            "--from-file",
            plan_s,
            "--execute",
            "--force",
        ],
    )
    .ok();
    assert!(r.contains("t      1          0             6"), "{r}");
    assert_eq!(
        committed(&b, "g").iter().map(|c| c.2).collect::<Vec<_>>(),
        [4, 6]
    );

    // rpk's whitespace form and Kafka's header line are accepted too; bad lines are exit 2.
    let rpk = dir.path().join("rpk.txt");
    std::fs::write(&rpk, "topic,partition,offset\n# comment\nt 1 2\n").unwrap();
    spool(
        &b,
        &[
            "group",
            "seek",
            "g",
            "--from-file",
            rpk.to_str().unwrap(),
            "--execute",
            "--force",
        ],
    )
    .ok();
    assert_eq!(
        committed(&b, "g").iter().map(|c| c.2).collect::<Vec<_>>(),
        [4, 2]
    );
    std::fs::write(&rpk, "t,zero,2\n").unwrap();
    let r = spool(
        &b,
        &["group", "seek", "g", "--from-file", rpk.to_str().unwrap()],
    )
    .expect(2);
    assert!(r.stderr.contains("line 1"), "{}", r.stderr);
    // --from-file and --to do not mix.
    spool(
        &b,
        &["group", "seek", "g", "--from-file", plan_s, "--to", "end"],
    )
    .expect(2);
}

#[test]
fn delete_all_or_some_topics() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "a"]).ok();
    spool(&b, &["topic", "create", "c", "-p", "2"]).ok();
    commit(&b, "g", &[("a", 0, 0), ("c", 0, 0), ("c", 1, 0)]);

    // Recently committed: refused.
    let r = spool(&b, &["group", "delete", "g"]).expect(1);
    assert!(r.stderr.contains("refusing to delete"), "{}", r.stderr);
    assert_eq!(committed(&b, "g").len(), 3);

    let out = spool(&b, &["group", "delete", "g", "--topic", "c", "--force"]).ok();
    assert_eq!(out, "deleted 2 committed offset(s) of group g\n");
    assert_eq!(
        committed(&b, "g"),
        [("a".to_owned(), 0, 0, "meta-a-0".to_owned())]
    );
    let out = spool(
        &b,
        &["group", "delete", "g", "--active-window", "0s", "--json"],
    )
    .ok();
    assert_eq!(
        json(&out),
        serde_json::json!({"group": "g", "partitions_deleted": 1})
    );
    assert!(committed(&b, "g").is_empty());
    assert_eq!(spool(&b, &["group", "list", "--json"]).ok(), "[]\n");
    // Nothing left: the broker says unknown group (exit 4).
    spool(&b, &["group", "delete", "g", "--force"]).expect(4);
}

/// A group with a member (a GroupConsumer that joined): `describe` shows the member and who
/// owns each partition; `seek --execute` is refused even with --force; after the member
/// leaves, it goes through.
#[test]
fn members_are_shown_and_protect_their_offsets() {
    use spool_client::{GroupConfig, GroupConsumer};
    let b = Broker::start();
    spool(&b, &["topic", "create", "ev", "-p", "2"]).ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let member = rt.block_on(async {
        let c = b.client().await;
        let m = GroupConsumer::join(&c, GroupConfig::new("live", ["ev"]).instance_id("proc-1"))
            .await
            .unwrap();
        // Wait until the broker has given it both partitions.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let d = c.describe_group("live").await.unwrap();
            if d.members.len() == 1 && d.members[0].partitions.len() == 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never assigned: {d:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        m
    });
    let out = spool(&b, &["group", "describe", "live"]).ok();
    assert!(out.contains("MEMBERS      1"), "{out}");
    assert!(out.contains("MEMBER-ID") && out.contains("proc-1"), "{out}");
    let owned = out
        .lines()
        .filter(|l| l.starts_with("ev ") && l.trim_end().ends_with("proc-1"));
    assert_eq!(owned.count(), 2, "{out}");
    let v: Value =
        serde_json::from_str(&spool(&b, &["group", "describe", "live", "--json"]).ok()).unwrap();
    assert_eq!(v["members"][0]["instance_id"], "proc-1");
    assert_eq!(v["partitions"][0]["member"], "proc-1");

    let seek = [
        "group",
        "seek",
        "live",
        "--to",
        "start",
        "--topic",
        "ev",
        "--execute",
        "--force",
    ];
    let r = spool(&b, &seek).expect(1);
    assert!(
        r.stderr
            .contains("has 1 member(s) (proc-1); stop them first"),
        "{}",
        r.stderr
    );
    let r = spool(&b, &["group", "delete", "live", "--force"]).expect(1);
    assert!(r.stderr.contains("1 member(s)"), "{}", r.stderr);

    // A static member whose consumer stopped without leaving stays until its session
    // expires: the refusal says so, rather than "stop them".
    drop(member);
    let c = rt.block_on(b.client());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while rt
        .block_on(c.describe_group("live"))
        .unwrap()
        .members
        .iter()
        .any(|m| m.connected)
    {
        assert!(std::time::Instant::now() < deadline, "still connected");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = spool(&b, &seek).expect(1);
    assert!(
        r.stderr
            .contains("proc-1: disconnected, its session expires in")
            && r.stderr.contains("none is connected")
            && !r.stderr.contains("stop them first"),
        "{}",
        r.stderr
    );

    rt.block_on(c.leave_group("live", "proc-1", true)).unwrap();
    spool(&b, &seek).ok();
    let v: Value =
        serde_json::from_str(&spool(&b, &["group", "describe", "live", "--json"]).ok()).unwrap();
    assert_eq!(v["state"], "Empty");
    assert_eq!(v["partitions"][0]["current_offset"], 0);
}

/// docs/cli.md's "move a processor's group back" recipe, run as written (group, time and file
/// substituted; `--force` added where the recipe says to, since the test commits just before):
/// its undo line puts the group back where it was.
#[test]
fn the_docs_seek_recipe_undoes() {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md")).unwrap();
    let recipe = docs
        .split("### Recipe: move a processor's group back to 10:00")
        .nth(1)
        .and_then(|r| r.split("```sh\n").nth(1))
        .and_then(|r| r.split("```").next())
        .expect("the recipe's sh block");
    // (args, is the undo line)
    let mut lines: Vec<(Vec<String>, bool)> = Vec::new();
    for line in recipe.lines() {
        let (cmd, undo) = match line.strip_prefix("# undo") {
            Some(rest) => (rest.split_once("spool ").map(|(_, c)| c), true),
            None => (line.strip_prefix("spool "), false),
        };
        let Some(cmd) = cmd else { continue };
        // Comments start at "  #" after the command.
        let cmd = cmd.split("  #").next().unwrap().trim();
        if !cmd.starts_with("group seek") {
            continue;
        }
        lines.push((cmd.split_whitespace().map(str::to_owned).collect(), undo));
    }
    assert!(lines.len() >= 3, "{recipe}");
    assert!(
        lines.last().is_some_and(|l| l.1),
        "the undo line is last: {recipe}"
    );

    let b = Broker::start();
    spool(&b, &["topic", "create", "billing-in", "-p", "2"]).ok();
    let ts0 = 1_700_000_000_000;
    produce(&b, "billing-in/0", 10, ts0);
    produce(&b, "billing-in/1", 10, ts0);
    commit(&b, "billing", &[("billing-in", 0, 5), ("billing-in", 1, 7)]);
    let dir = tempfile::tempdir().unwrap();
    let undo_file = dir.path().join("billing-before.csv");
    let time = format!("@{}", ts0 + 2000);
    for (args, _) in &lines {
        let mut args: Vec<String> = args
            .iter()
            .map(|a| match a.as_str() {
                "billing-before.csv" => undo_file.to_str().unwrap().to_owned(),
                a if a.starts_with("@2026-") => time.clone(),
                a => a.to_owned(),
            })
            .collect();
        if args.iter().any(|a| a == "--execute") && !args.iter().any(|a| a == "--force") {
            args.push("--force".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spool(&b, &args).ok();
        if args.contains(&"--execute") && !args.contains(&"--from-file") {
            // The seek itself moved the group to offset 2 of both partitions.
            let at: Vec<u64> = committed(&b, "billing").iter().map(|c| c.2).collect();
            assert_eq!(at, [2, 2], "{args:?}");
        }
    }
    let at: Vec<u64> = committed(&b, "billing").iter().map(|c| c.2).collect();
    assert_eq!(
        at,
        [5, 7],
        "the undo restores the positions from before the seek"
    );
}
