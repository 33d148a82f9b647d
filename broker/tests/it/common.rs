//! Starting and stopping the real `spoold`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spool_proto::v1::admin_service_client::AdminServiceClient;
use spool_proto::v1::consume_service_client::ConsumeServiceClient;
use spool_proto::v1::offset_service_client::OffsetServiceClient;
use spool_proto::v1::produce_service_client::ProduceServiceClient;
use tonic::transport::Channel;

/// A running broker; killed (SIGKILL) when dropped unless stopped first.
pub(crate) struct Spoold {
    child: Option<Child>,
    pub(crate) addr: String,
    /// `host:port` of the metrics listener.
    pub(crate) metrics_addr: String,
    stderr_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Spoold {
    /// Starts spoold on `data_dir` with extra flags, waiting until it listens.
    pub(crate) fn start(data_dir: &Path, extra: &[&str]) -> Spoold {
        Self::start_env(data_dir, extra, &[])
    }

    pub(crate) fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Spoold {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spoold"));
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .env("SPOOL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting spoold");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("spoold listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
                keep.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "spoold did not start; stderr:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
        };
        let metrics_addr = lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix("spoold metrics on http://"))
            .map(|l| l.trim_end_matches("/metrics").to_owned())
            .unwrap_or_default();
        Spoold {
            child: Some(child),
            addr,
            metrics_addr,
            stderr_lines: lines,
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

    pub(crate) async fn offsets(&self) -> OffsetServiceClient<Channel> {
        OffsetServiceClient::new(self.channel().await)
    }

    /// SIGTERM, then wait for a clean exit; returns how long it took.
    pub(crate) fn stop(mut self) -> Duration {
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "spoold exited with {status}; stderr:\n{}",
                    self.stderr()
                );
                return t.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "spoold did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL.
    pub(crate) fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr_lines.lock().unwrap().join("\n")
    }
}

impl Drop for Spoold {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
