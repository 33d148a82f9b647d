//! The control topic `<group>.control` (compacted, one partition): operators' commands to a
//! processor, kept in the log so they survive restarts. Written by `spool processor
//! pause|resume` and `spool dlq skip`; read by every instance of the processor, to the end
//! before it processes anything, then followed.
//!
//! | key | value | meaning |
//! | --- | --- | --- |
//! | `pause` | any (a tombstone resumes) | the whole processor is paused |
//! | `pause/<lane>` | any (a tombstone resumes) | the lane is paused |
//! | `skip/<topic>/<partition>/<offset>` | the operator's reason | give up on that record now: it goes to the dead-letter topic (unblocks a partition stuck retrying it) |

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spool_client::{Client, FetchOptions, Isolation, Record};

/// The control topic of a group.
pub fn control_topic(group: &str) -> String {
    format!("{group}.control")
}

/// The key pausing a lane (`None`: the whole processor).
pub fn pause_key(lane: Option<&str>) -> String {
    match lane {
        Some(l) => format!("pause/{l}"),
        None => "pause".to_owned(),
    }
}

/// The key skipping one record.
pub fn skip_key(topic: &str, partition: u32, offset: u64) -> String {
    format!("skip/{topic}/{partition}/{offset}")
}

/// Longest skip reason kept (longer ones are cut).
pub const MAX_REASON: usize = 1024;

/// What the control topic says now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// The whole processor is paused.
    pub paused: bool,
    /// Paused lanes.
    pub paused_lanes: BTreeSet<String>,
    /// Records to skip: (topic, partition, offset) → the operator's reason (at most
    /// [`MAX_REASON`] bytes of it).
    pub skips: BTreeMap<(String, u32, u64), String>,
}

impl Control {
    /// Applies one control record.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        let on = value.is_some();
        if key == "pause" {
            self.paused = on;
        } else if let Some(lane) = key.strip_prefix("pause/") {
            if on {
                self.paused_lanes.insert(lane.to_owned());
            } else {
                self.paused_lanes.remove(lane);
            }
        } else if let Some(rest) = key.strip_prefix("skip/") {
            // topic names may not contain '/', so split from the right.
            let mut it = rest.rsplitn(3, '/');
            let (Some(o), Some(p), Some(t)) = (it.next(), it.next(), it.next()) else {
                return;
            };
            let (Ok(o), Ok(p)) = (o.parse(), p.parse()) else {
                return;
            };
            if let Some(v) = value {
                let mut reason = String::from_utf8_lossy(v).into_owned();
                if reason.len() > MAX_REASON {
                    let mut end = MAX_REASON;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason.truncate(end);
                }
                self.skips.insert((t.to_owned(), p, o), reason);
            } else {
                self.skips.remove(&(t.to_owned(), p, o));
            }
        }
    }

    /// Whether a lane is paused (by itself or with the processor).
    pub fn lane_paused(&self, lane: &str) -> bool {
        self.paused || self.paused_lanes.contains(lane)
    }
}

fn apply_all(c: &mut Control, records: &[Record]) {
    for r in records {
        if let Some(k) = &r.key {
            c.apply(k, r.value.as_deref());
        }
    }
}

/// Reads the control topic to its end (read committed) and returns the state and the next
/// offset.
pub(crate) async fn load(client: &Client, topic: &str) -> spool_client::Result<(Control, u64)> {
    let mut c = Control::default();
    let mut offset = 0;
    let opts = FetchOptions {
        isolation: Isolation::ReadCommitted,
        ..FetchOptions::default()
    };
    loop {
        let f = client.fetch(topic, 0, offset, &opts).await?;
        apply_all(&mut c, &f.records);
        if f.next_offset == offset || f.next_offset >= f.high_watermark {
            return Ok((c, f.next_offset));
        }
        offset = f.next_offset;
    }
}

/// Follows the control topic from `offset`, updating `shared`, until the task is dropped.
pub(crate) async fn follow(
    client: Client,
    topic: String,
    mut offset: u64,
    shared: Arc<Mutex<Control>>,
) {
    let opts = FetchOptions {
        isolation: Isolation::ReadCommitted,
        min_bytes: 1,
        max_wait: Duration::from_millis(500),
        ..FetchOptions::default()
    };
    loop {
        match client.fetch(&topic, 0, offset, &opts).await {
            Ok(f) => {
                if !f.records.is_empty() {
                    let mut c = shared
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    apply_all(&mut c, &f.records);
                }
                offset = f.next_offset.max(offset);
            }
            Err(e) => {
                tracing::debug!(error = %e, topic, "reading the control topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_apply_and_tombstones_undo_them() {
        let mut c = Control::default();
        c.apply(pause_key(Some("campaigns")).as_bytes(), Some(b"x"));
        c.apply(skip_key("my.topic", 3, 42).as_bytes(), Some(b"bad record"));
        assert!(c.lane_paused("campaigns") && !c.lane_paused("alerts"));
        assert_eq!(
            c.skips
                .get(&("my.topic".to_owned(), 3, 42))
                .map(String::as_str),
            Some("bad record")
        );
        c.apply(
            skip_key("t", 0, 1).as_bytes(),
            Some("é".repeat(600).as_bytes()),
        );
        assert_eq!(c.skips[&("t".to_owned(), 0, 1)].len(), MAX_REASON);
        c.apply(skip_key("t", 0, 1).as_bytes(), None);
        c.apply(b"pause", Some(b"x"));
        assert!(c.lane_paused("alerts"));
        c.apply(b"pause", None);
        c.apply(pause_key(Some("campaigns")).as_bytes(), None);
        assert!(!c.lane_paused("campaigns"));
        c.apply(b"skip/garbage", Some(b"x"));
        assert_eq!(c.skips.len(), 1);
    }
}
