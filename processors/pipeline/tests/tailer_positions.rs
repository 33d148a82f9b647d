//! Several `spool-bounces` tailers (one per Postfix host, the deploy file's layout) with the
//! same `log_path` on a real `spoold`: each resumes from its own stored position, never from
//! another host's, so no line is lost or published twice; the position stored under the log
//! path alone (before positions were kept per instance) is taken over once, by the host that
//! has its file (even when another host starts and reads lines first), and deleted.
//!
//! The hosts' common path is a symbolic link switched between the two hosts' files while no
//! tailer runs (the tailers run in this one process, where one path names one file).

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_client::{Client, ProducerRecord};
use spool_pipeline::postfix::tail::Position;
use spool_pipeline::processors::bounces::{BouncesSettings, LogRecord, position_key, run_tailer};
use spool_pipeline::topics;

const PARTITIONS: u32 = 2;

fn append(path: &Path, qids: &[&str]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for q in qids {
        writeln!(f, "Dec 06 02:28:12 mta postfix/qmgr[1]: {q}: removed").unwrap();
    }
}

/// Points the hosts' common log path at `target`.
fn switch(link: &Path, target: &Path) {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// `(source, queue id)` of every committed `postfix-log` record, with how often it was written.
async fn published(client: &Client) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for (_, r) in support::read_committed(client, PARTITIONS, topics::POSTFIX_LOG).await {
        let rec: LogRecord = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        let qid = rec.line.qid().unwrap().to_owned();
        *out.entry((rec.source, qid)).or_default() += 1;
    }
    out
}

/// The latest committed value per key of `postfix-log-position` (`None`: a tombstone).
async fn positions(client: &Client) -> BTreeMap<String, Option<Bytes>> {
    let mut last = BTreeMap::new();
    for (_, r) in support::read_committed(client, 1, topics::POSTFIX_LOG_POSITION).await {
        let k = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
        last.insert(k, r.value);
    }
    last
}

/// Runs the tailer of host `instance` until `want` records of it are committed, then stops it.
async fn tail_until(client: &Client, link: &Path, instance: &str, want: usize) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let s = BouncesSettings {
        log_path: link.display().to_string(),
        poll_ms: 10,
        ..BouncesSettings::default()
    };
    let task = tokio::spawn(run_tailer(
        client.clone(),
        instance.to_owned(),
        format!("bounces-tailer-{instance}"),
        s,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: usize = published(client)
            .await
            .iter()
            .filter(|((src, _), _)| src == instance)
            .map(|(_, n)| n)
            .sum();
        if n >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tailer {instance}: {n} of {want} records after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailers_of_several_hosts_resume_from_their_own_positions() {
    let (_broker, client, _addr) = support::broker_with_topics(PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let (file_a, file_b, link) = (
        dir.path().join("host-a.log"),
        dir.path().join("host-b.log"),
        dir.path().join("mail.log"),
    );
    let log_path = link.display().to_string();
    append(&file_a, &["QA1", "QA2", "QA3"]);
    append(&file_b, &["QB1", "QB2", "QB3"]);

    // Host a ran the old version and stored "after QA1" under the path alone.
    let line_len = std::fs::read_to_string(&file_a)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .len() as u64
        + 1;
    let old = Position {
        inode: std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file_a).unwrap()),
        offset: line_len,
    };
    let producer = spool_pipeline::publish::producer(&client);
    producer
        .send_to(
            topics::POSTFIX_LOG_POSITION,
            0,
            ProducerRecord::new(serde_json::to_vec(&old).unwrap())
                .key(Bytes::from(log_path.clone())),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    producer.close().await;

    // Host b starts first and sees lines first: the old position is not of a file of b's,
    // so b leaves it to its owner and reads its own file from the start.
    switch(&link, &file_b);
    tail_until(&client, &link, "b", 3).await; // QB1..QB3
    assert!(
        positions(&client).await[&log_path].is_some(),
        "b left the old key alone"
    );
    switch(&link, &file_a);
    tail_until(&client, &link, "a", 2).await; // QA2, QA3: resumed from the old key
    assert_eq!(
        positions(&client).await[&log_path],
        None,
        "a took it over and deleted it"
    );

    // Both restart after more lines: each resumes after its own last line.
    append(&file_a, &["QA4"]);
    append(&file_b, &["QB4"]);
    switch(&link, &file_a);
    tail_until(&client, &link, "a", 3).await;
    switch(&link, &file_b);
    tail_until(&client, &link, "b", 4).await;

    let got = published(&client).await;
    let want: BTreeMap<(String, String), usize> = [
        ("a", "QA2"),
        ("a", "QA3"),
        ("a", "QA4"),
        ("b", "QB1"),
        ("b", "QB2"),
        ("b", "QB3"),
        ("b", "QB4"),
    ]
    .into_iter()
    .map(|(s, q)| ((s.to_owned(), q.to_owned()), 1))
    .collect();
    assert_eq!(got, want, "every line once, from its own host");

    // The positions: one per host, and the old key deleted by host a.
    let last = positions(&client).await;
    let keys: Vec<_> = last.keys().cloned().collect();
    let mut want_keys = vec![
        log_path.clone(),
        position_key("a", &log_path),
        position_key("b", &log_path),
    ];
    want_keys.sort();
    assert_eq!(keys, want_keys);
    assert_eq!(last[&log_path], None, "the old key is a tombstone");
    let pos = |k: &str| -> Position {
        serde_json::from_slice(last[&position_key(k, &log_path)].as_deref().unwrap()).unwrap()
    };
    assert_eq!(pos("a").offset, std::fs::metadata(&file_a).unwrap().len());
    assert_eq!(pos("b").offset, std::fs::metadata(&file_b).unwrap().len());
}
