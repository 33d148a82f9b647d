//! ProduceService: appends.
//!
//! A pre-encoded batch is appended exactly as received (the engine checks it; nothing is
//! re-encoded). A record list is encoded into one batch here. Durability follows `acks`,
//! independently of the topic's fsync policy:
//! - `none`: the reply goes out once the request is checked; the append runs afterwards;
//! - `written`: reply after the page-cache write; under `fsync = always` a background group
//!   commit then makes the batch durable (and visible to readers);
//! - `durable` (default): reply after an fdatasync covered the batch, whatever the policy.

use std::sync::Arc;

use bytes::Bytes;
use spool_log_engine::{FsyncPolicy, Partition};
use spool_proto::v1::{self, produce_service_server::ProduceService};
use tonic::{Request, Response, Status};

use super::{check_user_topic, now_ms};
use crate::convert::encode_records;
use crate::error::{BrokerError, partition_error};
use crate::{State, blocking};

#[derive(Debug)]
pub(crate) struct Produce {
    state: Arc<State>,
}

impl Produce {
    pub(crate) fn new(state: Arc<State>) -> Produce {
        Produce { state }
    }
}

/// Checks one partition's part of a request: where it goes, and the batch bytes.
fn prepare(
    state: &State,
    pp: v1::PartitionProduce,
    now: i64,
) -> Result<(Arc<Partition>, Bytes), BrokerError> {
    check_user_topic(&pp.topic)?;
    let partition = state.log.partition(&pp.topic, pp.partition)?;
    let batch = match pp.data {
        Some(v1::partition_produce::Data::RecordBatch(b)) => b,
        Some(v1::partition_produce::Data::Records(list)) => {
            encode_records(&list, now, state.config.limits.max_records_per_request)?
        }
        None => {
            return Err(BrokerError::InvalidRequest(
                "no data: set record_batch or records".into(),
            ));
        }
    };
    Ok((partition, batch))
}

fn result(topic: String, partition: u32) -> v1::PartitionProduceResult {
    v1::PartitionProduceResult {
        topic,
        partition,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ProduceService for Produce {
    async fn produce(
        &self,
        req: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        let timer = self.state.metrics.rpc("Produce");
        let result: Result<Response<_>, Status> = async move {
            let req = req.into_inner();
            if *self.state.shutdown.borrow() {
                return Err(BrokerError::ShuttingDown.into());
            }
            let limit = self.state.config.limits.max_partitions_per_request;
            if req.partitions.len() > limit {
                return Err(BrokerError::InvalidRequest(format!(
                    "{} partitions in one request, the limit is {limit}",
                    req.partitions.len()
                ))
                .into());
            }
            let acks = v1::Acks::try_from(req.acks)
                .map_err(|_| BrokerError::InvalidRequest("unknown acks".into()))?;
            let now = now_ms();
            let mut results = Vec::with_capacity(req.partitions.len());
            let mut jobs = Vec::with_capacity(req.partitions.len());
            for (i, pp) in req.partitions.into_iter().enumerate() {
                let mut r = result(pp.topic.clone(), pp.partition);
                match prepare(&self.state, pp, now) {
                    Ok((p, batch)) => jobs.push((i, p, batch)),
                    Err(e) => r.error = Some(partition_error(e)),
                }
                results.push(r);
            }
            if acks == v1::Acks::None {
                tokio::task::spawn_blocking(move || {
                    for (_, p, batch) in jobs {
                        if let Err(e) = p.append(&batch) {
                            tracing::warn!(topic = p.topic(), partition = p.id(), error = %e, "acks=none append failed");
                        }
                    }
                });
                return Ok(Response::new(v1::ProduceResponse { results }));
            }
            let sizes: Vec<usize> = {
            let mut v = vec![0; results.len()];
            for (i, _, batch) in &jobs {
                v[*i] = batch.len();
            }
            v
        };
        let durable = acks != v1::Acks::Written;
            let outcomes = blocking(move || {
                // Write everything first, then wait for durability, so that one partition's
                // fdatasync overlaps with the writes to the next.
                let written: Vec<_> = jobs
                    .into_iter()
                    .map(|(i, p, batch)| (i, p.append_nowait(&batch).map(|info| (p, info))))
                    .collect();
                written
                    .into_iter()
                    .map(|(i, w)| {
                        let outcome = w.and_then(|(p, info)| {
                            let next = info.last_offset + 1;
                            if durable {
                                p.wait_durable(next)?;
                            } else if p.fsync_policy() == FsyncPolicy::Always {
                                // Readers see the batch once an fdatasync covers it: run one (it
                                // joins the partition's group commit) without holding the reply.
                                tokio::task::spawn_blocking(move || {
                                    if let Err(e) = p.wait_durable(next) {
                                        tracing::error!(topic = p.topic(), partition = p.id(), error = %e, "background sync failed");
                                    }
                                });
                            }
                            Ok(info)
                        });
                        (i, outcome)
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
            for (i, outcome) in outcomes {
                let r = &mut results[i];
                match outcome {
                    Ok(info) => {
                        self.state.metrics.produced(&r.topic, sizes[i], info.last_offset - info.base_offset + 1);
                        r.base_offset = info.base_offset;
                        r.last_offset = info.last_offset;
                        r.log_append_time_ms = info.log_append_time_ms;
                    }
                    Err(e) => r.error = Some(partition_error(e)),
                }
            }
            Ok(Response::new(v1::ProduceResponse { results }))
            }
        .await;
        timer.finish(result)
    }
}
