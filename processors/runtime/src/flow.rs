//! Flow control (seeds 001 and 003): priority lanes with a minimum share, throttles per lane
//! and per key, quiet hours in a time zone, and operator pauses.
//!
//! A *lane* is a set of input topics with a priority (0 is the highest). The runtime decides
//! at every tick which lanes may be read; a lane that may not is paused in the group consumer
//! (its partitions stay owned, nothing is dropped, its records wait in the log):
//! - **paused** by an operator (`spool processor pause NAME --lane L`, kept in the compacted
//!   control topic `<group>.control`, so it survives restarts);
//! - **quiet**: inside one of its quiet windows (`21:00`–`07:00` in `Europe/Athens`, computed
//!   with jiff on civil times, so the windows follow DST: a window spanning the spring-forward
//!   night is an hour shorter in absolute time, as a person would expect); it opens again by
//!   itself at the window's end;
//! - **yielding**: priority itself needs no pause: each lane is read over its own Subscribe
//!   stream and the consumer returns the highest lane's ready records first. But when a lower
//!   lane has records waiting and got less than its `min_share` of the records processed in
//!   the current one-second window, the lanes above it yield until the next decision (a
//!   tick), so it never starves. A lane whose own throttle holds a record is not starving (it
//!   gets what its rate allows): counting it as such made every lane above it yield at nearly
//!   every tick, and each yield drops the yielding lane's fetched records, so in `spool-demo`
//!   the campaigns lane (5/s, `min_share` 0.05) cut `outgoing-mail`, read after
//!   `notification-requests` in the alerts lane's stream, from ~140 to ~17 mails/s.
//!
//! Throttles are GCRA limiters (governor): a lane's `rate_per_sec` (burst: a tenth of a
//! second's worth unless set) and optionally `key_rate_per_sec` per record key. A record over
//! the lane's rate whose token is due within [`INLINE_WAIT`] (every record at rates of
//! 200/s and more) waits for it in place; one that must wait longer, or is over its key's
//! rate, is held (its partition paused) until the limiter allows it. So the long-run rate is
//! exact, and a busy throttled lane does not pause, drop its fetched records and read them
//! again for every record over the rate (which cost it 8–13 % of its rate).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// The longest wait for a lane token done in place (longer ones hold the record).
pub(crate) const INLINE_WAIT: Duration = Duration::from_millis(5);

/// How long after its throttled record is due a lane still counts as throttled (not
/// starving): the time to read its next record, which its throttle usually holds again.
pub(crate) const THROTTLE_GRACE_MS: i64 = 250;

/// A record over a rate: how long until it may go, and whether its key's rate refused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Wait {
    /// Until the limiter allows it.
    pub(crate) after: Duration,
    /// Refused by the per-key limiter (else by the lane's).
    pub(crate) per_key: bool,
}

/// One lane (TOML `[[lanes]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Name (metrics label, CLI `--lane`).
    pub name: String,
    /// Its input topics (each input topic is in at most one lane; topics in none form a
    /// lane of their own named after the topic, priority 0).
    pub topics: Vec<String>,
    /// 0 is the highest.
    #[serde(default)]
    pub priority: u32,
    /// Share of the records this lane keeps while higher lanes have work (0.0..=1.0).
    #[serde(default = "default_share")]
    pub min_share: f64,
    /// Records per second at most (absent: no limit).
    #[serde(default)]
    pub rate_per_sec: Option<u32>,
    /// Burst of the rate limit (default: a tenth of a second's worth, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Records per second per key at most (absent: no limit).
    #[serde(default)]
    pub key_rate_per_sec: Option<u32>,
    /// Windows when the lane is closed.
    #[serde(default)]
    pub quiet_hours: Vec<QuietHours>,
}

fn default_share() -> f64 {
    0.1
}

/// A daily window when a lane is closed, in a time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// IANA time zone, e.g. `Europe/Athens`.
    pub time_zone: String,
    /// Start, `HH:MM` local time.
    pub start: String,
    /// End, `HH:MM` local time (before `start`: the window spans midnight).
    pub end: String,
}

impl QuietHours {
    fn parse(&self) -> Result<(jiff::tz::TimeZone, jiff::civil::Time, jiff::civil::Time), String> {
        let tz = jiff::tz::TimeZone::get(&self.time_zone)
            .map_err(|e| format!("quiet_hours: time zone {:?}: {e}", self.time_zone))?;
        let t = |s: &str| {
            s.parse::<jiff::civil::Time>()
                .map_err(|e| format!("quiet_hours: {s:?} is not HH:MM: {e}"))
        };
        Ok((tz, t(&self.start)?, t(&self.end)?))
    }

    /// Checks the window.
    pub fn validate(&self) -> Result<(), String> {
        let (_, s, e) = self.parse()?;
        if s == e {
            return Err("quiet_hours: start and end are equal".into());
        }
        Ok(())
    }

    /// If `now_ms` is inside the window: when it ends (ms since the epoch).
    pub fn quiet_until(&self, now_ms: i64) -> Option<i64> {
        let (tz, start, end) = self.parse().ok()?;
        let now = jiff::Timestamp::from_millisecond(now_ms)
            .ok()?
            .to_zoned(tz.clone());
        let at = |date: jiff::civil::Date, t: jiff::civil::Time| -> Option<i64> {
            date.to_datetime(t)
                .to_zoned(tz.clone())
                .ok()
                .map(|z| z.timestamp().as_millisecond())
        };
        let today = now.date();
        let start_today = at(today, start)?;
        let end_today = at(today, end)?;
        if start < end {
            (start_today <= now_ms && now_ms < end_today).then_some(end_today)
        } else if now_ms >= start_today {
            at(today.tomorrow().ok()?, end)
        } else if now_ms < end_today {
            Some(end_today)
        } else {
            None
        }
    }
}

impl LaneConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.topics.is_empty() {
            return Err("lanes: every lane needs a name and topics".into());
        }
        if !(0.0..=1.0).contains(&self.min_share) {
            return Err(format!(
                "lane {}: min_share must be within 0..=1",
                self.name
            ));
        }
        if self.rate_per_sec == Some(0) || self.key_rate_per_sec == Some(0) || self.burst == Some(0)
        {
            return Err(format!(
                "lane {}: rates and burst must be positive",
                self.name
            ));
        }
        for q in &self.quiet_hours {
            q.validate()?;
        }
        Ok(())
    }
}

/// Why a lane is not read right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// An operator paused it.
    Paused,
    /// Quiet hours until this time (ms).
    Quiet(i64),
    /// Yielding to a higher-priority lane.
    Yielding,
}

/// A lane at run time.
pub(crate) struct Lane {
    pub(crate) cfg: LaneConfig,
    limiter: Option<DefaultDirectRateLimiter>,
    key_limiter: Option<DefaultKeyedRateLimiter<Vec<u8>>>,
    /// Records processed in the current share window.
    pub(crate) window_count: u64,
    pub(crate) operator_paused: bool,
    pub(crate) closed: Option<Closed>,
    /// Its throttle (the lane's rate, not a key's) holds a record until then (wall clock,
    /// ms): meanwhile the lane is throttled, not starving.
    pub(crate) throttled_until_ms: Option<i64>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("name", &self.cfg.name)
            .field("closed", &self.closed)
            .finish()
    }
}

fn quota(rate: u32, burst: Option<u32>) -> Quota {
    let r = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let b = burst.unwrap_or((rate / 10).max(1));
    Quota::per_second(r).allow_burst(NonZeroU32::new(b).unwrap_or(NonZeroU32::MIN))
}

impl Lane {
    pub(crate) fn new(cfg: LaneConfig) -> Lane {
        Lane {
            limiter: cfg
                .rate_per_sec
                .map(|r| RateLimiter::direct(quota(r, cfg.burst))),
            key_limiter: cfg
                .key_rate_per_sec
                .map(|r| RateLimiter::keyed(quota(r, None))),
            cfg,
            window_count: 0,
            operator_paused: false,
            closed: None,
            throttled_until_ms: None,
        }
    }

    /// Takes a token for a record (and its key): `None` if allowed now, else how long to
    /// wait. A record refused by the key limiter takes no lane token.
    ///
    /// Each limiter's own clock tells the wait: building a clock calibrates it (cpuid and
    /// more), which took ~80% of the CPU when it was done per record.
    pub(crate) fn admit(&self, key: Option<&[u8]>) -> Option<Wait> {
        if let (Some(kl), Some(k)) = (&self.key_limiter, key)
            && let Err(not_until) = kl.check_key(&k.to_vec())
        {
            return Some(Wait {
                after: not_until.wait_time_from(kl.clock().now()),
                per_key: true,
            });
        }
        if let Some(l) = &self.limiter
            && let Err(not_until) = l.check()
        {
            return Some(Wait {
                after: not_until.wait_time_from(l.clock().now()),
                per_key: false,
            });
        }
        None
    }

    /// Forgets idle keys of the per-key limiter (bounded memory).
    pub(crate) fn prune(&self) {
        if let Some(kl) = &self.key_limiter {
            kl.retain_recent();
        }
    }
}

/// The lanes of a processor and the topic → lane map.
#[derive(Debug)]
pub(crate) struct Lanes {
    pub(crate) lanes: Vec<Lane>,
    by_topic: HashMap<String, usize>,
}

impl Lanes {
    /// Lanes from config; input topics in no lane get a lane of their own (priority 0).
    pub(crate) fn new(configs: &[LaneConfig], inputs: &[String]) -> Lanes {
        let mut lanes: Vec<Lane> = configs.iter().cloned().map(Lane::new).collect();
        let mut by_topic = HashMap::new();
        for (i, l) in lanes.iter().enumerate() {
            for t in &l.cfg.topics {
                by_topic.insert(t.clone(), i);
            }
        }
        for t in inputs {
            if !by_topic.contains_key(t) {
                by_topic.insert(t.clone(), lanes.len());
                lanes.push(Lane::new(LaneConfig {
                    name: t.clone(),
                    topics: vec![t.clone()],
                    priority: 0,
                    min_share: 1.0,
                    rate_per_sec: None,
                    burst: None,
                    key_rate_per_sec: None,
                    quiet_hours: Vec::new(),
                }));
            }
        }
        Lanes { lanes, by_topic }
    }

    /// The lane of a topic (retry topics map to their source's lane via `map_topic`).
    pub(crate) fn of(&self, topic: &str) -> Option<usize> {
        self.by_topic.get(topic).copied()
    }

    /// Adds a topic (a retry topic) to a lane.
    pub(crate) fn map_topic(&mut self, topic: &str, lane: usize) {
        self.by_topic.insert(topic.to_owned(), lane);
    }

    /// Decides which lanes are closed: `now_ms` for quiet hours, `waiting[i]` whether lane i
    /// has records waiting (lag or held records). Between open lanes, priority needs no
    /// closing (the consumer reads each lane over its own stream and returns the highest
    /// lane's records first); but when an open lane with records waiting got less than its
    /// `min_share` of the current window's records, every open lane above it yields until
    /// the next decision.
    pub(crate) fn decide(&mut self, now_ms: i64, waiting: &[bool]) {
        let total: u64 = self.lanes.iter().map(|l| l.window_count).sum();
        for l in &mut self.lanes {
            l.closed = if l.operator_paused {
                Some(Closed::Paused)
            } else {
                l.cfg
                    .quiet_hours
                    .iter()
                    .filter_map(|q| q.quiet_until(now_ms))
                    .max()
                    .map(Closed::Quiet)
            };
        }
        let top = self
            .lanes
            .iter()
            .filter(|l| l.closed.is_none())
            .map(|l| l.cfg.priority)
            .min();
        let starving = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                l.closed.is_none()
                    && Some(l.cfg.priority) != top
                    && waiting.get(*i).copied().unwrap_or(false)
                    && total > 0
                    && (l.window_count as f64) < l.cfg.min_share * total as f64
                    && l.throttled_until_ms
                        .is_none_or(|t| now_ms >= t.saturating_add(THROTTLE_GRACE_MS))
            })
            .map(|(_, l)| l.cfg.priority)
            .min();
        if let Some(p) = starving {
            for l in &mut self.lanes {
                if l.closed.is_none() && l.cfg.priority < p {
                    l.closed = Some(Closed::Yielding);
                }
            }
        }
    }

    /// Starts a new share window.
    pub(crate) fn new_window(&mut self) {
        for l in &mut self.lanes {
            l.window_count = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn quiet_hours_span_midnight_and_follow_dst() {
        let q = QuietHours {
            time_zone: "Europe/Athens".into(),
            start: "21:00".into(),
            end: "07:00".into(),
        };
        // Winter (UTC+2): 21:00 local = 19:00Z.
        assert_eq!(q.quiet_until(ms("2024-01-10T18:59:00Z")), None);
        assert_eq!(
            q.quiet_until(ms("2024-01-10T19:00:00Z")),
            Some(ms("2024-01-11T05:00:00Z"))
        );
        assert_eq!(
            q.quiet_until(ms("2024-01-11T04:59:59Z")),
            Some(ms("2024-01-11T05:00:00Z"))
        );
        assert_eq!(q.quiet_until(ms("2024-01-11T05:00:00Z")), None);
        // Spring forward in Athens: 2024-03-31 03:00 → 04:00. The window from 21:00 on the
        // 30th (UTC+2) to 07:00 on the 31st (UTC+3) is 9 hours long.
        assert_eq!(
            q.quiet_until(ms("2024-03-30T19:00:00Z")),
            Some(ms("2024-03-31T04:00:00Z"))
        );
        assert_eq!(
            q.quiet_until(ms("2024-03-31T03:59:00Z")),
            Some(ms("2024-03-31T04:00:00Z"))
        );
        assert_eq!(q.quiet_until(ms("2024-03-31T04:00:00Z")), None);
        // The next evening starts at 21:00 UTC+3 = 18:00Z.
        assert_eq!(q.quiet_until(ms("2024-03-31T17:59:00Z")), None);
        assert!(q.quiet_until(ms("2024-03-31T18:00:00Z")).is_some());
        let day = QuietHours {
            time_zone: "UTC".into(),
            start: "12:00".into(),
            end: "13:00".into(),
        };
        assert_eq!(
            day.quiet_until(ms("2024-01-01T12:30:00Z")),
            Some(ms("2024-01-01T13:00:00Z"))
        );
        assert_eq!(day.quiet_until(ms("2024-01-01T13:30:00Z")), None);
        assert!(
            QuietHours {
                time_zone: "Mars/Base".into(),
                ..day.clone()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn higher_lanes_yield_to_a_starving_lower_lane() {
        let lane = |name: &str, priority, min_share| LaneConfig {
            name: name.into(),
            topics: vec![name.into()],
            priority,
            min_share,
            rate_per_sec: None,
            burst: None,
            key_rate_per_sec: None,
            quiet_hours: Vec::new(),
        };
        let mut l = Lanes::new(&[lane("alerts", 0, 1.0), lane("campaigns", 1, 0.2)], &[]);
        l.lanes[0].window_count = 90;
        l.lanes[1].window_count = 10;
        l.decide(0, &[true, true]);
        assert_eq!(
            l.lanes[0].closed,
            Some(Closed::Yielding),
            "campaigns below 20%"
        );
        assert_eq!(l.lanes[1].closed, None);
        l.decide(0, &[true, false]);
        assert_eq!(l.lanes[0].closed, None, "campaigns has nothing waiting");
        l.lanes[1].window_count = 30;
        l.decide(0, &[true, true]);
        assert_eq!(
            (l.lanes[0].closed.clone(), l.lanes[1].closed.clone()),
            (None, None)
        );
        l.lanes[1].operator_paused = true;
        l.lanes[1].window_count = 0;
        l.decide(0, &[true, true]);
        assert_eq!(l.lanes[1].closed, Some(Closed::Paused));
        assert_eq!(
            l.lanes[0].closed, None,
            "a paused lane does not hold others back"
        );
    }

    #[test]
    fn a_lane_held_by_its_own_throttle_is_not_starving() {
        let lane = |name: &str, priority, min_share, rate_per_sec| LaneConfig {
            name: name.into(),
            topics: vec![name.into()],
            priority,
            min_share,
            rate_per_sec,
            burst: None,
            key_rate_per_sec: None,
            quiet_hours: Vec::new(),
        };
        // spool-demo's notifications: alerts at full speed, campaigns at 5/s with 5%.
        let mut l = Lanes::new(
            &[
                lane("alerts", 0, 0.1, None),
                lane("campaigns", 1, 0.05, Some(5)),
            ],
            &[],
        );
        l.lanes[0].window_count = 300;
        l.lanes[1].window_count = 5;
        l.lanes[1].throttled_until_ms = Some(1_000);
        l.decide(1_000, &[true, true]);
        assert_eq!(
            l.lanes[0].closed, None,
            "campaigns is below 5% because of its rate: alerts go on"
        );
        l.decide(1_000 + THROTTLE_GRACE_MS - 1, &[true, true]);
        assert_eq!(l.lanes[0].closed, None, "its next record is being read");
        l.decide(1_000 + THROTTLE_GRACE_MS, &[true, true]);
        assert_eq!(
            l.lanes[0].closed,
            Some(Closed::Yielding),
            "no longer held by its throttle and still below its share: starving"
        );
    }

    #[test]
    fn throttle_admits_at_the_rate() {
        let l = Lane::new(LaneConfig {
            name: "c".into(),
            topics: vec!["c".into()],
            priority: 1,
            min_share: 0.1,
            rate_per_sec: Some(100),
            burst: Some(10),
            key_rate_per_sec: Some(1),
            quiet_hours: Vec::new(),
        });
        assert_eq!(l.admit(Some(b"a")), None);
        assert!(
            l.admit(Some(b"a")).is_some_and(|w| w.per_key),
            "the key's rate is 1/s"
        );
        let admitted = (0..100)
            .filter(|i| l.admit(Some(format!("k{i}").as_bytes())).is_none())
            .count();
        assert!(
            (9..=10).contains(&admitted),
            "burst of 10 after one token: {admitted}"
        );
    }
}
