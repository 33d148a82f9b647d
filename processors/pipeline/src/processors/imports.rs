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
//! - `bestprice.import.abandoned.v1` once, when the run was reported stuck
//!   `[app] max_stuck_reports` times in a row: the run is given up (its stuck check and
//!   counter record are dropped), and later events of that run are ignored.
//!
//! Invariants: a run and its parts are handled by one task (`feed-imports` is keyed by
//! import id); a merchant counts once however often its `done` is redelivered, and a `done`
//! before its run's `started` is kept and counted when the run starts (runtime's
//! `jobs` module).
//!
//! Bounds: a run reports stuck at most `max_stuck_reports` times (a wall timer
//! `give-up/<import>`, moved by each event of the run, fires half a slot after the last
//! report). A run completed or abandoned is forgotten `[app] retain_runs_ms` later (a wall
//! timer `forget/<import>`): its counter record, and its entry in the store `runs` (when it
//! began; abandoned or not). Until then a redelivered event of it changes nothing; the
//! default retention is `feed-imports`' (7 days), so no event of a forgotten run is still in
//! the log. So the state holds the runs of the last `retain_runs_ms` and those still going,
//! and no timer reports forever. Runs handled by an older version have no such timers: one
//! completed then is never forgotten, one stuck then reports until its next event.

use serde::{Deserialize, Serialize};
use spool_processor::{
    Context, Event, Failure, Handler, Input, JobEvent, JobState, Timer, TimerKind,
};

use crate::events::{ImportEvent, ImportEventKind};
use crate::topics;

/// The completion counter's name (the events' `counter`, ids `imports/<import>/...`).
pub const COUNTER: &str = "imports";
/// `ce_type` of a completed run.
pub const COMPLETED: &str = "spool.job.completed.v1";
/// `ce_type` of a stuck run.
pub const STUCK: &str = "spool.job.stuck.v1";
/// `ce_type` of a run given up after `max_stuck_reports` stuck reports (a [`JobEvent`]).
pub const ABANDONED: &str = "bestprice.import.abandoned.v1";

/// Prefix of the timers that give a stuck run up (`give-up/<import>`).
const GIVE_UP: &[u8] = b"give-up/";
/// Prefix of the timers that forget a finished run (`forget/<import>`).
const FORGET: &[u8] = b"forget/";
/// The store of the runs this processor knows: import id → [`Run`].
const RUNS: &str = "runs";

/// What the processor keeps of a run besides the counter's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Run {
    /// When its `started` was handled (ms; None before that).
    began_ms: Option<i64>,
    /// Given up: its events are ignored until it is forgotten.
    abandoned: bool,
}

/// `[app]` of `spool-imports`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportsSettings {
    /// A run is reported stuck when no merchant finished for this long (ms).
    pub stuck_after_ms: i64,
    /// Stuck reports of one run (in a row, with no merchant finishing) before it is given up
    /// (`bestprice.import.abandoned.v1`).
    pub max_stuck_reports: u32,
    /// A run completed or given up is forgotten this long after (ms).
    pub retain_runs_ms: i64,
}

impl Default for ImportsSettings {
    fn default() -> Self {
        ImportsSettings {
            stuck_after_ms: 10 * 60 * 1000,
            max_stuck_reports: 3,
            retain_runs_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// The import-tracking processor.
#[derive(Debug)]
pub struct Imports {
    stuck_after_ms: i64,
    max_stuck_reports: u32,
    retain_runs_ms: i64,
}

impl Imports {
    /// A processor with these settings (validated).
    pub fn new(s: ImportsSettings) -> anyhow::Result<Imports> {
        anyhow::ensure!(
            s.stuck_after_ms >= 1,
            "[app] stuck_after_ms must be at least 1"
        );
        anyhow::ensure!(
            (1..=1_000).contains(&s.max_stuck_reports),
            "[app] max_stuck_reports must be 1..=1000"
        );
        anyhow::ensure!(
            s.retain_runs_ms >= 1,
            "[app] retain_runs_ms must be at least 1"
        );
        Ok(Imports {
            stuck_after_ms: s.stuck_after_ms,
            max_stuck_reports: s.max_stuck_reports,
            retain_runs_ms: s.retain_runs_ms,
        })
    }

    /// When a run that is not complete now is given up: half a slot after its
    /// `max_stuck_reports`-th report (the counter re-arms its stuck check one slot after each
    /// merchant done and each report).
    fn give_up_at(&self, now: i64) -> i64 {
        let slot = self.stuck_after_ms;
        now.saturating_add(slot.saturating_mul(self.max_stuck_reports as i64))
            .saturating_add(slot / 2)
    }
}

fn timer_key(prefix: &[u8], import: &str) -> Vec<u8> {
    [prefix, import.as_bytes()].concat()
}

impl Handler for Imports {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let e: ImportEvent = input.event::<ImportEvent>()?.data;
        let slot = self.stuck_after_ms;
        let now = ctx.now_ms();
        let mut runs = ctx.store(RUNS)?;
        let mut run: Run = runs.get_json(e.import.as_bytes())?.unwrap_or_default();
        if run.abandoned {
            return Ok(()); // given up: ignored until forgotten
        }
        if matches!(e.kind, ImportEventKind::Started { .. }) && run.began_ms.is_none() {
            run.began_ms = Some(now);
            runs.put_json(e.import.as_bytes(), &run)?;
        }
        let mut jobs = ctx.jobs(COUNTER)?;
        let status = match &e.kind {
            ImportEventKind::Started { merchants } => {
                jobs.begin(&e.import, merchants, topics::IMPORT_STATUS, slot)?
            }
            ImportEventKind::MerchantDone { merchant, .. } => {
                jobs.part_done(&e.import, merchant)?
            }
        };
        if status.state == JobState::Completed {
            ctx.cancel_timer(TimerKind::Wall, &timer_key(GIVE_UP, &e.import))?;
            let at = now.saturating_add(self.retain_runs_ms);
            ctx.set_timer(TimerKind::Wall, &timer_key(FORGET, &e.import), at, "")?;
        } else {
            let at = self.give_up_at(now);
            ctx.set_timer(TimerKind::Wall, &timer_key(GIVE_UP, &e.import), at, "")?;
        }
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: &Timer) -> Result<(), Failure> {
        if timer.kind != TimerKind::Wall {
            return Ok(());
        }
        let (give_up, rest) = if let Some(r) = timer.key.strip_prefix(GIVE_UP) {
            (true, r)
        } else if let Some(r) = timer.key.strip_prefix(FORGET) {
            (false, r)
        } else {
            return Ok(());
        };
        let import = String::from_utf8_lossy(rest).into_owned();
        let now = ctx.now_ms();
        if !give_up {
            ctx.jobs(COUNTER)?.forget(&import)?;
            ctx.store(RUNS)?.delete(import.as_bytes());
            return Ok(());
        }
        let Some(status) = ctx.jobs(COUNTER)?.status(&import)? else {
            return Ok(());
        };
        if status.state == JobState::Completed {
            return Ok(()); // its forget timer is set
        }
        let mut runs = ctx.store(RUNS)?;
        let mut run: Run = runs.get_json(import.as_bytes())?.unwrap_or_default();
        run.abandoned = true;
        runs.put_json(import.as_bytes(), &run)?;
        let data = JobEvent {
            counter: COUNTER.to_owned(),
            job: import.clone(),
            parts_total: status.total,
            parts_done: status.done,
            missing: status.missing,
            began_ms: run.began_ms.unwrap_or(now),
            at_ms: now,
        };
        let ev = Event::new(
            ABANDONED,
            format!("/spool/{}", ctx.processor()),
            format!("{COUNTER}/{import}/abandoned"),
            data,
        )
        .subject(import.clone())
        .time_ms(now);
        ctx.emit_event(topics::IMPORT_STATUS, &ev)?;
        ctx.jobs(COUNTER)?.forget(&import)?;
        let at = now.saturating_add(self.retain_runs_ms);
        ctx.set_timer(TimerKind::Wall, &timer_key(FORGET, &import), at, "")?;
        Ok(())
    }
}

/// One line for an `import-status` event: `import-000002 completed (10 merchants)`,
/// `import-000002 stuck: merchants [m001, m003] (8 of 10 done)` or `import-000002 abandoned:
/// merchants [m001] never finished (9 of 10 done)`; `None` for another type.
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
        ABANDONED => Some(format!(
            "{} abandoned: merchants [{}] never finished ({} of {} done)",
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
            ..ImportsSettings::default()
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
        assert!(
            Imports::new(ImportsSettings {
                stuck_after_ms: 0,
                ..ImportsSettings::default()
            })
            .is_err()
        );
    }

    /// A run that never finishes reports stuck `max_stuck_reports` times, then once that it
    /// was given up, and nothing more however long it stays; its counter record goes then,
    /// and its own entry after the retention. A completed run is forgotten after the
    /// retention. (Before, a stuck run reported every slot forever and no run was ever
    /// forgotten.)
    #[test]
    fn a_stuck_run_is_given_up_after_its_reports_and_finished_runs_are_forgotten() {
        let imports = Imports::new(ImportsSettings {
            stuck_after_ms: 5_000,
            max_stuck_reports: 3,
            retain_runs_ms: 3_600_000,
        })
        .unwrap();
        let mut d = TestDriver::new("imports", imports).with_topic(topics::FEED_IMPORTS, 1);
        let ms = ["m000", "m001"];
        d.pipe_event(topics::FEED_IMPORTS, &started("import-000001", &ms));
        for m in ms {
            d.pipe_event(topics::FEED_IMPORTS, &done("import-000001", m));
        }
        d.pipe_event(topics::FEED_IMPORTS, &started("import-000002", &ms));
        d.pipe_event(topics::FEED_IMPORTS, &done("import-000002", "m000"));
        let job = |i: &str| [COUNTER.as_bytes(), b"\0", i.as_bytes()].concat();
        assert!(d.state("__jobs", &job("import-000001")).is_some());
        // Ten slots and a restart: three stuck reports, then given up once.
        for _ in 0..5 {
            d.advance_wall_clock(Duration::from_secs(5));
        }
        d.restart();
        for _ in 0..5 {
            d.advance_wall_clock(Duration::from_secs(5));
        }
        assert_eq!(
            lines(&mut d),
            vec![
                "import-000001 completed (2 merchants)",
                "import-000002 stuck: merchants [m001] (1 of 2 done)",
                "import-000002 stuck: merchants [m001] (1 of 2 done)",
                "import-000002 stuck: merchants [m001] (1 of 2 done)",
                "import-000002 abandoned: merchants [m001] never finished (1 of 2 done)",
            ]
        );
        assert!(d.state("__jobs", &job("import-000002")).is_none());
        // The straggler after the give-up changes nothing (no waiting record either).
        d.pipe_event(topics::FEED_IMPORTS, &done("import-000002", "m001"));
        d.advance_wall_clock(Duration::from_secs(60));
        assert!(lines(&mut d).is_empty());
        assert!(d.state("__jobs", &job("import-000002")).is_none());
        // After the retention both runs are gone.
        d.advance_wall_clock(Duration::from_secs(3_600));
        assert!(d.state("__jobs", &job("import-000001")).is_none());
        assert!(d.state(RUNS, b"import-000001").is_none());
        assert!(d.state(RUNS, b"import-000002").is_none());
        assert!(lines(&mut d).is_empty());
    }
}
