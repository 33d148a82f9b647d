//! The two text formats `/metrics` speaks, chosen by the scraper's `Accept` header.
//!
//! The registry renders OpenMetrics 1.0 (prometheus-client's only encoder), whose counter
//! families are named without `_total` while their samples carry it, and which ends with
//! `# EOF`. Prometheus asks for OpenMetrics in its `Accept` header and gets it, with the
//! OpenMetrics content type. Everything else (`curl`, `promtool check metrics`, older
//! scrapers) gets the classic text format 0.0.4, where `# HELP` and `# TYPE` of a counter name
//! the `_total` series itself: served as 0.0.4, the OpenMetrics body made a parser see
//! counters without help text and typeless `_total` series.

/// Content type of OpenMetrics text.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub(crate) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// True when the `Accept` header asks for OpenMetrics (at any quality above zero).
pub(crate) fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let is_om = parts
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"));
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            is_om && !refused
        })
    })
}

/// Rewrites an OpenMetrics body into the 0.0.4 text format: counter families are named after
/// their `_total` series, `info` families become gauges named `_info`, `unknown` becomes
/// `untyped`, and `# UNIT` and `# EOF` lines go (0.0.4 has neither).
pub(crate) fn to_prometheus_text(openmetrics: &str) -> String {
    // A family's `# HELP` comes before its `# TYPE`: find the renamed families first.
    let mut renamed: std::collections::HashMap<&str, (String, &str)> = Default::default();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            let new = match kind {
                "counter" => Some((format!("{name}_total"), "counter")),
                "info" => Some((format!("{name}_info"), "gauge")),
                "unknown" => Some((name.to_owned(), "untyped")),
                _ => None,
            };
            if let Some(n) = new {
                renamed.insert(name, n);
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match rewritten {
            Some((tag, rest)) => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                match renamed.get(name) {
                    Some((new_name, kind)) if tag == "# TYPE " => {
                        out.push_str(&format!("{tag}{new_name} {kind}"));
                    }
                    Some((new_name, _)) => {
                        out.push_str(&format!("{tag}{new_name} {}", unescape_help(text)));
                    }
                    None if tag == "# HELP " => {
                        out.push_str(&format!("{tag}{name} {}", unescape_help(text)));
                    }
                    None => out.push_str(line),
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// OpenMetrics escapes `"` in help text; 0.0.4 escapes only `\` and newlines.
fn unescape_help(text: &str) -> String {
    text.replace("\\\"", "\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        // What Prometheus 2.x sends.
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }

    #[test]
    fn counters_are_named_after_their_total_series() {
        let om = "# HELP spool_produce_bytes Bytes \\\"appended\\\".\n\
                  # TYPE spool_produce_bytes counter\n\
                  spool_produce_bytes_total{topic=\"t\"} 5\n\
                  # HELP spool_x_seconds Some time.\n\
                  # TYPE spool_x_seconds histogram\n\
                  # UNIT spool_x_seconds seconds\n\
                  spool_x_seconds_sum 1.0\n\
                  # HELP spool_build Build.\n\
                  # TYPE spool_build info\n\
                  spool_build_info{version=\"1\"} 1\n\
                  # EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP spool_produce_bytes_total Bytes \"appended\".\n\
             # TYPE spool_produce_bytes_total counter\n\
             spool_produce_bytes_total{topic=\"t\"} 5\n\
             # HELP spool_x_seconds Some time.\n\
             # TYPE spool_x_seconds histogram\n\
             spool_x_seconds_sum 1.0\n\
             # HELP spool_build_info Build.\n\
             # TYPE spool_build_info gauge\n\
             spool_build_info{version=\"1\"} 1\n"
        );
    }
}
