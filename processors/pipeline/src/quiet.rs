//! Per-user quiet hours: when may a campaign message reach a user?
//!
//! A window is `[start, end)` in minutes after local midnight in the user's IANA time zone,
//! wrapping past midnight when `start > end`. [`next_allowed`] returns `None` when sending now
//! is fine, or the instant the window ends. Local times are resolved with jiff against the time
//! zone database, so DST days are handled, with the "compatible" disambiguation of RFC 5545 and
//! Temporal: an end time that does not exist (spring forward) is pushed forward by the gap's
//! length (03:30 in a 03:00→04:00 gap ends at 04:30), one that exists twice (fall back) is the
//! first of the two, unless that one is already past (`now` is in the repeated hour, after
//! the first occurrence): then the second. So the end returned is always after `now`: a
//! message held until it is never released inside the window and held again at once.
//! Deal alerts ignore quiet hours (they are time-critical); campaigns wait.

use jiff::civil::Time;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};

use crate::events::QuietHours;

/// A time zone name that does not resolve, or a window out of range.
#[derive(Debug, thiserror::Error)]
pub enum QuietError {
    /// Unknown time zone.
    #[error("time zone {0:?}: {1}")]
    TimeZone(String, jiff::Error),
    /// A minute outside 0..1440.
    #[error("quiet hours {0}..{1}: minutes must be below 1440")]
    Range(u16, u16),
    /// Date arithmetic failed (out of range).
    #[error("quiet hours: {0}")]
    Time(#[from] jiff::Error),
}

/// `None` if a campaign message may be sent at `now`, else when the quiet window ends.
pub fn next_allowed(
    tz: &str,
    quiet: Option<QuietHours>,
    now: Timestamp,
) -> Result<Option<Timestamp>, QuietError> {
    let Some(q) = quiet else { return Ok(None) };
    if q.start_min >= 1440 || q.end_min >= 1440 {
        return Err(QuietError::Range(q.start_min, q.end_min));
    }
    if q.start_min == q.end_min {
        return Ok(None); // empty window
    }
    let zone = TimeZone::get(tz).map_err(|e| QuietError::TimeZone(tz.to_owned(), e))?;
    let local: Zoned = now.to_zoned(zone.clone());
    let minute = local.hour() as u16 * 60 + local.minute() as u16;
    let inside = if q.start_min < q.end_min {
        (q.start_min..q.end_min).contains(&minute)
    } else {
        minute >= q.start_min || minute < q.end_min
    };
    if !inside {
        return Ok(None);
    }
    // The window ends today at `end`, unless it wrapped and we are before midnight.
    let mut date = local.date();
    if q.start_min > q.end_min && minute >= q.start_min {
        date = date.checked_add(1.day())?;
    }
    let end = Time::new((q.end_min / 60) as i8, (q.end_min % 60) as i8, 0, 0)?;
    let end = zone.to_ambiguous_zoned(date.to_datetime(end));
    let first = end.clone().compatible()?.timestamp();
    if first > now {
        return Ok(Some(first));
    }
    // Fall back, `now` in the repeated hour after the end's first occurrence: the second one
    // (after `now`: the local minute is before the end's, on the end's date).
    Ok(Some(end.later()?.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }
    const NIGHT: QuietHours = QuietHours {
        start_min: 21 * 60,
        end_min: 7 * 60,
    };

    #[test]
    fn wrapping_window_in_a_zone() {
        // Athens is UTC+2 in winter: 20:30 UTC is 22:30 local: quiet until 07:00 local = 05:00 UTC.
        let next = next_allowed("Europe/Athens", Some(NIGHT), at("2026-01-10T20:30:00Z")).unwrap();
        assert_eq!(next, Some(at("2026-01-11T05:00:00Z")));
        // 03:00 local (01:00 UTC): same night's end.
        let next = next_allowed("Europe/Athens", Some(NIGHT), at("2026-01-11T01:00:00Z")).unwrap();
        assert_eq!(next, Some(at("2026-01-11T05:00:00Z")));
        // 12:00 local: allowed.
        assert_eq!(
            next_allowed("Europe/Athens", Some(NIGHT), at("2026-01-11T10:00:00Z")).unwrap(),
            None
        );
        assert_eq!(
            next_allowed("Europe/Athens", None, at("2026-01-11T01:00:00Z")).unwrap(),
            None
        );
    }

    #[test]
    fn across_dst_changes() {
        // Spring forward in Athens: 2026-03-29 03:00 → 04:00 local. 22:00 local on the 28th
        // (UTC+2) is 20:00 UTC; 07:00 local on the 29th is UTC+3: 04:00 UTC (9 h of night, not 10).
        let next = next_allowed("Europe/Athens", Some(NIGHT), at("2026-03-28T20:00:00Z")).unwrap();
        assert_eq!(next, Some(at("2026-03-29T04:00:00Z")));
        // Fall back: 2026-10-25 04:00 → 03:00 local. 07:00 local is UTC+2: 05:00 UTC.
        let next = next_allowed("Europe/Athens", Some(NIGHT), at("2026-10-24T20:00:00Z")).unwrap();
        assert_eq!(next, Some(at("2026-10-25T05:00:00Z")));
        // A window ending in the gap (03:30 does not exist on 2026-03-29): pushed by the gap.
        let q = QuietHours {
            start_min: 60,
            end_min: 3 * 60 + 30,
        };
        let next = next_allowed("Europe/Athens", Some(q), at("2026-03-28T23:30:00Z")).unwrap();
        assert_eq!(next, Some(at("2026-03-29T01:30:00Z")), "04:30 local, UTC+3");
        // A window ending at 03:30 on the fall-back night (it happens twice): the first one.
        let next = next_allowed("Europe/Athens", Some(q), at("2026-10-24T23:30:00Z")).unwrap();
        assert_eq!(
            next,
            Some(at("2026-10-25T00:30:00Z")),
            "03:30 local, still UTC+3"
        );
        // The same window seen from the repeated hour's second pass (03:10 EET, 01:10Z): the
        // first 03:30 (00:30Z) is past; the window ends at the second one, 01:30Z.
        let now = at("2026-10-25T01:10:00Z");
        let next = next_allowed("Europe/Athens", Some(q), now).unwrap();
        assert_eq!(next, Some(at("2026-10-25T01:30:00Z")), "03:30 local, UTC+2");
        // Every minute of that night: inside the window, the end is after now.
        let mut t = at("2026-10-24T21:00:00Z");
        while t < at("2026-10-25T03:00:00Z") {
            if let Some(end) = next_allowed("Europe/Athens", Some(q), t).unwrap() {
                assert!(end > t, "at {t}: the window ends at {end}, not after now");
            }
            t = t.checked_add(jiff::SignedDuration::from_mins(1)).unwrap();
        }
    }

    #[test]
    fn bad_input() {
        assert!(matches!(
            next_allowed("Mars/Olympus", Some(NIGHT), at("2026-01-01T00:00:00Z")),
            Err(QuietError::TimeZone(..))
        ));
        let q = QuietHours {
            start_min: 1440,
            end_min: 0,
        };
        assert!(matches!(
            next_allowed("UTC", Some(q), at("2026-01-01T00:00:00Z")),
            Err(QuietError::Range(..))
        ));
    }
}
