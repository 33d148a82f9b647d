//! The one grammar for durations and rates on every command line of Spool (`spool`'s
//! `--timeout`, `--linger`, `--idle-exit`, `replay --rate`, `bench --duration`/`--rate`, and
//! `spool-loadgen`), here because `spool bench` is this crate behind the CLI.
//!
//! ```text
//! DURATION := 30s | 500ms | 5m | 1h30m | 7d | 1m30s | 2h 15m   (jiff's friendly format, plus days)
//! RATE     := N | N/s | N/m | N/h                                 (N > 0, fractions allowed)
//! ```
//!
//! Error messages say what is accepted, in the user's terms (no type names).

use std::time::Duration;

/// What a duration looks like, for error messages.
pub const DURATION_EXAMPLES: &str = "500ms, 30s, 5m, 1h30m, 7d";

/// A duration with units (`1h`, `30m`, `2h30m`, `1m30s`, `500ms`, `7d`) in ms, unsigned.
pub fn duration_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let invalid =
        || format!("invalid duration {s:?}: use a number with units: {DURATION_EXAMPLES}");
    if s.is_empty() || s.starts_with(['-', '+']) || s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let d: jiff::SignedDuration = match s.parse() {
        Ok(d) => d,
        // jiff's friendly format has no days in a SignedDuration: accept `Nd` as N × 24h.
        Err(_) => match s
            .strip_suffix('d')
            .and_then(|n| n.trim().parse::<i64>().ok())
        {
            Some(days) if days >= 0 => jiff::SignedDuration::from_hours(days.saturating_mul(24)),
            _ => return Err(invalid()),
        },
    };
    if d.is_negative() {
        return Err(invalid());
    }
    i64::try_from(d.as_millis()).map_err(|_| format!("duration {s:?} is out of range"))
}

/// A duration flag: a [`duration_ms`] duration, or a plain number of seconds (fractions
/// allowed: `2`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("invalid duration {t:?}: use {DURATION_EXAMPLES}, or seconds"));
    }
    let ms = duration_ms(t)?;
    Ok(Duration::from_millis(ms.unsigned_abs()))
}

/// Records per second: `N`, `N/s`, `N/m` or `N/h` (N > 0).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let (n, per) = match s.split_once('/') {
        None => (s, 1.0),
        Some((n, unit)) => (
            n,
            match unit.trim() {
                "s" | "sec" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                other => return Err(format!("unknown rate unit {other:?}: use /s, /m or /h")),
            },
        ),
    };
    let n: f64 = n
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}: use e.g. 500, 500/s or 3000/m"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("rate {s:?} must be positive"));
    }
    Ok(n / per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["-1h", "-1", "soon", "3y", "1x", ""] {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.contains("500ms, 30s") && !e.contains("jiff") && !e.contains("Span"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("500"), Ok(500.0));
        assert_eq!(parse_rate("5000/s"), Ok(5000.0));
        assert_eq!(parse_rate("3000/m"), Ok(50.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("5/d").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
