//! Completion counters (seed 001's semaphores, seed 004's events aggregation): "job J has
//! these N parts", mark parts done, and an event when all are done, or a "stuck" event naming
//! the missing parts when no part finished within a time slot.
//!
//! ```
//! # use spool_processor::{Context, Failure, Handler, Input};
//! # struct Imports;
//! # impl Handler for Imports {
//! fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
//!     let merchant = input.key_str().unwrap_or_default().to_owned();
//!     let mut jobs = ctx.jobs("imports")?;
//!     if input.header("start").is_some() {
//!         let parts: Vec<String> = (0..3).map(|m| format!("m{m}")).collect();
//!         jobs.begin("run-7", &parts, "import-status", 60_000)?;
//!     } else {
//!         jobs.part_done("run-7", &merchant)?;   // counted once, however often retried
//!     }
//!     Ok(())
//! }
//! # }
//! ```
//!
//! Invariants: a job's record lives in the task's state (store `__jobs`), so a job and all
//! its parts must be handled by one task (key the part events by job id). A part counts once,
//! however often it is marked done; marks that arrive before `begin` are kept and counted
//! when it comes. The `completed` event is emitted exactly once (in the transaction of the
//! mark that completed the job); a job completes even after it was reported stuck. The stuck
//! check is a wall-clock timer moved by every new part done (and by `begin`); it reports once
//! per quiet slot and re-arms, so a job stuck for three slots reports three times (with the
//! same missing parts unless some finished). Events are CloudEvents of type
//! `spool.job.completed.v1` / `spool.job.stuck.v1`, subject the job id, with deterministic ids
//! (`<counter>/<job>/completed`, `<counter>/<job>/stuck/<n>`).
//!
//! Limits: at most [`MAX_PARTS`] parts per job, part ids at most 256 bytes.

use serde::{Deserialize, Serialize};

use crate::context::Context;
use crate::envelope::Event;
use crate::handler::{Failure, Timer, TimerKind};
use crate::state;

pub(crate) const JOBS: &str = "__jobs";
/// Timer keys of the stuck checks start with this (the runtime routes them here).
pub(crate) const TIMER_PREFIX: &[u8] = b"\0spool-job\0";
/// Most parts a job may have.
pub const MAX_PARTS: usize = 100_000;

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Parts were marked done but the job has not begun (its part list is unknown).
    Waiting,
    /// Begun, not complete.
    Running,
    /// Reported stuck (no part finished for a slot); still completes if the rest arrive.
    Stuck,
    /// Every part done; the completed event was emitted.
    Completed,
}

/// A job's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job id.
    pub job: String,
    /// Its state.
    pub state: JobState,
    /// Parts it has (0 before `begin`).
    pub total: usize,
    /// Parts done (of its parts).
    pub done: usize,
    /// Parts not done yet, in the order given to `begin`.
    pub missing: Vec<String>,
}

/// The payload of `spool.job.completed.v1` and `spool.job.stuck.v1` events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// The counter's name.
    pub counter: String,
    /// The job id.
    pub job: String,
    /// Parts it has.
    pub parts_total: usize,
    /// Parts done.
    pub parts_done: usize,
    /// Parts not done (empty for `completed`).
    pub missing: Vec<String>,
    /// When it began (ms).
    pub began_ms: i64,
    /// When this event was emitted (ms).
    pub at_ms: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    parts: Vec<String>,
    /// Parts marked done (those before `begin` too), sorted.
    done: Vec<String>,
    topic: String,
    slot_ms: i64,
    began_ms: i64,
    begun: bool,
    completed: bool,
    stuck_reports: u32,
}

impl Record {
    fn done_count(&self) -> usize {
        self.parts
            .iter()
            .filter(|p| self.done.binary_search(p).is_ok())
            .count()
    }

    fn status(&self, job: &str) -> JobStatus {
        let state = if self.completed {
            JobState::Completed
        } else if !self.begun {
            JobState::Waiting
        } else if self.stuck_reports > 0 {
            JobState::Stuck
        } else {
            JobState::Running
        };
        JobStatus {
            job: job.to_owned(),
            state,
            total: self.parts.len(),
            done: self.done_count(),
            missing: self
                .parts
                .iter()
                .filter(|p| self.done.binary_search(p).is_err())
                .cloned()
                .collect(),
        }
    }
}

/// The completion counters named `name` of a task, through a [`Context`].
pub struct Jobs<'c, 'a> {
    ctx: &'c mut Context<'a>,
    name: &'c str,
}

impl std::fmt::Debug for Jobs<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("name", &self.name).finish()
    }
}

fn key(name: &str, job: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + job.len() + 1);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(job.as_bytes());
    k
}

fn timer_key(name: &str, job: &str) -> Vec<u8> {
    let mut k = TIMER_PREFIX.to_vec();
    k.extend_from_slice(&key(name, job));
    k
}

impl<'a> Context<'a> {
    /// The completion counters named `name` (1..=64 bytes, no NUL) of this task.
    pub fn jobs<'c>(&'c mut self, name: &'c str) -> Result<Jobs<'c, 'a>, Failure> {
        if name.is_empty() || name.len() > 64 || name.contains('\0') {
            return Err(Failure::fatal(format!("invalid counter name {name:?}")));
        }
        Ok(Jobs { ctx: self, name })
    }

    /// Handles a stuck-check timer (called by the runtime for timers under
    /// [`TIMER_PREFIX`]).
    pub(crate) fn job_timer(&mut self, t: &Timer) -> Result<(), Failure> {
        let k = &t.key[TIMER_PREFIX.len()..];
        let Some(sep) = k.iter().position(|&b| b == 0) else {
            return Ok(());
        };
        let name = String::from_utf8_lossy(&k[..sep]).to_string();
        let job = String::from_utf8_lossy(&k[sep + 1..]).to_string();
        let mut jobs = Jobs {
            ctx: self,
            name: &name,
        };
        let Some(mut r) = jobs.load(&job)? else {
            return Ok(());
        };
        if r.completed || !r.begun {
            return Ok(());
        }
        r.stuck_reports += 1;
        let n = r.stuck_reports;
        jobs.report(&job, &r, "stuck", Some(n))?;
        let at = jobs.ctx.now_ms() + r.slot_ms;
        jobs.ctx
            .set_timer(TimerKind::Wall, &timer_key(&name, &job), at, "")?;
        jobs.save(&job, &r)?;
        Ok(())
    }
}

impl Jobs<'_, '_> {
    fn load(&self, job: &str) -> Result<Option<Record>, Failure> {
        let k = state::composite(JOBS, &key(self.name, job));
        match self.ctx.get_raw(&k)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Failure::fatal(format!("job {job}: corrupt record: {e}"))),
        }
    }

    fn save(&mut self, job: &str, r: &Record) -> Result<(), Failure> {
        let v = serde_json::to_vec(r).map_err(|e| Failure::fatal(e.to_string()))?;
        self.ctx
            .put_raw(state::composite(JOBS, &key(self.name, job)), Some(v.into()));
        Ok(())
    }

    fn report(&mut self, job: &str, r: &Record, what: &str, n: Option<u32>) -> Result<(), Failure> {
        let s = r.status(job);
        let now = self.ctx.now_ms();
        let data = JobEvent {
            counter: self.name.to_owned(),
            job: job.to_owned(),
            parts_total: s.total,
            parts_done: s.done,
            missing: if what == "completed" {
                Vec::new()
            } else {
                s.missing
            },
            began_ms: r.began_ms,
            at_ms: now,
        };
        let id = match n {
            Some(n) => format!("{}/{job}/{what}/{n}", self.name),
            None => format!("{}/{job}/{what}", self.name),
        };
        let source = format!("/spool/{}", self.ctx.processor());
        let ev = Event::new(format!("spool.job.{what}.v1"), source, id, data)
            .subject(job)
            .time_ms(now);
        self.ctx.emit_event(r.topic.clone(), &ev)?;
        Ok(())
    }

    /// Begins job `job` with `parts` (distinct ids): events go to `topic`; a "stuck" event
    /// if no part finishes for `slot_ms`. Beginning a job again changes nothing (a retried
    /// or redelivered start).
    pub fn begin<S: AsRef<str>>(
        &mut self,
        job: &str,
        parts: &[S],
        topic: &str,
        slot_ms: i64,
    ) -> Result<JobStatus, Failure> {
        if parts.len() > MAX_PARTS || parts.iter().any(|p| p.as_ref().len() > 256) {
            return Err(Failure::dead_letter(format!(
                "job {job}: at most {MAX_PARTS} parts of at most 256 bytes"
            )));
        }
        let mut r = self.load(job)?.unwrap_or_default();
        if r.begun {
            return Ok(r.status(job));
        }
        let ids: Vec<String> = parts.iter().map(|p| p.as_ref().to_owned()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != ids.len() {
            return Err(Failure::dead_letter(format!("job {job}: part ids repeat")));
        }
        r.parts = ids;
        r.topic = topic.to_owned();
        r.slot_ms = slot_ms.max(1);
        r.began_ms = self.ctx.now_ms();
        r.begun = true;
        self.finish_or_arm(job, &mut r)?;
        self.save(job, &r)?;
        Ok(r.status(job))
    }

    /// Marks `part` of `job` done (once; again changes nothing). Completes the job (emitting
    /// its event) when it was the last.
    pub fn part_done(&mut self, job: &str, part: &str) -> Result<JobStatus, Failure> {
        let mut r = self.load(job)?.unwrap_or_default();
        let Err(at) = r.done.binary_search_by(|p| p.as_str().cmp(part)) else {
            return Ok(r.status(job));
        };
        if r.done.len() >= MAX_PARTS {
            return Err(Failure::dead_letter(format!("job {job}: too many parts")));
        }
        r.done.insert(at, part.to_owned());
        if r.begun && !r.completed {
            self.finish_or_arm(job, &mut r)?;
        }
        self.save(job, &r)?;
        Ok(r.status(job))
    }

    /// The job's progress, if known.
    pub fn status(&self, job: &str) -> Result<Option<JobStatus>, Failure> {
        Ok(self.load(job)?.map(|r| r.status(job)))
    }

    /// Forgets a job (its record and timer).
    pub fn forget(&mut self, job: &str) -> Result<(), Failure> {
        self.ctx
            .put_raw(state::composite(JOBS, &key(self.name, job)), None);
        self.ctx
            .cancel_timer(TimerKind::Wall, &timer_key(self.name, job))?;
        Ok(())
    }

    fn finish_or_arm(&mut self, job: &str, r: &mut Record) -> Result<(), Failure> {
        let tk = timer_key(self.name, job);
        if r.done_count() == r.parts.len() {
            r.completed = true;
            self.ctx.cancel_timer(TimerKind::Wall, &tk)?;
            self.report(job, r, "completed", None)?;
        } else {
            let at = self.ctx.now_ms() + r.slot_ms;
            self.ctx.set_timer(TimerKind::Wall, &tk, at, "")?;
        }
        Ok(())
    }
}
