//! Shared helpers for the integration tests.

use spool_log_engine::{
    BatchBuilder, Compression, Log, LogOptions, Partition, Record, TopicConfig,
};

/// Options for tests: no maintenance or cleaner thread, so every effect on the log's contents is
/// caused by the test itself (the write-back thread only starts the kernel's write-back of
/// bytes already written: `writeback.rs`).
pub(crate) fn opts() -> LogOptions {
    LogOptions {
        background_maintenance: false,
        ..LogOptions::default()
    }
}

/// A batch of `n` records whose values are `"{tag}-{i}"`.
pub(crate) fn batch(tag: &str, n: usize, ts: i64) -> bytes::Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..n {
        let v = format!("{tag}-{i}");
        b.push(ts, Some(tag.as_bytes()), Some(v.as_bytes()), &[]);
    }
    b.finish().unwrap()
}

/// Every record readable from `offset` to the high watermark.
pub(crate) fn read_all(p: &Partition, mut offset: u64) -> Vec<Record> {
    let mut out = Vec::new();
    loop {
        let r = p.read(offset, 64 << 10).unwrap();
        if r.data.is_empty() {
            return out;
        }
        for b in r.batches() {
            for rec in b.unwrap().records(&Default::default()).unwrap() {
                out.push(rec.unwrap());
            }
        }
        offset = r.next_offset;
    }
}

/// Opens `dir` with one topic `t` configured by `cfg` (created if missing).
pub(crate) fn open_topic(dir: &std::path::Path, cfg: TopicConfig) -> Log {
    let log = Log::open(dir, opts()).unwrap();
    if log.topic_config("t").is_err() {
        log.create_topic("t", cfg).unwrap();
    }
    log
}

/// A tiny deterministic PRNG (xorshift64*), so that every randomised test reproduces from the
/// seed it prints.
#[derive(Clone, Debug)]
pub(crate) struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value, zero included).
    pub(crate) fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed: never zero, and nearby seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        XorShift((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }

    /// Uniform index into a collection of `len` items.
    pub(crate) fn index(&mut self, len: usize) -> usize {
        self.range(0, len as u64) as usize
    }

    /// `n` random bytes.
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// The seed to use: `$var` if set (decimal or 0x-hex), else `default`. Printed, so that any
/// failure can be rerun with the same seed.
pub(crate) fn seed(var: &str, default: u64) -> u64 {
    let seed = match std::env::var(var) {
        Ok(v) => {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{var}={v:?} is not a u64"))
        }
        Err(_) => default,
    };
    eprintln!("{var}={seed:#x}");
    seed
}

/// Copies a directory tree (regular files and directories only).
pub(crate) fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

/// Every regular file under `dir` with its contents, keyed by path relative to `dir`
/// (the `.lock` file excluded).
pub(crate) fn snapshot_files(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        out: &mut std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
    ) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else if entry.file_name() != ".lock" {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The segment log files (`*.log`) of a partition directory, oldest first.
pub(crate) fn segment_files(partition_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(partition_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// One batch found by walking a segment file's headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchSpan {
    /// Byte position in the file.
    pub(crate) pos: u64,
    /// Total bytes.
    pub(crate) len: u64,
    /// First offset.
    pub(crate) base_offset: u64,
    /// Offset after the batch.
    pub(crate) next_offset: u64,
}

impl BatchSpan {
    /// Byte position after the batch.
    pub(crate) fn end(&self) -> u64 {
        self.pos + self.len
    }
}

/// The batches of an intact segment image (panics on anything malformed).
pub(crate) fn batch_spans(data: &[u8]) -> Vec<BatchSpan> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let h = spool_log_engine::BatchHeader::parse(&data[pos..]).unwrap();
        assert!(
            pos + h.total_len() <= data.len(),
            "batch at {pos} runs past the end"
        );
        out.push(BatchSpan {
            pos: pos as u64,
            len: h.total_len() as u64,
            base_offset: h.base_offset,
            next_offset: h.next_offset(),
        });
        pos += h.total_len();
    }
    out
}

/// The recovery report of partition `id` of topic `t`.
pub(crate) fn report(log: &Log, id: u32) -> spool_log_engine::RecoveryReport {
    log.recovery_reports()
        .iter()
        .find(|(t, p, _)| t == "t" && *p == id)
        .map(|(_, _, r)| r.clone())
        .unwrap_or_else(|| panic!("no recovery report for t/{id}"))
}

/// The record values of `records`, as strings.
pub(crate) fn values(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap_or_default().to_vec()).unwrap())
        .collect()
}

/// A temporary directory for tests that open many short-lived copies of a data directory and
/// do not depend on what fsync makes durable (torn tails, bit flips: they damage files
/// directly, no power is lost). It lives on tmpfs (`/dev/shm`) when there is one, where fsync
/// costs nothing; on ext4 the same matrix spends ~40x longer in fsync. Set
/// `SPOOL_TEST_SCRATCH` to a directory to run them elsewhere (say, on the real disk).
pub(crate) fn scratch() -> tempfile::TempDir {
    let base = match std::env::var_os("SPOOL_TEST_SCRATCH") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::path::PathBuf::from("/dev/shm"),
    };
    match tempfile::Builder::new()
        .prefix("spool-it-")
        .tempdir_in(&base)
    {
        Ok(d) => d,
        Err(_) => tempfile::tempdir().unwrap(),
    }
}
