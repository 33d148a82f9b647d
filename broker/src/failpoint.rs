//! Crash points for crash tests: `SPOOL_FAILPOINTS=name[,name…]` in the broker's environment
//! makes it abort (like kill -9: no cleanup, nothing flushed) when it reaches a named point.
//! Read once; unset (production) it costs one check of an empty list.
//!
//! Points: `txn-end-received` (an EndTxn that ends an open transaction arrived, nothing
//! decided yet: the restart aborts it), `txn-after-prepare` (a decision is durable, no marker written yet),
//! `txn-mid-markers` (right after the first marker of a decision), `txn-after-markers` (every
//! marker written, offsets not applied yet), `txn-before-complete` (offsets applied, the
//! completion not recorded yet).

use std::sync::OnceLock;

static POINTS: OnceLock<Vec<String>> = OnceLock::new();

/// Aborts the process if `name` is armed.
pub(crate) fn hit(name: &str) {
    let points = POINTS.get_or_init(|| {
        std::env::var("SPOOL_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default()
    });
    if points.iter().any(|p| p == name) {
        eprintln!("spoold: failpoint {name} reached: aborting");
        std::process::abort();
    }
}
