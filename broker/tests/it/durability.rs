//! kill -9 of spoold under acks=durable produce: after restart, zero acknowledged records lost
//! or duplicated. Also: data survives a clean restart.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spool_proto::v1;

use crate::common::{Spoold, record};

/// Reads every record of a partition: offset → value.
async fn read_all(b: &Spoold, partition: u32) -> BTreeMap<u64, String> {
    let mut cons = b.consume().await;
    let mut out = BTreeMap::new();
    let mut offset = 0;
    loop {
        let f = cons
            .fetch(v1::FetchRequest {
                partitions: vec![v1::PartitionFetch {
                    topic: "t".into(),
                    partition,
                    offset,
                    max_bytes: 1 << 20,
                }],
                min_bytes: 0,
                max_wait_ms: 0,
                decode_records: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let d = &f.partitions[0];
        assert!(d.error.is_none(), "{d:?}");
        if d.records.is_empty() {
            return out;
        }
        for r in &d.records {
            let v = String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap();
            assert!(
                out.insert(r.offset, v).is_none(),
                "offset {} served twice",
                r.offset
            );
        }
        offset = d.next_offset;
    }
}

/// After an fdatasync failure and a restart (`b`): the partition holds `values` at offsets
/// 0, 1, …, followed at most by `failed` (the batch whose fdatasync failed), and appends
/// resume. Stops `b`.
async fn restarted_log_keeps(b: Spoold, values: &[String], failed: &str) {
    let log = read_all(&b, 0).await;
    for (off, v) in values.iter().enumerate() {
        assert_eq!(
            log.get(&(off as u64)).map(String::as_str),
            Some(v.as_str()),
            "{log:?}"
        );
    }
    let n = values.len() as u64;
    assert!(
        log.iter()
            .skip(values.len())
            .all(|(off, v)| *off == n && v == failed),
        "only the batch whose fdatasync failed may follow the acknowledged ones: {log:?}"
    );
    let mut prod = b.produce().await;
    let after = produce_durable(&mut prod, "after").await;
    assert!(
        after.error.is_none() && after.base_offset == log.len() as u64,
        "appends resume after a restart: {after:?}"
    );
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_durable_produce_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cycles: u64 = std::env::var("SPOOL_BROKER_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut seed: u64 = 0x5eed_1234;
    // acked: (partition, offset) → value, across all cycles.
    let acked: Arc<Mutex<BTreeMap<(u32, u64), String>>> = Arc::default();
    {
        let b = Spoold::start(dir.path(), &[]);
        b.admin()
            .await
            .create_topic(v1::CreateTopicRequest {
                topic: "t".into(),
                partitions: 2,
                config: Some(v1::TopicConfig {
                    segment_bytes: Some(64 << 10),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        b.stop();
    }
    for cycle in 0..cycles {
        let b = Spoold::start(dir.path(), &[]);
        let mut tasks = Vec::new();
        for w in 0..4u32 {
            let url = b.url();
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                let ch = tonic::transport::Channel::from_shared(url)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut prod = v1::produce_service_client::ProduceServiceClient::new(ch);
                for i in 0.. {
                    let partition = (w + i) % 2;
                    let vals: Vec<String> =
                        (0..3).map(|j| format!("c{cycle}-w{w}-i{i}-j{j}")).collect();
                    let req = v1::ProduceRequest {
                        partitions: vec![v1::PartitionProduce {
                            topic: "t".into(),
                            partition,
                            data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                                records: vals.iter().map(|v| record(None, v)).collect(),
                                compression: 0,
                            })),
                        }],
                        acks: v1::Acks::Durable as i32,
                    };
                    let Ok(resp) = prod.produce(req).await else {
                        return;
                    };
                    let r = &resp.into_inner().results[0];
                    if r.error.is_some() {
                        return;
                    }
                    let mut a = acked.lock().unwrap();
                    for (j, v) in vals.into_iter().enumerate() {
                        a.insert((partition, r.base_offset + j as u64), v);
                    }
                }
            }));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(20 + seed % 200)).await;
        b.kill();
        for t in tasks {
            t.await.unwrap();
        }
    }
    let b = Spoold::start(dir.path(), &[]);
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too few acknowledged records to mean anything: {}",
        acked.len()
    );
    let mut present = 0;
    for partition in 0..2 {
        let log = read_all(&b, partition).await;
        for (&(p, off), v) in acked.range((partition, 0)..(partition + 1, 0)) {
            assert_eq!(
                log.get(&off),
                Some(v),
                "acked record lost or changed at {p}/{off} (seed {seed:#x})"
            );
            present += 1;
        }
        // Every value appears once in the log (no duplicates from the restarts).
        let mut seen = std::collections::HashSet::new();
        for v in log.values() {
            assert!(seen.insert(v), "duplicate record {v}");
        }
    }
    eprintln!("kill -9 x{cycles}: {present} acknowledged records, all present exactly once");
    b.stop();
}

/// Produces `value` to `t`/0 with acks=durable; the partition's result (error or base offset).
async fn produce_durable(
    prod: &mut v1::produce_service_client::ProduceServiceClient<tonic::transport::Channel>,
    value: &str,
) -> v1::PartitionProduceResult {
    let r = prod
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: "t".into(),
                partition: 0,
                data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(None, value)],
                    compression: 0,
                })),
            }],
            acks: v1::Acks::Durable as i32,
        })
        .await
        .unwrap()
        .into_inner();
    r.results.into_iter().next().expect("one partition result")
}

fn code_name(r: &v1::PartitionProduceResult) -> &'static str {
    r.error.as_ref().map_or("acknowledged", |e| {
        v1::ErrorCode::try_from(e.code).map_or("?", |c| c.as_str_name())
    })
}

/// A failed fdatasync poisons the partition, and the request whose own fdatasync failed is
/// told so (ERROR_CODE_PARTITION_POISONED, as docs/durability.md promises; it used to get
/// ERROR_CODE_INTERNAL), as is every later one; nothing acknowledged is lost. On an
/// `fsync = always` topic, where produce takes the broker's blocking path (the settle thread
/// runs the group commit); [`failed_fdatasync_on_the_async_path`] is the same on the async
/// path.
///
/// spoold runs under strace, which makes the second fdatasync of the partition's segment by
/// a thread fail with EIO: the durable produces before it are acknowledged, the one whose
/// fdatasync fails and the two after it are refused as poisoned, and the high watermark stays
/// at the acknowledged records. After a restart without strace the acknowledged records are
/// at their offsets, the only record past them can be the one whose fdatasync failed (its
/// write reached the page cache), and appends resume. strace is required
/// (`.ci/install-test-tools`); the test fails without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fdatasync_answers_poisoned_to_the_request_that_saw_it() {
    failed_fdatasync_case(v1::FsyncPolicy::Always).await;
}

/// [`failed_fdatasync_answers_poisoned_to_the_request_that_saw_it`] on an `fsync = never`
/// topic, where `acks = durable` takes the async path (`Partition::request_sync`, the
/// partition's sync loop, the `Partition::durable` future). The high watermark there moves at
/// append, so it may include the batch whose fdatasync failed (never acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fdatasync_on_the_async_path() {
    failed_fdatasync_case(v1::FsyncPolicy::Never).await;
}

/// The `strace` wrapper of the fdatasync-EIO tests: only fdatasync calls on `segment` are
/// traced, and the second one of each thread fails with EIO (strace counts `when=` per
/// thread). strace is required (`.ci/install-test-tools`).
fn eio_on_second_fdatasync(segment: &std::path::Path) -> Vec<std::ffi::OsString> {
    let mut strace: Vec<std::ffi::OsString> = ["strace", "-f", "-qq", "-o", "/dev/null", "-P"]
        .map(Into::into)
        .to_vec();
    strace.push(segment.as_os_str().to_owned());
    strace.extend(
        [
            "-e",
            "trace=fdatasync",
            "-e",
            "inject=fdatasync:error=EIO:when=2",
        ]
        .map(Into::into),
    );
    strace
}

async fn failed_fdatasync_case(fsync: v1::FsyncPolicy) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let b = Spoold::start(&data, &[]);
    let config = v1::TopicConfig {
        fsync_policy: fsync as i32,
        ..Default::default()
    };
    b.create_topic_with("t", 1, Some(config)).await;
    b.stop();
    let segment = data.join("t/0/00000000000000000000.log");
    assert!(segment.exists(), "{} missing", segment.display());
    let b = Spoold::start_launch(&Spoold::launch(&data).wrapper(eio_on_second_fdatasync(&segment)));
    let mut prod = b.produce().await;
    let first = produce_durable(&mut prod, "acked").await;
    assert!(
        first.error.is_none() && first.base_offset == 0,
        "the produce before the injected EIO: {first:?}\n{}",
        b.stderr()
    );
    // strace counts `when=` per thread, and the partition's syncs run on whichever
    // blocking-pool thread runs a settle phase or the sync loop: the call that fails is the
    // second fdatasync of some thread, so more produces may be acknowledged first (each after
    // its own successful fdatasync: produces are sequential). Up to 50 tries: a handful of
    // pool threads take turns.
    let mut acked = vec!["acked".to_owned()];
    let failed = loop {
        let value = format!("v{}", acked.len());
        let r = produce_durable(&mut prod, &value).await;
        if r.error.is_some() {
            break (value, code_name(&r));
        }
        assert_eq!(r.base_offset, acked.len() as u64, "{r:?}");
        acked.push(value);
        assert!(acked.len() < 50, "no fdatasync failed\n{}", b.stderr());
    };
    let mut codes = vec![failed.1];
    for i in 0..2 {
        codes.push(code_name(
            &produce_durable(&mut prod, &format!("refused{i}")).await,
        ));
    }
    assert_eq!(
        codes,
        ["ERROR_CODE_PARTITION_POISONED"; 3],
        "{}",
        b.stderr()
    );
    // Under `fsync = never` readers see a batch once written, so the failed one may be too.
    let visible = acked.len() as u64 + u64::from(fsync == v1::FsyncPolicy::Never);
    assert_eq!(
        b.high_watermark("t", 0).await,
        visible,
        "only the acknowledged records are visible"
    );
    b.kill();

    let b = Spoold::start(&data, &[]);
    restarted_log_keeps(b, &acked, &failed.0).await;
}

/// One uncompressed pre-encoded batch of a single record: small, so a `ProduceStream` request
/// carrying it with `acks = written` is appended on the runtime thread.
fn plain_batch(value: &str) -> bytes::Bytes {
    let mut bb = spool_log_engine::BatchBuilder::new(spool_log_engine::Compression::None);
    bb.push(1_700_000_000_000, None, Some(value.as_bytes()), &[]);
    bb.finish().unwrap()
}

/// The fdatasync-EIO case for the `ProduceStream` path that appends on the runtime thread
/// (small uncompressed batches, `acks = written`, `fsync = always`): the batch is acknowledged
/// once written, and its fdatasync, which makes it visible, runs later on a blocking-pool
/// thread the runtime thread asked for (unless a running group commit covers it). The unary
/// tests above cover the settle thread's and the sync loop's syncs; this one the sync that no
/// request waits for. strace makes the second fdatasync of the segment by some thread fail
/// with EIO (per thread, as above). One request at a time, each waited on until it is visible
/// or the broker logged the failed sync: every batch before the failure became visible only
/// through its successful fdatasync; the batch whose sync failed never becomes visible; the
/// partition refuses later requests on the same stream as poisoned; after a restart without
/// strace the visible records are all there at their offsets, and appends resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fdatasync_behind_a_runtime_thread_stream_append() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let b = Spoold::start(&data, &[]);
    let config = v1::TopicConfig {
        fsync_policy: v1::FsyncPolicy::Always as i32,
        ..Default::default()
    };
    b.create_topic_with("t", 1, Some(config)).await;
    b.stop();
    let segment = data.join("t/0/00000000000000000000.log");
    let b = Spoold::start_launch(&Spoold::launch(&data).wrapper(eio_on_second_fdatasync(&segment)));
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::ProduceStreamRequest>(4);
    let mut replies = b
        .produce()
        .await
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut id = 0u64;
    let mut send = async |value: &str| {
        id += 1;
        tx.send(v1::ProduceStreamRequest {
            request_id: id,
            partitions: vec![v1::PartitionProduce {
                topic: "t".into(),
                partition: 0,
                data: Some(v1::partition_produce::Data::RecordBatch(plain_batch(value))),
            }],
            acks: v1::Acks::Written as i32,
        })
        .await
        .unwrap();
        let r = tokio_stream::StreamExt::next(&mut replies)
            .await
            .expect("a reply")
            .unwrap();
        assert_eq!(r.request_id, id);
        r.results.into_iter().next().expect("one partition result")
    };

    // Acknowledged (written) one by one; each waited on until visible or its sync failed.
    let mut visible = Vec::new();
    let failed = loop {
        let value = format!("v{}", visible.len());
        let r = send(&value).await;
        assert!(
            r.error.is_none() && r.base_offset == visible.len() as u64,
            "acks = written before any failure: {r:?}\n{}",
            b.stderr()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let made_visible = loop {
            if b.high_watermark("t", 0).await > r.base_offset {
                break true;
            }
            if b.stderr().contains("background sync failed") {
                break false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "batch {} neither visible nor failed within 10 s\n{}",
                r.base_offset,
                b.stderr()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if !made_visible {
            break value;
        }
        visible.push(value);
        assert!(visible.len() < 50, "no fdatasync failed\n{}", b.stderr());
    };
    assert!(
        b.stderr().contains("Input/output error") || b.stderr().contains("os error 5"),
        "the logged failure is the injected EIO\n{}",
        b.stderr()
    );
    let n = visible.len() as u64;
    // Later requests on the same stream are refused, and nothing is published after the failure.
    for i in 0..2 {
        let r = send(&format!("refused{i}")).await;
        assert_eq!(code_name(&r), "ERROR_CODE_PARTITION_POISONED", "{r:?}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        b.high_watermark("t", 0).await,
        n,
        "only batches whose own fdatasync succeeded are visible"
    );
    drop(tx);
    b.kill();

    let b = Spoold::start(&data, &[]);
    restarted_log_keeps(b, &visible, &failed).await;
}
