//! The bare tonic ceiling: a gRPC server that speaks `spool.v1`'s produce path exactly as
//! `spoold` does on the wire (same messages, same HTTP/2 settings, same message-size limits)
//! but stores nothing. Each `Produce` / `ProduceStream` request is decoded by tonic and
//! prost (the batch stays a zero-copy `Bytes`, as in `spoold`) and answered at once with
//! offsets counted from the batch headers. Whatever the load generator reaches against it is
//! the most any broker built on this stack can reach on the same machine, so the `efficiency`
//! bench judges `spoold`'s produce throughput against it, measured in the same run.
//!
//! Nothing else is served but what the load generator needs: `DescribeTopic` /
//! `CreateTopic` (remembering the partition counts) and `InitProducerId`. Like `spoold`,
//! it runs in a process of its own (the bench re-executes itself, see [`CEILING_ENV`]), so
//! its CPU time is read from `/proc/<pid>/stat` the same way.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use futures_util::{Stream, StreamExt};
use spool_proto::v1::{self, admin_service_server, produce_service_server};
use spool_record::BatchHeader;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// When this environment variable is set (to `host:port`), a bench binary that supports it
/// serves the ceiling there instead of running its benchmarks.
pub const CEILING_ENV: &str = "SPOOL_BENCH_CEILING_LISTEN";
/// Tokio worker threads of the ceiling server (0 or unset: one per core).
pub const CEILING_THREADS_ENV: &str = "SPOOL_BENCH_CEILING_THREADS";
/// The line printed once listening, followed by the address.
pub const READY_LINE: &str = "ceiling listening on ";

/// Largest message either way: `spoold`'s default `max_request_bytes`.
const MAX_MESSAGE: usize = 64 << 20;
/// Replies a `ProduceStream` may have pending (`spoold`'s `MAX_IN_FLIGHT`).
const MAX_IN_FLIGHT: usize = 64;

#[derive(Debug, Default)]
struct State {
    topics: Mutex<HashMap<String, u32>>,
    next_offset: AtomicU64,
}

impl State {
    /// The reply to one request: offsets counted from each batch's header.
    fn results(&self, parts: Vec<v1::PartitionProduce>) -> Vec<v1::PartitionProduceResult> {
        parts
            .into_iter()
            .map(|pp| {
                let records = match &pp.data {
                    Some(v1::partition_produce::Data::RecordBatch(b)) => BatchHeader::parse(b)
                        .map(|h| u64::from(h.last_offset_delta.max(0) as u32) + 1)
                        .unwrap_or(1),
                    Some(v1::partition_produce::Data::Records(l)) => l.records.len() as u64,
                    None => 0,
                };
                let base = self.next_offset.fetch_add(records, Ordering::Relaxed);
                v1::PartitionProduceResult {
                    topic: pp.topic,
                    partition: pp.partition,
                    base_offset: base,
                    last_offset: base + records.saturating_sub(1),
                    ..Default::default()
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default)]
struct Ceiling(Arc<State>);

type ReplyStream = Pin<Box<dyn Stream<Item = Result<v1::ProduceStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl produce_service_server::ProduceService for Ceiling {
    async fn produce(
        &self,
        req: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        let results = self.0.results(req.into_inner().partitions);
        Ok(Response::new(v1::ProduceResponse { results }))
    }

    type ProduceStreamStream = ReplyStream;

    async fn produce_stream(
        &self,
        req: Request<Streaming<v1::ProduceStreamRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
        let state = self.0.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = incoming.next().await {
                let reply = v1::ProduceStreamResponse {
                    request_id: msg.request_id,
                    results: state.results(msg.partitions),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as ReplyStream
        ))
    }

    async fn init_producer_id(
        &self,
        _req: Request<v1::InitProducerIdRequest>,
    ) -> Result<Response<v1::InitProducerIdResponse>, Status> {
        Ok(Response::new(v1::InitProducerIdResponse {
            producer_id: 1,
            producer_epoch: 0,
        }))
    }
}

#[tonic::async_trait]
impl admin_service_server::AdminService for Ceiling {
    async fn create_topic(
        &self,
        req: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        let r = req.into_inner();
        self.0
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(r.topic, r.partitions.max(1));
        Ok(Response::new(v1::CreateTopicResponse { config: r.config }))
    }

    async fn delete_topic(
        &self,
        _req: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        Err(Status::unimplemented("the ceiling server stores nothing"))
    }

    async fn list_topics(
        &self,
        _req: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        Err(Status::unimplemented("the ceiling server stores nothing"))
    }

    async fn describe_topic(
        &self,
        req: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        let topic = req.into_inner().topic;
        let n = self
            .0
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&topic)
            .copied();
        let Some(n) = n else {
            return Err(Status::not_found(format!("no topic {topic}")));
        };
        Ok(Response::new(v1::DescribeTopicResponse {
            topic,
            config: None,
            partitions: (0..n)
                .map(|partition| v1::PartitionInfo {
                    partition,
                    ..Default::default()
                })
                .collect(),
        }))
    }

    async fn alter_topic_config(
        &self,
        _req: Request<v1::AlterTopicConfigRequest>,
    ) -> Result<Response<v1::AlterTopicConfigResponse>, Status> {
        Err(Status::unimplemented("the ceiling server stores nothing"))
    }

    async fn add_partitions(
        &self,
        _req: Request<v1::AddPartitionsRequest>,
    ) -> Result<Response<v1::AddPartitionsResponse>, Status> {
        Err(Status::unimplemented("the ceiling server stores nothing"))
    }
}

/// Serves the ceiling on `listen` until the process is killed, on a tokio runtime of
/// `threads` workers (0: one per core); prints [`READY_LINE`] and the address to stderr.
pub fn serve(listen: &str, threads: usize) -> Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    let rt = rt.build().context("tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        eprintln!("{READY_LINE}{}", listener.local_addr()?);
        let svc = Ceiling::default();
        // The HTTP/2 settings of spoold's server (broker/src/lib.rs), nothing more.
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20)
            .add_service(
                admin_service_server::AdminServiceServer::new(svc.clone())
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(
                produce_service_server::ProduceServiceServer::new(svc)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .context("serving")
    })
}

/// If [`CEILING_ENV`] is set, serves the ceiling (never returns unless it fails) — call this
/// first thing in a bench's `main`.
pub fn serve_if_asked() -> Result<()> {
    let Ok(listen) = std::env::var(CEILING_ENV) else {
        return Ok(());
    };
    let threads = std::env::var(CEILING_THREADS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    serve(&listen, threads)?;
    std::process::exit(0)
}
