//! `spool-imports`: tracks each feed import run with the runtime's completion counter (seed
//! 001's semaphore). The feed writes to `feed-imports` a run's `started` event with its
//! merchants (the parts of the job), then one `merchant_done` per merchant; this processor
//! begins the job on `started`, marks a merchant's part on `merchant_done`, and the counter
//! emits to `import-status`:
//!
//! - `spool.job.completed.v1` once, in the transaction of the last merchant's mark
//!   ("import completed");
//! - `spool.job.stuck.v1` when no merchant finished for `[app] stuck_after_ms`, naming the
//!   merchants that did not finish ("import stuck: merchants [...]"), again once per quiet
//!   slot while it stays stuck. The check is a persisted wall-clock timer, so it fires with
//!   no input at all and survives restarts; a stuck run still completes if the rest arrive.
//!
//! Invariants: a run and its parts are handled by one task (`feed-imports` is keyed by
//! import id); a merchant counts once however often its `done` is redelivered, and a `done`
//! before its run's `started` is kept and counted when the run starts (runtime's
//! `jobs` module).

use serde::Deserialize;
use spool_processor::{Context, Failure, Handler, Input, JobEvent};

use crate::events::{ImportEvent, ImportEventKind};
use crate::topics;

/// The completion counter's name (the events' `counter`, ids `imports/<import>/...`).
pub const COUNTER: &str = "imports";
/// `ce_type` of a completed run.
pub const COMPLETED: &str = "spool.job.completed.v1";
/// `ce_type` of a stuck run.
pub const STUCK: &str = "spool.job.stuck.v1";

/// `[app]` of `spool-imports`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportsSettings {
    /// A run is reported stuck when no merchant finished for this long (ms).
    pub stuck_after_ms: i64,
}

impl Default for ImportsSettings {
    fn default() -> Self {
        ImportsSettings {
            stuck_after_ms: 10 * 60 * 1000,
        }
    }
}

/// The import-tracking processor.
#[derive(Debug)]
pub struct Imports {
    stuck_after_ms: i64,
}

impl Imports {
    /// A processor with these settings (validated).
    pub fn new(s: ImportsSettings) -> anyhow::Result<Imports> {
        anyhow::ensure!(
            s.stuck_after_ms >= 1,
            "[app] stuck_after_ms must be at least 1"
        );
        Ok(Imports {
            stuck_after_ms: s.stuck_after_ms,
        })
    }
}

impl Handler for Imports {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let e: ImportEvent = input.event::<ImportEvent>()?.data;
        let slot = self.stuck_after_ms;
        let mut jobs = ctx.jobs(COUNTER)?;
        match &e.kind {
            ImportEventKind::Started { merchants } => {
                jobs.begin(&e.import, merchants, topics::IMPORT_STATUS, slot)?
            }
            ImportEventKind::MerchantDone { merchant, .. } => {
                jobs.part_done(&e.import, merchant)?
            }
        };
        Ok(())
    }
}

/// One line for an `import-status` event: `import-000002 completed (10 merchants)` or
/// `import-000002 stuck: merchants [m001, m003] (8 of 10 done)`; `None` for another type.
pub fn describe(ty: &str, e: &JobEvent) -> Option<String> {
    match ty {
        COMPLETED => Some(format!("{} completed ({} merchants)", e.job, e.parts_total)),
        STUCK => Some(format!(
            "{} stuck: merchants [{}] ({} of {} done)",
            e.job,
            e.missing.join(", "),
            e.parts_done,
            e.parts_total
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spool_processor::Event;
    use spool_processor::testing::TestDriver;

    use super::*;
    use crate::processors::envelope;

    fn started(import: &str, merchants: &[&str]) -> Event<ImportEvent> {
        let e = ImportEvent {
            import: import.into(),
            kind: ImportEventKind::Started {
                merchants: merchants.iter().map(|m| m.to_string()).collect(),
            },
            at_ms: 1,
        };
        envelope("feed", format!("{import}:started"), &e, 1)
    }

    fn done(import: &str, merchant: &str) -> Event<ImportEvent> {
        let e = ImportEvent {
            import: import.into(),
            kind: ImportEventKind::MerchantDone {
                merchant: merchant.into(),
                updates: 3,
            },
            at_ms: 2,
        };
        envelope("feed", format!("{import}:{merchant}:done"), &e, 2)
    }

    fn driver() -> TestDriver<Imports> {
        let imports = Imports::new(ImportsSettings {
            stuck_after_ms: 5_000,
        })
        .unwrap();
        TestDriver::new("imports", imports).with_topic(topics::FEED_IMPORTS, 1)
    }

    fn lines(d: &mut TestDriver<Imports>) -> Vec<String> {
        d.read_events::<JobEvent>(topics::IMPORT_STATUS)
            .iter()
            .map(|e| describe(&e.ty, &e.data).expect("a job event"))
            .collect()
    }

    #[test]
    fn a_run_completes_once_and_a_stalled_one_names_its_missing_merchants() {
        let mut d = driver();
        let ms = ["m000", "m001", "m002"];
        d.pipe_event(topics::FEED_IMPORTS, &started("import-000001", &ms));
        for m in ms {
            d.pipe_event(topics::FEED_IMPORTS, &done("import-000001", m));
        }
        // A redelivered done changes nothing.
        d.pipe_event(topics::FEED_IMPORTS, &done("import-000001", "m002"));
        d.advance_wall_clock(Duration::from_secs(60));
        assert_eq!(lines(&mut d), vec!["import-000001 completed (3 merchants)"]);

        // m001 never finishes: stuck after the slot with no input at all, across a restart.
        d.pipe_event(topics::FEED_IMPORTS, &started("import-000002", &ms));
        d.pipe_event(topics::FEED_IMPORTS, &done("import-000002", "m000"));
        d.restart();
        d.advance_wall_clock(Duration::from_millis(4_999));
        assert!(lines(&mut d).is_empty());
        d.advance_wall_clock(Duration::from_millis(1));
        d.pipe_event(topics::FEED_IMPORTS, &done("import-000002", "m002"));
        let out = d.read_events::<JobEvent>(topics::IMPORT_STATUS);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].ty, STUCK);
        assert_eq!(out[0].id, "imports/import-000002/stuck/1");
        assert_eq!(out[0].data.missing, vec!["m001", "m002"]);
        // m002 finished after the report; the next slot names only m001.
        d.advance_wall_clock(Duration::from_secs(5));
        assert_eq!(
            lines(&mut d),
            vec!["import-000002 stuck: merchants [m001] (2 of 3 done)"]
        );
        // The straggler arrives after all: completed, once.
        d.pipe_event(topics::FEED_IMPORTS, &done("import-000002", "m001"));
        d.advance_wall_clock(Duration::from_secs(60));
        assert_eq!(lines(&mut d), vec!["import-000002 completed (3 merchants)"]);
    }

    #[test]
    fn a_malformed_import_event_is_a_dead_letter() {
        let mut d = driver();
        d.pipe(topics::FEED_IMPORTS, "import-1", "not an event");
        assert_eq!(d.dead_letters(topics::FEED_IMPORTS).len(), 1);
        assert!(Imports::new(ImportsSettings { stuck_after_ms: 0 }).is_err());
    }
}
