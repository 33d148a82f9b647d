//! Starting and stopping the real `spoold`.

use std::path::Path;
use std::time::Duration;

use spool_proto::v1::admin_service_client::AdminServiceClient;
use spool_proto::v1::consume_service_client::ConsumeServiceClient;
use spool_proto::v1::offset_service_client::OffsetServiceClient;
use spool_proto::v1::produce_service_client::ProduceServiceClient;
pub(crate) use spool_testkit::Launch;
use tonic::transport::Channel;

/// A running broker (the workspace's one launcher, `spool_testkit::Spoold`); killed (SIGKILL)
/// when dropped unless stopped first.
pub(crate) struct Spoold {
    process: spool_testkit::Spoold,
    pub(crate) addr: String,
    /// `host:port` of the metrics listener.
    pub(crate) metrics_addr: String,
}

impl Spoold {
    /// Starts spoold on `data_dir` with extra flags, waiting until it listens.
    pub(crate) fn start(data_dir: &Path, extra: &[&str]) -> Spoold {
        Self::start_env(data_dir, extra, &[])
    }

    /// The launch these tests use: this package's `spoold`, metrics on an ephemeral port,
    /// `SPOOL_LOG=info`.
    pub(crate) fn launch(data_dir: &Path) -> Launch {
        Launch::new(env!("CARGO_BIN_EXE_spoold"), data_dir)
            .metrics("127.0.0.1:0")
            .log("info")
            .ready_timeout(Duration::from_secs(30))
    }

    pub(crate) fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Spoold {
        let mut l = Self::launch(data_dir).args(extra);
        for (k, v) in env {
            l = l.env(k, v);
        }
        Self::start_launch(&l)
    }

    /// Starts spoold with its open-files limit (`RLIMIT_NOFILE`, soft and hard) set to
    /// `nofile`, through `sh -c 'ulimit -n N && exec spoold …'` (every machine has `sh`).
    pub(crate) fn start_with_open_files(data_dir: &Path, extra: &[&str], nofile: u64) -> Spoold {
        Self::start_under_ulimit(data_dir, extra, "-n", nofile)
    }

    /// Starts spoold with only its soft open-files limit set to `nofile` (the hard limit is
    /// the test's).
    pub(crate) fn start_with_soft_open_files(data_dir: &Path, nofile: u64) -> Spoold {
        Self::start_under_ulimit(data_dir, &[], "-Sn", nofile)
    }

    fn start_under_ulimit(data_dir: &Path, extra: &[&str], flag: &str, nofile: u64) -> Spoold {
        let script = format!("ulimit {flag} \"$0\" && exec \"$@\"");
        let l = Self::launch(data_dir).args(extra).wrapper([
            "sh",
            "-c",
            script.as_str(),
            &nofile.to_string(),
        ]);
        Self::start_launch(&l)
    }

    /// Starts `launch`, waiting until it listens.
    pub(crate) fn start_launch(launch: &Launch) -> Spoold {
        let process = launch.start().unwrap_or_else(|e| panic!("{e:#}"));
        Spoold {
            addr: process.addr.clone(),
            metrics_addr: process.metrics_addr.clone().unwrap_or_default(),
            process,
        }
    }

    /// GET /metrics over plain HTTP/1.0 from `addr` (blocking); returns the body.
    pub(crate) fn scrape_addr(addr: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connecting to /metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: spool\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        body.to_owned()
    }

    /// The value of an unlabelled metric (`name value` in the scrape).
    pub(crate) fn metric<T: std::str::FromStr>(&self, name: &str) -> T {
        let body = Spoold::scrape_addr(&self.metrics_addr);
        body.lines()
            .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
    }

    /// The broker's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid().expect("running")
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connecting to spoold")
    }

    pub(crate) async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    pub(crate) async fn produce(&self) -> ProduceServiceClient<Channel> {
        ProduceServiceClient::new(self.channel().await)
            .max_encoding_message_size(256 << 20)
            .max_decoding_message_size(64 << 20)
    }

    pub(crate) async fn consume(&self) -> ConsumeServiceClient<Channel> {
        ConsumeServiceClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// Creates `topic` with `partitions` partitions and the default configuration.
    pub(crate) async fn create_topic(&self, topic: &str, partitions: u32) {
        self.create_topic_with(topic, partitions, None).await;
    }

    /// Creates `topic` with `partitions` partitions and `config` (the broker's defaults if
    /// `None`).
    pub(crate) async fn create_topic_with(
        &self,
        topic: &str,
        partitions: u32,
        config: Option<spool_proto::v1::TopicConfig>,
    ) {
        self.admin()
            .await
            .create_topic(spool_proto::v1::CreateTopicRequest {
                topic: topic.into(),
                partitions,
                config,
            })
            .await
            .unwrap_or_else(|e| panic!("creating topic {topic}: {e}"));
    }

    pub(crate) async fn offsets(&self) -> OffsetServiceClient<Channel> {
        OffsetServiceClient::new(self.channel().await)
    }

    /// A partition's high watermark, from a fetch that does not wait (one byte asked for).
    pub(crate) async fn high_watermark(&self, topic: &str, partition: u32) -> u64 {
        let f = self
            .consume()
            .await
            .fetch(spool_proto::v1::FetchRequest {
                partitions: vec![spool_proto::v1::PartitionFetch {
                    topic: topic.into(),
                    partition,
                    offset: 0,
                    max_bytes: 1,
                }],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("fetching {topic}/{partition}: {e}"))
            .into_inner();
        f.partitions[0].high_watermark
    }

    /// SIGTERM, then wait for a clean exit, which must not have reached the graceful
    /// shutdown's deadline (`shutdown_timeout_ms`, 10 s: the broker then logs "did not finish
    /// in time"); returns how long it took.
    ///
    /// A stop that reaches the deadline means a stream or connection held the shutdown: one
    /// the broker should have ended, or this test's current-thread runtime, blocked here,
    /// unable to answer the server's graceful-shutdown GOAWAY PING (run such a test
    /// multi-threaded). Judged by the broker's own warning, and by the clock only past 9 s:
    /// fsyncing every partition on a loaded machine may take seconds.
    pub(crate) fn stop(mut self) -> Duration {
        let took = self.stop_now();
        let stderr = self.stderr();
        assert!(
            took < Duration::from_secs(9) && !stderr.contains("did not finish in time"),
            "spoold took {took:?} to stop: something held its graceful shutdown (see this \
             method's doc); stderr:\n{stderr}"
        );
        took
    }

    /// SIGTERM, then wait for a clean exit; how long it took.
    fn stop_now(&mut self) -> Duration {
        match self.process.stop(Duration::from_secs(20)) {
            Ok((status, took)) => {
                assert!(
                    status.success(),
                    "spoold exited with {status}; stderr:\n{}",
                    self.stderr()
                );
                took
            }
            Err(e) => panic!("{e:#}; stderr:\n{}", self.stderr()),
        }
    }

    /// SIGKILL.
    pub(crate) fn kill(mut self) {
        self.process.kill();
    }

    pub(crate) fn stderr(&self) -> String {
        self.process.stderr()
    }
}

/// A record for a RecordList.
pub(crate) fn record(key: Option<&str>, value: &str) -> spool_proto::v1::Record {
    spool_proto::v1::Record {
        key: key.map(|k| bytes::Bytes::copy_from_slice(k.as_bytes())),
        value: Some(bytes::Bytes::copy_from_slice(value.as_bytes())),
        timestamp_ms: 0,
        headers: vec![],
    }
}
