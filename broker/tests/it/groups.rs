//! Consumer-group administration: ListGroups and DeleteGroup end to end, deletions surviving
//! kill -9 and restart.

use spool_proto::v1;
use tonic::Code;

use crate::common::Spoold;

async fn topics(b: &Spoold, names: &[&str]) {
    let mut admin = b.admin().await;
    for t in names {
        admin
            .create_topic(v1::CreateTopicRequest {
                topic: (*t).into(),
                partitions: 3,
                config: None,
            })
            .await
            .unwrap();
    }
}

fn commit(group: &str, parts: &[(&str, u32, u64)]) -> v1::CommitOffsetsRequest {
    v1::CommitOffsetsRequest {
        group: group.into(),
        offsets: parts
            .iter()
            .map(|(t, p, o)| v1::OffsetCommit {
                topic: (*t).into(),
                partition: *p,
                offset: *o,
                metadata: String::new(),
            })
            .collect(),
        ..Default::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn delete(group: &str, topics: &[&str]) -> v1::DeleteGroupRequest {
    v1::DeleteGroupRequest {
        group: group.into(),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
    }
}

/// (group, partitions, topics) of every listed group.
async fn listed(b: &Spoold) -> Vec<(String, u32, Vec<String>)> {
    b.offsets()
        .await
        .list_groups(v1::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups
        .into_iter()
        .map(|g| (g.group, g.partitions, g.topics))
        .collect()
}

fn own(v: &[(&str, u32, &[&str])]) -> Vec<(String, u32, Vec<String>)> {
    v.iter()
        .map(|(g, n, t)| {
            (
                (*g).to_owned(),
                *n,
                t.iter().map(|s| (*s).to_owned()).collect(),
            )
        })
        .collect()
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_delete_groups_survive_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    topics(&b, &["orders", "prices"]).await;
    let mut off = b.offsets().await;
    assert!(listed(&b).await.is_empty(), "no groups on a fresh broker");

    let before = now_ms();
    off.commit_offsets(commit("billing", &[("orders", 0, 5), ("orders", 1, 6)]))
        .await
        .unwrap();
    off.commit_offsets(commit("billing", &[("prices", 2, 7)]))
        .await
        .unwrap();
    off.commit_offsets(commit("audit", &[("orders", 0, 1)]))
        .await
        .unwrap();
    off.commit_offsets(commit("stale", &[("prices", 0, 3), ("prices", 1, 3)]))
        .await
        .unwrap();
    let groups = off
        .list_groups(v1::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert_eq!(
        groups
            .iter()
            .map(|g| (g.group.clone(), g.partitions, g.topics.clone()))
            .collect::<Vec<_>>(),
        own(&[
            ("audit", 1, &["orders"]),
            ("billing", 3, &["orders", "prices"]),
            ("stale", 2, &["prices"]),
        ])
    );
    for g in &groups {
        assert!(
            g.last_commit_time_ms >= before && g.last_commit_time_ms <= now_ms(),
            "{g:?}"
        );
    }

    // Only one topic of a group.
    let r = off
        .delete_group(delete("billing", &["prices"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.partitions_deleted, 1);
    // A whole group.
    let r = off
        .delete_group(delete("stale", &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.partitions_deleted, 2);
    // Nothing (left) to delete: NOT_FOUND naming the group.
    for (group, topics) in [
        ("stale", &[][..]),
        ("nobody", &[][..]),
        ("billing", &["prices"][..]),
        ("billing", &["no-such-topic"][..]),
    ] {
        let err = off.delete_group(delete(group, topics)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{group} {topics:?}: {err:?}");
        let info = tonic_types::StatusExt::get_details_error_info(&err).expect("ErrorInfo");
        assert_eq!(info.reason, "ERROR_CODE_UNKNOWN_GROUP");
        assert_eq!(info.metadata.get("group").map(String::as_str), Some(group));
        assert!(err.message().contains(group), "{}", err.message());
    }
    let err = off.delete_group(delete("", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fetched = off
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "billing".into(),
            partitions: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!(
        fetched
            .iter()
            .map(|c| (c.topic.as_str(), c.partition, c.offset))
            .collect::<Vec<_>>(),
        [("orders", 0, Some(5)), ("orders", 1, Some(6))]
    );
    let expected = own(&[("audit", 1, &["orders"]), ("billing", 2, &["orders"])]);
    assert_eq!(listed(&b).await, expected);

    // The deletions were durable before their replies: SIGKILL, then replay.
    b.kill();
    let b = Spoold::start(dir.path(), &[]);
    assert_eq!(listed(&b).await, expected, "after kill -9");
    assert!(
        !b.stderr().contains("malformed"),
        "tombstones are deletions, not malformed records:\n{}",
        b.stderr()
    );
    // A group deleted can commit again.
    let mut off = b.offsets().await;
    off.commit_offsets(commit("stale", &[("orders", 2, 9)]))
        .await
        .unwrap();
    b.stop();
    let b = Spoold::start(dir.path(), &[]);
    assert_eq!(
        listed(&b).await,
        own(&[
            ("audit", 1, &["orders"]),
            ("billing", 2, &["orders"]),
            ("stale", 1, &["orders"]),
        ]),
        "after a clean restart"
    );
    b.stop();
}
