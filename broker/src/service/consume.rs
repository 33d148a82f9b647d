//! ConsumeService: Fetch (long poll), Subscribe (push), ListOffsets.
//!
//! Data is served as it is stored: `record_batches` are zero-copy slices of the log's mapped
//! segments, never decoded, unless the request asks for decoded records. Waiting for new data
//! awaits the partitions' append notifiers; nothing polls.
//!
//! Subscribe flow control: each subscription has a channel of capacity 1 towards its HTTP/2
//! stream, and reads the next chunk only when the previous one was taken, so a slow reader
//! holds at most about two messages of `max_bytes` in the broker.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::select_all;
use spool_log_engine::{Isolation, Partition};
use spool_proto::v1::{self, consume_service_server::ConsumeService};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{Action, principal};
use crate::convert::decode_records;
use crate::error::{BrokerError, partition_error};
use crate::metrics::timed;
use crate::{State, blocking};

/// Heartbeat interval of a subscription that does not choose one.
const DEFAULT_HEARTBEAT_MS: u32 = 5000;

/// Default per-partition fetch size when a request says 0.
const DEFAULT_MAX_BYTES: u32 = 1 << 20;

#[derive(Debug)]
pub(crate) struct Consume {
    state: Arc<State>,
}

impl Consume {
    pub(crate) fn new(state: Arc<State>) -> Consume {
        Consume { state }
    }

    fn clamp_bytes(&self, max_bytes: u32) -> u32 {
        let limit = self.state.config.limits.max_fetch_bytes;
        if max_bytes == 0 {
            DEFAULT_MAX_BYTES.min(limit)
        } else {
            max_bytes.min(limit)
        }
    }
}

/// Reads one partition (blocking) into a wire message.
fn read_partition(
    state: &State,
    p: &Partition,
    offset: u64,
    max_bytes: u32,
    decode: bool,
    isolation: Isolation,
) -> v1::PartitionData {
    let mut out = v1::PartitionData {
        topic: p.topic().to_owned(),
        partition: p.id(),
        next_offset: offset,
        ..Default::default()
    };
    match p.read_with(offset, max_bytes as usize, isolation) {
        Ok(r) => {
            out.next_offset = r.next_offset;
            out.high_watermark = r.high_watermark;
            out.log_start_offset = r.log_start_offset;
            out.last_stable_offset = r.last_stable_offset;
            if decode {
                match decode_records(&r.data, &state.limits) {
                    Ok(records) => out.records = records,
                    Err(e) => out.error = Some(partition_error(e)),
                }
            } else {
                out.record_batches = r.data;
            }
        }
        Err(e) => {
            out.high_watermark = p.high_watermark();
            out.log_start_offset = p.log_start_offset();
            out.last_stable_offset = p.last_stable_offset();
            out.error = Some(partition_error(e));
        }
    }
    out
}

/// The isolation level a request asks for (unset: read uncommitted).
fn isolation(level: i32) -> Isolation {
    match v1::IsolationLevel::try_from(level) {
        Ok(v1::IsolationLevel::ReadCommitted) => Isolation::ReadCommitted,
        _ => Isolation::ReadUncommitted,
    }
}

/// Where a reader at `isolation` can read up to.
fn readable_end(p: &Partition, isolation: Isolation) -> u64 {
    match isolation {
        Isolation::ReadCommitted => p.last_stable_offset(),
        Isolation::ReadUncommitted => p.high_watermark(),
    }
}

/// Counts data actually sent to a consumer in the metrics.
fn count_served(state: &State, d: &v1::PartitionData) {
    state
        .metrics
        .consumed(&d.topic, &d.record_batches, d.records.len(), data_len(d));
}

fn data_len(d: &v1::PartitionData) -> usize {
    d.record_batches.len()
        + d.records
            .iter()
            .map(|r| r.value.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>()
}

/// Resolves when any partition's high watermark passes its threshold.
async fn any_new_data(waits: &[(Arc<Partition>, u64)]) {
    if waits.is_empty() {
        return std::future::pending().await;
    }
    let futs: Vec<_> = waits
        .iter()
        .map(|(p, after)| Box::pin(p.data_available(*after)))
        .collect();
    select_all(futs).await;
}

#[tonic::async_trait]
impl ConsumeService for Consume {
    async fn fetch(
        &self,
        req: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        timed(&self.state.metrics, "Fetch", async move {
            let who = principal(&req);
            let req = req.into_inner();
            let limits = &self.state.config.limits;
            if req.partitions.len() > limits.max_partitions_per_request {
                return Err(BrokerError::InvalidRequest(format!(
                    "{} partitions in one request, the limit is {}",
                    req.partitions.len(),
                    limits.max_partitions_per_request
                ))
                .into());
            }
            let wait =
                Duration::from_millis(u64::from(req.max_wait_ms.min(limits.max_fetch_wait_ms)));
            let deadline = Instant::now() + wait;
            let mut targets = Vec::with_capacity(req.partitions.len());
            for pf in &req.partitions {
                let p = who
                    .require(Action::Consume, &pf.topic)
                    .and_then(|()| Ok(self.state.log.partition(&pf.topic, pf.partition)?))
                    .map_err(partition_error);
                targets.push((
                    p,
                    pf.offset,
                    self.clamp_bytes(pf.max_bytes),
                    pf.topic.clone(),
                    pf.partition,
                ));
            }
            let targets = Arc::new(targets);
            let mut shutdown = self.state.shutdown.clone();
            loop {
                let state = self.state.clone();
                let t = targets.clone();
                let decode = req.decode_records;
                let iso = isolation(req.isolation_level);
                let results: Vec<v1::PartitionData> = blocking(move || {
                    t.iter()
                        .map(|(p, offset, max, topic, partition)| match p {
                            Ok(p) => read_partition(&state, p, *offset, *max, decode, iso),
                            Err(e) => v1::PartitionData {
                                topic: topic.clone(),
                                partition: *partition,
                                next_offset: *offset,
                                error: Some(e.clone()),
                                ..Default::default()
                            },
                        })
                        .collect()
                })
                .await?;
                let total: usize = results.iter().map(data_len).sum();
                let any_error = results.iter().any(|r| r.error.is_some());
                if total >= req.min_bytes.max(1) as usize
                    || any_error
                    || Instant::now() >= deadline
                    || *shutdown.borrow()
                {
                    for r in &results {
                        count_served(&self.state, r);
                    }
                    return Ok(Response::new(v1::FetchResponse {
                        partitions: results,
                    }));
                }
                let waits: Vec<_> = targets
                    .iter()
                    .zip(&results)
                    .filter_map(|((p, ..), r)| {
                        p.as_ref().ok().map(|p| (p.clone(), r.high_watermark))
                    })
                    .collect();
                tokio::select! {
                    () = any_new_data(&waits) => {}
                    () = tokio::time::sleep_until(deadline) => {}
                    _ = shutdown.changed() => {}
                }
            }
        })
        .await
    }

    type SubscribeStream = ReceiverStream<Result<v1::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        timed(&self.state.metrics, "Subscribe", async move {
            let who = principal(&req);
            let req = req.into_inner();
            let limits = &self.state.config.limits;
            if req.partitions.is_empty() || req.partitions.len() > limits.max_partitions_per_request
            {
                return Err(BrokerError::InvalidRequest(format!(
                    "subscribe to 1 to {} partitions",
                    limits.max_partitions_per_request
                ))
                .into());
            }
            let iso = isolation(req.isolation_level);
            let mut followed = Vec::with_capacity(req.partitions.len());
            for sp in &req.partitions {
                who.require(Action::Consume, &sp.topic)?;
                let p = self
                    .state
                    .log
                    .partition(&sp.topic, sp.partition)
                    .map_err(BrokerError::from)?;
                let start = resolve_start(&p, sp.start.as_ref(), iso)?;
                followed.push((p, start));
            }
            let max_bytes = self.clamp_bytes(req.max_bytes);
            // At least every half idle timeout, so an idle subscription keeps its connection.
            let longest = u32::try_from(limits.idle_timeout_ms / 2).unwrap_or(u32::MAX);
            let asked = if req.heartbeat_interval_ms == 0 {
                DEFAULT_HEARTBEAT_MS
            } else {
                req.heartbeat_interval_ms
            };
            let heartbeat = Duration::from_millis(u64::from(asked.min(longest).max(100)));
            let (tx, rx) = mpsc::channel(1);
            let state = self.state.clone();
            tokio::spawn(follow(
                state,
                followed,
                max_bytes,
                (req.decode_records, iso),
                heartbeat,
                tx,
            ));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn list_offsets(
        &self,
        req: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        timed(&self.state.metrics, "ListOffsets", async move {
            let who = principal(&req);
            let req = req.into_inner();
            let limit = self.state.config.limits.max_partitions_per_request;
            if req.queries.len() > limit {
                return Err(BrokerError::InvalidRequest(format!(
                    "{} queries in one request, the limit is {limit}",
                    req.queries.len()
                ))
                .into());
            }
            let state = self.state.clone();
            let iso = isolation(req.isolation_level);
            let answers = blocking(move || {
                req.queries
                    .into_iter()
                    .map(|q| {
                        let mut a = v1::OffsetAnswer {
                            topic: q.topic.clone(),
                            partition: q.partition,
                            ..Default::default()
                        };
                        let res = who.require(Action::Describe, &q.topic).and_then(|()| {
                            let p = state.log.partition(&q.topic, q.partition)?;
                            Ok(
                                match v1::OffsetSpec::try_from(q.spec)
                                    .unwrap_or(v1::OffsetSpec::Latest)
                                {
                                    v1::OffsetSpec::Earliest => (p.log_start_offset(), true),
                                    v1::OffsetSpec::Unspecified | v1::OffsetSpec::Latest => {
                                        (readable_end(&p, iso), true)
                                    }
                                    v1::OffsetSpec::Timestamp => {
                                        match p.offset_for_timestamp(q.timestamp_ms)? {
                                            Some(o) => (o, true),
                                            None => (p.high_watermark(), false),
                                        }
                                    }
                                },
                            )
                        });
                        match res {
                            Ok((offset, found)) => {
                                a.offset = offset;
                                a.found = found;
                            }
                            Err(e) => a.error = Some(partition_error(e)),
                        }
                        a
                    })
                    .collect()
            })
            .await?;
            Ok(Response::new(v1::ListOffsetsResponse { answers }))
        })
        .await
    }
}

fn resolve_start(
    p: &Partition,
    start: Option<&v1::StartPosition>,
    isolation: Isolation,
) -> Result<u64, BrokerError> {
    use v1::start_position::Position;
    Ok(match start.and_then(|s| s.position) {
        None | Some(Position::Latest(_)) => readable_end(p, isolation),
        Some(Position::Earliest(_)) => p.log_start_offset(),
        Some(Position::Offset(o)) => {
            // Like Fetch: an offset outside the log is an error now, not a silent wait.
            let (log_start, high_watermark) = (p.log_start_offset(), p.high_watermark());
            if o < log_start || o > high_watermark {
                return Err(BrokerError::Engine(
                    spool_log_engine::Error::OffsetOutOfRange {
                        requested: o,
                        log_start,
                        high_watermark,
                    },
                ));
            }
            o
        }
        Some(Position::TimestampMs(ts)) => p
            .offset_for_timestamp(ts)?
            .unwrap_or_else(|| p.high_watermark()),
    })
}

/// The body of one subscription: push data as it is appended, heartbeats when idle.
/// Read-committed: data up to the last stable offset; when a partition has nothing more to
/// give, it waits for the high watermark to move past what it was (a marker moving the last
/// stable offset is itself an append).
async fn follow(
    state: Arc<State>,
    followed: Vec<(Arc<Partition>, u64)>,
    max_bytes: u32,
    (decode, iso): (bool, Isolation),
    heartbeat: Duration,
    tx: mpsc::Sender<Result<v1::SubscribeResponse, Status>>,
) {
    let mut next: Vec<u64> = followed.iter().map(|(_, o)| *o).collect();
    // Per partition: the high watermark to wait past when nothing is readable.
    let mut wait_past: Vec<u64> = next.clone();
    let parts: Vec<Arc<Partition>> = followed.into_iter().map(|(p, _)| p).collect();
    let mut shutdown = state.shutdown.clone();
    let mut idle_since = Instant::now();
    loop {
        if *shutdown.borrow() {
            let _ = tx
                .send(Err(Status::unavailable("the broker is shutting down")))
                .await;
            return;
        }
        let mut sent = false;
        for (i, p) in parts.iter().enumerate() {
            let hwm = p.high_watermark();
            wait_past[i] = next[i].max(hwm);
            if next[i] >= readable_end(p, iso) {
                continue;
            }
            let (state2, p2, off) = (state.clone(), p.clone(), next[i]);
            let Ok(data) = tokio::task::spawn_blocking(move || {
                read_partition(&state2, &p2, off, max_bytes, decode, iso)
            })
            .await
            else {
                return;
            };
            if let Some(err) = &data.error {
                let status = crate::error::partition_status(&data.topic, data.partition, err);
                let _ = tx.send(Err(status)).await;
                return;
            }
            if data.next_offset == next[i] {
                continue; // nothing readable after all (the LSO had not moved)
            }
            next[i] = data.next_offset;
            count_served(&state, &data);
            let msg = v1::SubscribeResponse {
                message: Some(v1::subscribe_response::Message::Data(data)),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return; // the client went away
            }
            sent = true;
        }
        if sent {
            idle_since = Instant::now();
            continue;
        }
        let waits: Vec<_> = parts
            .iter()
            .zip(&wait_past)
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        tokio::select! {
            () = any_new_data(&waits) => {}
            () = tokio::time::sleep_until(idle_since + heartbeat) => {
                let hwms = parts.iter().map(|p| p.high_watermark()).collect();
                let msg = v1::SubscribeResponse { message: Some(v1::subscribe_response::Message::Heartbeat(v1::Heartbeat { high_watermarks: hwms })) };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                idle_since = Instant::now();
            }
            _ = shutdown.changed() => {}
            () = tx.closed() => return,
        }
    }
}
