//! `spool-bounces`: two halves in one binary.
//!
//! 1. **The tailer** ([`run_tailer`]) follows Postfix's log file ([`crate::postfix::tail`]),
//!    parses each line, and writes the lines that matter to `postfix-log` (keyed by queue id,
//!    each record naming the tailer's instance in [`LogRecord::source`]) **in one transaction
//!    with its position** (`postfix-log-position`, compacted, keyed by
//!    [`position_key`]: the instance id and the log path). At start it reads its last
//!    committed position back (read committed), so after any crash it resumes exactly after
//!    the last line it published: nothing re-emitted, nothing skipped.
//! 2. **The handler** ([`Bounces`]) reads `postfix-log` and runs the [`Tracker`] per queue id
//!    of each source (store `queue`, key `source/qid`): mail status, delivery issues and, for
//!    hard bounces, the address flag, written to every partition of `address-status`
//!    (matching's users of an address may be on any partition).
//!
//! # Several Postfix hosts
//!
//! One instance runs per Postfix host (`deploy/pipeline/bounces.toml`), each with its own
//! `instance_id` (the host name by default) and usually the same `log_path`. Invariants:
//!
//! - A tailer's position is stored and read back under `<instance id>:<log path>` only: a
//!   tailer never resumes from another host's position. (Positions used to be keyed by the
//!   path alone, so hosts overwrote each other's: a restarted tailer re-published its whole
//!   log, or seeked to another file's offset and skipped or repeated lines.)
//! - The old key (the path alone) is taken over **once, by its owner**: a tailer that starts
//!   without a position of its own claims it only if its inode is a file this host can see
//!   (the path or a rotated name, [`Tailer::rotated_names`]), and then, before reading any
//!   line, commits a transaction of its own that writes the position under its own key and
//!   deletes the old key (a tombstone). A tailer that cannot see that inode leaves the old
//!   key alone and starts at its file's start, as a new tailer does: hosts without a usable
//!   old position re-publish their current file once at the upgrade (with new ids, so those
//!   repeats are not dropped by id). Whatever order the hosts start in, only the host whose
//!   file has that inode resumes from it. (Hosts built from one image can share an inode
//!   number for the same path; then a non-owner that starts first still takes it, at a
//!   wrong offset, once: the bug this fixes, which the old key cannot tell apart.)
//! - Event ids are `<source>.<inode>.<offset>.<n>`: unique across hosts (an inode and offset
//!   are only unique on one host). Records written before the upgrade (no source) keep their
//!   ids `<inode>.<offset>.<n>`, so a replay of them gives the ids they had.
//! - Queue ids are only unique per host (Postfix's short ids can collide), so the handler's
//!   state is per `source/qid`; a message whose lines straddle the upgrade finds its state
//!   under the bare queue id once and moves it (any line but cleanup's message-id, which
//!   starts a message). `postfix-log` stays keyed (partitioned) by the
//!   bare queue id, so every line of one message still reaches one partition.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use spool_client::{
    Client, FetchOptions, ProducerRecord, TransactionalConfig, TransactionalProducer,
};
use spool_processor::{Context, Failure, Handler, Input};

use crate::postfix::parse::{LogLine, parse};
use crate::postfix::tail::{Position, Tailer};
use crate::postfix::tracker::{Message, Output, Tracker};
use crate::processors::{broadcast, emit};
use crate::topics;

/// `[app]` of `spool-bounces`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BouncesSettings {
    /// Postfix's log file (`maillog_file`); "" runs the handler only.
    pub log_path: String,
    /// Domain of our Message-IDs.
    pub message_id_domain: String,
    /// Partitions of `address-status` (= matching's partitions): 0 (the default) takes the
    /// topic's count at start; another value is the count expected, and the start is refused
    /// if the topic has another ([`crate::processors::resolve_broadcast_partitions`]).
    pub address_partitions: u32,
    /// Poll interval of the log file, ms.
    pub poll_ms: u64,
    /// Lines per transaction at most.
    pub batch_lines: usize,
}

impl Default for BouncesSettings {
    fn default() -> Self {
        BouncesSettings {
            log_path: String::new(),
            message_id_domain: "deals.spool.local".into(),
            address_partitions: 0,
            poll_ms: 50,
            batch_lines: 2_000,
        }
    }
}

/// One parsed line on `postfix-log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRecord {
    /// The parsed line.
    pub line: LogLine,
    /// Where it ended in the file (inode, offset): unique, so a usable event id.
    pub at: Position,
    /// When the tailer read it (ms).
    pub read_ms: i64,
    /// The instance id of the tailer that read it (one per Postfix host); "" in records
    /// written before positions were kept per instance.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

impl LogRecord {
    /// The event id prefix of this line's outputs: `<source>.<inode>.<offset>` (unique across
    /// hosts), or `<inode>.<offset>` for a record without a source.
    pub fn event_id(&self) -> String {
        if self.source.is_empty() {
            format!("{}.{}", self.at.inode, self.at.offset)
        } else {
            format!("{}.{}.{}", self.source, self.at.inode, self.at.offset)
        }
    }
}

/// The key of a tailer's position in `postfix-log-position`: `<instance id>:<log path>`
/// (instance ids are `[A-Za-z0-9._-]`, so the first `:` ends it).
pub fn position_key(instance_id: &str, log_path: &str) -> String {
    format!("{instance_id}:{log_path}")
}

/// Where a tailer resumes, as read back from `postfix-log-position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPosition {
    /// The position.
    pub position: Position,
    /// Found under the old key (the log path alone, before positions were kept per instance):
    /// taken over only by the host that has its inode, which deletes that key at once.
    pub legacy: bool,
}

/// The handler half.
#[derive(Debug)]
pub struct Bounces {
    tracker: Tracker,
    address_partitions: u32,
}

impl Bounces {
    /// A handler with these settings; `address_partitions` is the count resolved at start
    /// (the binary asks the broker), so at least 1.
    pub fn new(s: &BouncesSettings) -> anyhow::Result<Bounces> {
        anyhow::ensure!(
            s.address_partitions >= 1,
            "[app] address_partitions must be at least 1 (address-status's partition count, \
             resolved from the broker at start)"
        );
        Ok(Bounces {
            tracker: Tracker::new(s.message_id_domain.clone()),
            address_partitions: s.address_partitions,
        })
    }
}

impl Handler for Bounces {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let r: LogRecord = input.json()?;
        let Some(qid) = r.line.qid() else {
            return Ok(());
        };
        let key = if r.source.is_empty() {
            qid.to_owned()
        } else {
            format!("{}/{qid}", r.source)
        };
        let mut store = ctx.store("queue")?;
        let mut msg: Option<Message> = store.get_json(key.as_bytes())?;
        if msg.is_none() && !r.source.is_empty() && !matches!(r.line, LogLine::MessageId { .. }) {
            // A message whose earlier lines were published before records named their source
            // (cleanup's message-id line starts a message: it never continues an old one).
            msg = store.get_json(qid.as_bytes())?;
            if msg.is_some() {
                store.delete(qid.as_bytes());
            }
        }
        let (next, outputs) = self.tracker.apply(msg, &r.line, r.read_ms);
        match next {
            Some(m) => store.put_json(key.as_bytes(), &m)?,
            None => store.delete(key.as_bytes()),
        }
        let id = r.event_id();
        for (i, o) in outputs.into_iter().enumerate() {
            let id = format!("{id}.{i}");
            match o {
                Output::Status(s) => emit(ctx, id, &s, s.at_ms)?,
                Output::Issue(d) => emit(ctx, id, &d, d.at_ms)?,
                Output::Flag(f) => broadcast(
                    ctx,
                    topics::ADDRESS_STATUS,
                    self.address_partitions,
                    id,
                    &f,
                    f.at_ms,
                )?,
            }
        }
        Ok(())
    }
}

/// The last committed position of the tailer `instance_id` for `log_path`, read back from
/// `postfix-log-position` (read committed, up to the last stable offset): the latest record
/// under [`position_key`], else the latest under the old key (the path alone; a tombstone
/// there means it was claimed already). Call after the transactional producer fenced any
/// earlier incarnation, so no transaction of ours is left open.
pub async fn stored_position(
    client: &Client,
    instance_id: &str,
    log_path: &str,
) -> anyhow::Result<Option<StoredPosition>> {
    let opts = FetchOptions::default(); // read committed
    let own_key = position_key(instance_id, log_path);
    let mut offset = 0u64;
    let mut own = None;
    let mut legacy = None;
    loop {
        let f = match client
            .fetch(topics::POSTFIX_LOG_POSITION, 0, offset, &opts)
            .await
        {
            Ok(f) => f,
            Err(spool_client::Error::OffsetOutOfRange(r))
                if r.log_start_offset.is_some_and(|s| offset < s) =>
            {
                offset = r.log_start_offset.unwrap_or(0);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for r in &f.records {
            let slot = match r.key.as_deref() {
                Some(k) if k == own_key.as_bytes() => &mut own,
                Some(k) if k == log_path.as_bytes() => &mut legacy,
                _ => continue,
            };
            *slot = match &r.value {
                Some(v) => Some(serde_json::from_slice::<Position>(v)?),
                None => None, // a tombstone
            };
        }
        if f.next_offset <= offset || f.next_offset >= f.last_stable_offset {
            return Ok(match (own, legacy) {
                (Some(position), _) => Some(StoredPosition {
                    position,
                    legacy: false,
                }),
                (None, Some(position)) => Some(StoredPosition {
                    position,
                    legacy: true,
                }),
                (None, None) => None,
            });
        }
        offset = f.next_offset;
    }
}

/// Follows the log and publishes its lines with the position (under
/// [`position_key`]`(instance_id, log_path)`), until `stop` resolves.
///
/// A failure (the broker unreachable or restarted, the transaction aborted or fenced, the
/// file unreadable) is logged and the tailer starts over after a delay ([`Backoff`]: 100 ms
/// doubling to 5 s while it keeps failing, back to 100 ms once it works again): a new
/// transactional producer (which aborts whatever was left open), the position read back from
/// what was committed, the file reopened there. Without this the tailer task ended at the
/// first broker outage while the process and its handler went on, and nothing more of the
/// log was ever published (found by `tests/kill9.rs`).
pub async fn run_tailer(
    client: Client,
    instance_id: String,
    transactional_id: String,
    s: BouncesSettings,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let mut backoff = Backoff::default();
    let ids = (instance_id.as_str(), transactional_id.as_str());
    loop {
        match tail(&client, ids, &s, &mut stop, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                retry_in_ms = backoff.delay().as_millis() as u64,
                "tailer failed; starting over from the last committed position"
            ),
        }
        let delay = backoff.failed();
        tokio::select! {
            () = stop.as_mut() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The tailer's delay before it starts over: [`Backoff::MIN`] doubling per failure in a row up
/// to [`Backoff::MAX`], and back to the minimum as soon as the tailer works again (its setup
/// got answers from the broker, or a transaction committed). It used to be reset only when
/// the failed incarnation had lasted 10 s, so broker outages a few seconds apart left it at
/// 5 s for good: up to 5 s more before the lines after each later outage were published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Self::MIN)
    }
}

impl Backoff {
    /// The first delay after the tailer worked.
    pub const MIN: Duration = Duration::from_millis(100);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(5);

    /// The delay the next failure waits.
    pub fn delay(&self) -> Duration {
        self.0
    }

    /// A failure: the delay to wait now (the next one doubles).
    pub fn failed(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        now
    }

    /// The tailer works again: the next failure waits the minimum.
    pub fn succeeded(&mut self) {
        self.0 = Self::MIN;
    }
}

/// Whether a file with `inode` is at `path` or one of its rotated names on this host.
fn sees_inode(path: &std::path::Path, inode: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::iter::once(path.to_path_buf())
        .chain(Tailer::rotated_names(path))
        .any(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == inode))
}

/// One incarnation of the tailer: from the committed position until `stop` (Ok) or a failure.
async fn tail<F: std::future::Future<Output = ()>>(
    client: &Client,
    (instance_id, transactional_id): (&str, &str),
    s: &BouncesSettings,
    stop: &mut std::pin::Pin<&mut F>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let path = PathBuf::from(&s.log_path);
    let partitions = client
        .describe_topic(topics::POSTFIX_LOG)
        .await?
        .partitions
        .len() as u32;
    let mut tx = TransactionalProducer::new(
        client.clone(),
        TransactionalConfig::new(transactional_id.to_owned()),
    )
    .await?;
    let mut stored = stored_position(client, instance_id, &s.log_path).await?;
    let key = position_key(instance_id, &s.log_path);
    if let Some(old) = stored.filter(|p| p.legacy) {
        if sees_inode(&path, old.position.inode) {
            // Ours (this host has that file): moved to our key and the old key deleted, in a
            // transaction of its own before any line, so no other host can take it after.
            tx.begin()?;
            let pos = ProducerRecord::new(serde_json::to_vec(&old.position)?)
                .key(Bytes::copy_from_slice(key.as_bytes()));
            tx.send(topics::POSTFIX_LOG_POSITION, 0, pos).await?;
            let tombstone = ProducerRecord {
                key: Some(Bytes::copy_from_slice(s.log_path.as_bytes())),
                value: None,
                headers: Vec::new(),
                timestamp_ms: None,
            };
            tx.send(topics::POSTFIX_LOG_POSITION, 0, tombstone).await?;
            if let Err(e) = tx.commit().await {
                tx.abort().await.ok();
                return Err(anyhow::anyhow!("claiming the old log position failed: {e}"));
            }
            tracing::warn!(path = %path.display(), key, "resuming from the position stored under the log path alone \
                (before positions were kept per instance); it is moved to this instance's key");
        } else {
            tracing::warn!(path = %path.display(), inode = old.position.inode,
                "the position stored under the log path alone (before positions were kept per instance) \
                 is not of a file on this host: left to its owner; reading this host's file from its start");
            stored = None;
        }
    }
    let resume = stored.map(|p| p.position);
    tracing::info!(path = %path.display(), key, ?resume, "tailing Postfix's log");
    backoff.succeeded(); // the broker answered: an outage (if any) is over
    let mut tailer = Tailer::open(&path, resume)?;
    loop {
        let lines = tailer.poll(s.batch_lines)?;
        if lines.is_empty() {
            tokio::select! {
                () = stop.as_mut() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(s.poll_ms)) => continue,
            }
        }
        let now = jiff::Timestamp::now().as_millisecond();
        let last = lines.last().expect("non-empty").after;
        tx.begin()?;
        for l in lines {
            let line = parse(&l.text);
            let Some(qid) = line.qid() else { continue };
            let p = spool_client::partitioner::partition_for_key(qid.as_bytes(), partitions);
            let rec = LogRecord {
                line: line.clone(),
                at: l.after,
                read_ms: now,
                source: instance_id.to_owned(),
            };
            let value = serde_json::to_vec(&rec)?;
            tx.send(
                topics::POSTFIX_LOG,
                p,
                ProducerRecord::new(value).key(Bytes::copy_from_slice(qid.as_bytes())),
            )
            .await?;
        }
        let pos = ProducerRecord::new(serde_json::to_vec(&last)?)
            .key(Bytes::copy_from_slice(key.as_bytes()));
        tx.send(topics::POSTFIX_LOG_POSITION, 0, pos).await?;
        if let Err(e) = tx.commit().await {
            tx.abort().await.ok();
            // Our position is ahead of what is committed: start over from the stored one.
            return Err(anyhow::anyhow!("tailer transaction failed: {e}"));
        }
        backoff.succeeded();
    }
}

#[cfg(test)]
mod tests {
    use spool_processor::testing::TestDriver;

    use super::*;
    use crate::events::{AddressStatus, MailState, MailStatus};

    fn rec(line: &str, offset: u64) -> Vec<u8> {
        serde_json::to_vec(&LogRecord {
            line: parse(line),
            at: Position { inode: 1, offset },
            read_ms: 7,
            source: String::new(),
        })
        .unwrap()
    }

    fn rec_from(source: &str, line: &str, offset: u64) -> Vec<u8> {
        serde_json::to_vec(&LogRecord {
            line: parse(line),
            at: Position { inode: 1, offset },
            read_ms: 7,
            source: source.into(),
        })
        .unwrap()
    }

    /// Two Postfix hosts reuse one short queue id (and, with identical images, one inode):
    /// each host's message keeps its own state and its events their own ids. A message whose
    /// first lines were published without a source continues from its state under the bare
    /// queue id.
    #[test]
    fn hosts_sharing_a_queue_id_keep_apart_and_old_records_carry_on() {
        let b = Bounces::new(&BouncesSettings {
            message_id_domain: "d.test".into(),
            address_partitions: 1,
            ..BouncesSettings::default()
        })
        .unwrap();
        let mut d = TestDriver::new("bounces", b).with_topic(topics::POSTFIX_LOG, 1);
        let mid =
            |m: &str| format!("Dec 06 02:28:12 mta pf/cleanup[1]: Q1: message-id=<{m}@d.test>");
        let sent = |to: &str| {
            format!(
                "Dec 06 02:28:13 mta pf/smtp[1]: Q1: to=<{to}>, relay=x[1.2.3.4]:25, delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)"
            )
        };
        // Old record (no source) starts Q1 on host a; hosts a and b then both log Q1.
        d.pipe(topics::POSTFIX_LOG, "Q1", rec(&mid("ma"), 10));
        d.pipe(topics::POSTFIX_LOG, "Q1", rec_from("b", &mid("mb"), 10));
        d.pipe(
            topics::POSTFIX_LOG,
            "Q1",
            rec_from("a", &sent("x@a.test"), 20),
        );
        d.pipe(
            topics::POSTFIX_LOG,
            "Q1",
            rec_from("b", &sent("y@b.test"), 20),
        );
        let st = d.read_events::<MailStatus>(topics::MAIL_STATUS);
        let got: Vec<_> = st
            .iter()
            .map(|e| (e.id.as_str(), e.data.mail_id.as_str(), e.data.to.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.1.20.0", "ma", "x@a.test"),
                ("b.1.20.0", "mb", "y@b.test")
            ]
        );
        assert!(d.state("queue", b"Q1").is_none(), "moved to a/Q1");
        assert!(d.state("queue", b"a/Q1").is_some());
        assert!(d.state("queue", b"b/Q1").is_some());
    }

    #[test]
    fn tailer_backoff_doubles_while_failing_and_resets_once_it_works() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // A later outage after the tailer worked again starts from the minimum (it used to
        // stay at 5 s when the outages came less than 10 s apart).
        b.succeeded();
        assert_eq!(b.failed(), Backoff::MIN);
        assert_eq!(b.failed(), Backoff::MIN * 2);
    }

    #[test]
    fn bounce_flags_every_partition_and_state_is_forgotten() {
        let b = Bounces::new(&BouncesSettings {
            message_id_domain: "d.test".into(),
            address_partitions: 2,
            ..BouncesSettings::default()
        })
        .unwrap();
        let mut d = TestDriver::new("bounces", b).with_topic(topics::POSTFIX_LOG, 1);
        let l = |rest: &str| {
            format!("Dec 06 02:28:12 mta pf/x[1]: Q1: {rest}").replace(
                "pf/x",
                if rest.starts_with("message-id") {
                    "pf/cleanup"
                } else if rest.starts_with("to=") {
                    "pf/virtual"
                } else {
                    "pf/qmgr"
                },
            )
        };
        d.pipe(
            topics::POSTFIX_LOG,
            "Q1",
            rec(&l("message-id=<m1@d.test>"), 1),
        );
        d.restart();
        d.pipe(topics::POSTFIX_LOG, "Q1", rec(&l("to=<ghost@localhost>, relay=virtual, delay=0.04, delays=0/0.03/0/0.01, dsn=5.1.1, status=bounced (unknown user: \"ghost@localhost\")"), 2));
        d.pipe(topics::POSTFIX_LOG, "Q1", rec(&l("removed"), 3));
        let st = d.read_events::<MailStatus>(topics::MAIL_STATUS);
        assert_eq!(st.len(), 1);
        assert_eq!(
            (st[0].data.status, st[0].data.queue_id.as_deref()),
            (MailState::Bounced, Some("Q1"))
        );
        let flags = d.read_output(topics::ADDRESS_STATUS);
        assert_eq!(
            flags.iter().map(|r| r.partition).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let f = d.read_events::<AddressStatus>(topics::ADDRESS_STATUS);
        assert!(
            f.iter()
                .all(|e| e.data.address == "ghost@localhost" && e.data.unreachable)
        );
        assert_eq!(d.read_output(topics::DELIVERY_ISSUES).len(), 1);
        assert!(
            d.state("queue", b"Q1").is_none(),
            "removed forgets the queue id"
        );
    }
}
