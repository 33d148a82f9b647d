//! OffsetService: committed offsets of consumer groups.
//!
//! ACLs: a group's offsets need `groups` on the group; committing also needs `consume` on each
//! topic, and so does deleting only some topics' offsets (deleting a whole group needs the
//! group alone, as Kafka's DeleteGroups). `ListGroups` shows only the groups the token may use.

use std::sync::Arc;

use spool_proto::v1::{self, offset_service_server::OffsetService};
use tonic::{Request, Response, Status};

use super::check_count;
use crate::auth::{Action, principal};
use crate::metrics::timed;
use crate::{State, blocking};

#[derive(Debug)]
pub(crate) struct Offsets {
    state: Arc<State>,
}

impl Offsets {
    pub(crate) fn new(state: Arc<State>) -> Offsets {
        Offsets { state }
    }
}

#[tonic::async_trait]
impl OffsetService for Offsets {
    async fn commit_offsets(
        &self,
        req: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        timed(&self.state.metrics, "CommitOffsets", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Group, &req.group)?;
            check_count(&self.state, req.offsets.len(), "offsets")?;
            for c in &req.offsets {
                who.require(Action::Consume, &c.topic)?;
            }
            if !req.member_id.is_empty() {
                // Fenced: checked and appended by the group's coordinator.
                crate::offsets::validate_group(&req.group)?;
                let groups = self.state.groups.clone();
                groups
                    .commit(
                        &req.group,
                        req.member_id,
                        req.generation,
                        req.offsets,
                        self.state.now_ms(),
                    )
                    .await?;
                return Ok(Response::new(v1::CommitOffsetsResponse {}));
            }
            let state = self.state.clone();
            blocking(move || {
                state
                    .offsets
                    .commit_with(&req.group, &req.offsets, state.now_ms(), || {
                        state.groups.require_empty(&req.group, "a plain commit")
                    })
            })
            .await??;
            Ok(Response::new(v1::CommitOffsetsResponse {}))
        })
        .await
    }

    async fn fetch_offsets(
        &self,
        req: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        timed(&self.state.metrics, "FetchOffsets", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Group, &req.group)?;
            // Bounds a listed request's answer (up to 4 KiB of metadata cloned per entry, under
            // the store's lock); an empty list (all of the group's) is bounded by the reply's
            // size instead (`OffsetStore::with_max_answer_bytes`).
            check_count(&self.state, req.partitions.len(), "partitions")?;
            // On the runtime's thread unless a commit of this group is in flight (its fsync
            // running): then the fetch waits for it to land, on a blocking thread.
            let offsets = match self
                .state
                .offsets
                .fetch_if_settled(&req.group, &req.partitions)?
            {
                Some(offsets) => offsets,
                None => {
                    let state = self.state.clone();
                    blocking(move || state.offsets.fetch(&req.group, &req.partitions)).await??
                }
            };
            Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
        })
        .await
    }

    async fn list_groups(
        &self,
        req: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        timed(&self.state.metrics, "ListGroups", async move {
            let who = principal(&req);
            // On the blocking pool: it takes the store's lock, which a commit holds across its
            // append (that can wait for a segment roll's fdatasync), and walks every group.
            let state = self.state.clone();
            let groups =
                blocking(move || state.offsets.list_groups(|g| who.allows(Action::Group, g)))
                    .await?;
            Ok(Response::new(v1::ListGroupsResponse { groups }))
        })
        .await
    }

    async fn delete_group(
        &self,
        req: Request<v1::DeleteGroupRequest>,
    ) -> Result<Response<v1::DeleteGroupResponse>, Status> {
        timed(&self.state.metrics, "DeleteGroup", async move {
            let who = principal(&req);
            let req = req.into_inner();
            who.require(Action::Group, &req.group)?;
            check_count(&self.state, req.topics.len(), "topics")?;
            for t in &req.topics {
                who.require(Action::Consume, t)?;
            }
            let state = self.state.clone();
            let partitions_deleted = blocking(move || {
                state
                    .offsets
                    .delete_group_with(&req.group, &req.topics, state.now_ms(), || {
                        state.groups.require_empty(&req.group, "deleting offsets")
                    })
            })
            .await??;
            Ok(Response::new(v1::DeleteGroupResponse {
                partitions_deleted,
            }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Broker;
    use crate::config::Config;

    /// Runs `call` as a task of this test's current-thread runtime while another thread holds
    /// the offsets store's lock, and a second task, queued after it, releases the lock.
    /// Returns whether the release came from that task: true if `call` waited for the lock
    /// off the runtime's thread; false if it blocked the thread (the holder gave up after
    /// 10 s and released the lock itself). Driven by the lock, not by timing.
    async fn runtime_stays_free<T: Send + 'static>(
        broker: &Broker,
        call: impl Future<Output = T> + Send + 'static,
    ) -> (bool, T) {
        let store = broker.state.offsets.clone();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            store.with_lock_held(|| {
                locked_tx.send(()).unwrap();
                release_rx.recv_timeout(Duration::from_secs(10)).is_ok()
            })
        });
        locked_rx.recv().unwrap();
        // The run queue is FIFO: `call` runs first, up to its first wait (checked: were the
        // release polled first, the test would prove nothing).
        let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let call = tokio::spawn({
            let polled = polled.clone();
            async move {
                polled.store(true, std::sync::atomic::Ordering::SeqCst);
                call.await
            }
        });
        let release = tokio::spawn(async move {
            assert!(
                polled.load(std::sync::atomic::Ordering::SeqCst),
                "the call was not polled before the release"
            );
            let _ = release_tx.send(());
        });
        release.await.unwrap();
        let out = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call answers once the lock is free")
            .unwrap();
        (holder.join().unwrap(), out)
    }

    fn broker() -> (tempfile::TempDir, Broker) {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        })
        .unwrap();
        broker
            .state
            .log
            .create_topic("t", spool_log_engine::TopicConfig::default())
            .unwrap();
        let c = v1::OffsetCommit {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            metadata: String::new(),
        };
        broker.state.offsets.commit("g", &[c], 1).unwrap();
        (dir, broker)
    }

    /// Stop review: ListGroups took the store's lock on the runtime's thread, where a commit
    /// holding it across its append (a segment roll's fdatasync) stalled every task there.
    #[tokio::test]
    async fn list_groups_waits_for_the_lock_off_the_runtime_thread() {
        let (_dir, broker) = broker();
        let svc = Offsets::new(broker.state.clone());
        let (free, groups) = runtime_stays_free(&broker, async move {
            svc.list_groups(Request::new(v1::ListGroupsRequest {}))
                .await
                .unwrap()
                .into_inner()
                .groups
        })
        .await;
        assert!(free, "ListGroups blocked the runtime's thread on the lock");
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].group, "g");
    }

    /// Stop review: the metrics' scrape lists every committed offset (for the lag) under the
    /// same lock, on the runtime's thread too.
    #[tokio::test]
    async fn a_scrape_waits_for_the_lock_off_the_runtime_thread() {
        let (_dir, broker) = broker();
        let metrics = broker.state.metrics.clone();
        let (free, scraped) =
            runtime_stays_free(&broker, crate::metrics::scrape(metrics, None)).await;
        assert!(free, "the scrape blocked the runtime's thread on the lock");
        let (body, _) = scraped.expect("rendered");
        assert!(
            body.lines()
                .any(|l| l.starts_with("spool_consumer_group_lag{") && l.contains("group=\"g\"")),
            "{body}"
        );
    }

    /// Audit finding 2: FetchOffsets, CommitOffsets, AddOffsetsToTxn and CommitTxn took any
    /// number of entries once decoded (FetchOffsets cloned up to 4 KiB of metadata for each,
    /// under the store's lock). Called here past the codec, each is refused over
    /// `limits.max_partitions_per_request`, as DeleteGroup is, and nothing is committed.
    #[tokio::test]
    async fn entry_counts_are_refused_over_the_partition_limit() {
        let (_dir, broker) = broker();
        let max = broker.state.config.limits.max_partitions_per_request;
        let tp = v1::TopicPartition {
            topic: "t".into(),
            partition: 0,
        };
        let commit = v1::OffsetCommit {
            topic: "t".into(),
            partition: 0,
            offset: 9,
            metadata: String::new(),
        };
        fn invalid<T>(r: Result<T, Status>, what: &str, max: usize) {
            let e = r.err().unwrap_or_else(|| panic!("{what}: accepted"));
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
            assert!(
                e.message().contains(&format!("the limit is {max}")),
                "{what}: {e:?}"
            );
        }
        let offsets = Offsets::new(broker.state.clone());
        let fetch = |n| v1::FetchOffsetsRequest {
            group: "g".into(),
            partitions: vec![tp.clone(); n],
        };
        let answer = offsets
            .fetch_offsets(Request::new(fetch(max)))
            .await
            .unwrap();
        assert_eq!(answer.into_inner().offsets.len(), max);
        invalid(
            offsets.fetch_offsets(Request::new(fetch(max + 1))).await,
            "FetchOffsets",
            max,
        );
        let r = offsets
            .commit_offsets(Request::new(v1::CommitOffsetsRequest {
                group: "g".into(),
                offsets: vec![commit.clone(); max + 1],
                ..Default::default()
            }))
            .await;
        invalid(r, "CommitOffsets", max);
        use spool_proto::v1::transaction_service_server::TransactionService;
        let txns = super::super::Transactions::new(broker.state.clone());
        let r = txns
            .add_offsets_to_txn(Request::new(v1::AddOffsetsToTxnRequest {
                group: "g".into(),
                offsets: vec![commit.clone(); max + 1],
                ..Default::default()
            }))
            .await;
        invalid(r, "AddOffsetsToTxn", max);
        // CommitTxn: the offsets of all groups together, and the groups.
        let group = |n| v1::TxnGroupOffsets {
            group: "g".into(),
            offsets: vec![commit.clone(); n],
            ..Default::default()
        };
        let r = txns
            .commit_txn(Request::new(v1::CommitTxnRequest {
                groups: vec![group(max / 2 + 1), group(max / 2)],
                ..Default::default()
            }))
            .await;
        invalid(r, "CommitTxn offsets", max);
        let r = txns
            .commit_txn(Request::new(v1::CommitTxnRequest {
                groups: vec![group(0); max + 1],
                ..Default::default()
            }))
            .await;
        invalid(r, "CommitTxn groups", max);
        // Nothing was committed.
        let answer = offsets.fetch_offsets(Request::new(fetch(1))).await.unwrap();
        assert_eq!(answer.into_inner().offsets[0].offset, Some(7));
    }
}
