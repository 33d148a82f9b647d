//! Fault points for tests: `SPOOL_FAILPOINTS=name[,name…]` in the broker's environment arms
//! them. Read once; unset (production) each point costs one check of an empty list.
//!
//! Crash points ([`hit`]) make the broker abort (like kill -9: no cleanup, nothing flushed):
//! `txn-end-received` (an EndTxn that ends an open transaction arrived, nothing
//! decided yet: the restart aborts it), `txn-after-prepare` (a decision is durable, no marker written yet),
//! `txn-mid-markers` (right after the first marker of a decision), `txn-after-markers` (every
//! marker written, offsets not applied yet), `txn-before-complete` (offsets applied, the
//! completion not recorded yet).
//!
//! Panic points ([`panic_at`]) make the task that reaches them panic, as a bug would, so a
//! test can see what the client is told: `group-persist` (a group's state being appended, on
//! the blocking pool), `group-commit` (a fenced CommitOffsets being appended, on the blocking
//! pool), `produce-stream-reader` (a `ProduceStream`'s reader, per request received),
//! `produce-stream-writer` (its writer, per request before its write).
//!
//! Delay points ([`delay_at`]) hold the thread that reaches them for one second:
//! `produce-txn-before-append` (a request with transactional batches, registered in their
//! transactions and not appended yet). `name@N` arms a point
//! for its N-th hit only (counted from 1; the other hits pass).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// One armed point: its name, the hit it fires at (`None`: every hit) and the hits so far.
struct Point {
    name: String,
    at: Option<u64>,
    hits: AtomicU64,
}

static POINTS: OnceLock<Vec<Point>> = OnceLock::new();

fn points() -> &'static [Point] {
    POINTS.get_or_init(|| {
        std::env::var("SPOOL_FAILPOINTS")
            .map(|v| {
                v.split(',')
                    .filter_map(|s| {
                        let s = s.trim();
                        let (name, at) = match s.split_once('@') {
                            Some((n, at)) => match at.parse() {
                                Ok(at) => (n, Some(at)),
                                // Not armed at all rather than on every hit (an abort at the
                                // first one, for a crash point).
                                Err(_) => {
                                    eprintln!("spoold: failpoint {s:?} ignored: not name@N");
                                    return None;
                                }
                            },
                            None => (s, None),
                        };
                        Some(Point {
                            name: name.to_owned(),
                            at,
                            hits: AtomicU64::new(0),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// True if `name` is armed for this hit (counted).
fn fires(name: &str) -> bool {
    points().iter().any(|p| {
        p.name == name && {
            let n = p.hits.fetch_add(1, Ordering::Relaxed) + 1;
            p.at.is_none_or(|at| at == n)
        }
    })
}

/// Aborts the process if `name` is armed.
pub(crate) fn hit(name: &str) {
    if fires(name) {
        eprintln!("spoold: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// Sleeps one second (the calling thread: a blocking-pool thread) if `name` is armed, to
/// hold a request between two steps while a test does something else.
pub(crate) fn delay_at(name: &str) {
    if fires(name) {
        eprintln!("spoold: failpoint {name} reached: waiting 1 s");
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Panics (the calling task only) if `name` is armed.
pub(crate) fn panic_at(name: &str) {
    if fires(name) {
        panic!("failpoint {name} reached: panicking");
    }
}
