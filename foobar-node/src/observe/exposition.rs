//! The two text formats of a `/metrics` answer and the choice between them.
//!
//! prometheus-client writes OpenMetrics 1.0.0 only. Prometheus's own checker
//! (`promtool check metrics`) and many scrapers read the classic text format
//! (`text/plain; version=0.0.4`), which names a counter's family as its samples are
//! named (with `_total`) and has no `# UNIT`, no `_created` samples and no `# EOF`.
//! So a scraper gets the classic format unless its `Accept` header asks for
//! OpenMetrics, as with the Prometheus client libraries.
//!
//! Std only: foobar-lb's agent compiles this file too (it does not depend on
//! foobar-node).

use std::{collections::HashMap, fmt::Write as _};

/// A text format of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The classic Prometheus text format, version 0.0.4: the default.
    Classic,
    /// OpenMetrics 1.0.0, for a scraper that asks for it.
    OpenMetrics,
}

impl Format {
    /// The format for a request with these `Accept` header values: OpenMetrics when
    /// they name `application/openmetrics-text` with a weight (`q`) above 0 and at
    /// least that of the classic format's type (`text/plain`, else `text/*`, else
    /// `*/*`), otherwise classic. Prometheus asks
    /// `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
    pub fn negotiate<'a>(accept: impl IntoIterator<Item = &'a str>) -> Format {
        let mut openmetrics: Option<f32> = None;
        // The classic format's weight from `text/plain`, `text/*` and `*/*`: the most
        // specific one that is given counts.
        let mut classic: [Option<f32>; 3] = [None; 3];
        for range in accept.into_iter().flat_map(|value| value.split(',')) {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let weight: f32 = parts
                .filter_map(|p| p.split_once('='))
                .find(|(key, _)| key.trim().eq_ignore_ascii_case("q"))
                // An unreadable weight counts as "not acceptable".
                .map_or(1.0, |(_, q)| q.trim().parse().unwrap_or(0.0));
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut openmetrics,
                "text/plain" => &mut classic[0],
                "text/*" => &mut classic[1],
                "*/*" => &mut classic[2],
                _ => continue,
            };
            *slot = Some(slot.map_or(weight, |w| w.max(weight)));
        }
        let openmetrics = openmetrics.unwrap_or(0.0);
        let classic = classic.into_iter().flatten().next().unwrap_or(0.0);
        // A tie goes to OpenMetrics: a scraper that names it reads it.
        if openmetrics > 0.0 && openmetrics >= classic {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// An OpenMetrics text, as prometheus-client writes it, in this format.
    pub fn convert(self, openmetrics: String) -> String {
        match self {
            Format::Classic => to_classic(&openmetrics),
            Format::OpenMetrics => openmetrics,
        }
    }
}

/// The classic form of an OpenMetrics text: counter and info families take their
/// samples' names (`_total`, `_info`), `info` becomes `gauge` and `unknown`
/// `untyped`; `# UNIT` (already the name's suffix), `# EOF`, `_created` samples
/// and exemplars are left out, and sample timestamps turn from seconds into
/// milliseconds. Help text passes unchanged (prometheus-client does not escape it).
pub fn to_classic(openmetrics: &str) -> String {
    // `# HELP` comes before `# TYPE`, so every family's type is read first.
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();
    let kind_of = |name: &str| types.get(name).copied().unwrap_or("unknown");
    let mut out = String::with_capacity(openmetrics.len() + 16 * types.len());
    // Writing to a String cannot fail.
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = classic_name(name, kind_of(name));
            let _ = writeln!(out, "# HELP {name} {help}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = (classic_name(name, kind), classic_type(kind));
            let _ = writeln!(out, "# TYPE {name} {kind}");
        } else if line.starts_with('#') || line.is_empty() {
            // `# UNIT`, `# EOF`.
        } else if let Some(sample) = classic_sample(line, &kind_of) {
            let _ = writeln!(out, "{sample}");
        }
    }
    out
}

/// A family's classic name: the name its samples carry.
fn classic_name(name: &str, kind: &str) -> String {
    match kind {
        "counter" => format!("{name}_total"),
        "info" => format!("{name}_info"),
        _ => name.to_owned(),
    }
}

/// The classic type of an OpenMetrics type.
fn classic_type(kind: &str) -> &'static str {
    match kind {
        "counter" => "counter",
        "gauge" | "info" | "stateset" => "gauge",
        "histogram" => "histogram",
        "summary" => "summary",
        _ => "untyped",
    }
}

/// A sample line in the classic format; `None` for a `_created` sample, which the
/// classic format does not have.
fn classic_sample<'a>(line: &str, kind_of: &impl Fn(&str) -> &'a str) -> Option<String> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    if let Some(family) = line[..name_end].strip_suffix("_created")
        && matches!(kind_of(family), "counter" | "histogram" | "summary")
    {
        return None;
    }
    // Label values may hold spaces and `#`, so the series ends at the label set's
    // closing brace, found outside quotes.
    let series_end = if line[name_end..].starts_with('{') {
        match label_set_end(&line[name_end..]) {
            Some(end) => name_end + end + 1,
            // Not a sample prometheus-client writes: pass it on for the reader to judge.
            None => return Some(line.to_owned()),
        }
    } else {
        name_end
    };
    let (series, rest) = line.split_at(series_end);
    // What follows ` # ` is an exemplar.
    let rest = rest.split(" # ").next().unwrap_or_default();
    let mut fields = rest.split_whitespace();
    let value = fields.next().unwrap_or_default();
    Some(match fields.next() {
        Some(seconds) => format!("{series} {value} {}", milliseconds(seconds)),
        None => format!("{series} {value}"),
    })
}

/// Where the label set at the start of `text` ends: the index of its `}`.
fn label_set_end(text: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// An OpenMetrics timestamp (seconds, maybe with a fraction) in milliseconds.
fn milliseconds(seconds: &str) -> String {
    match seconds.parse::<f64>() {
        Ok(s) => format!("{}", (s * 1000.0).round() as i64),
        Err(_) => seconds.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_unless_openmetrics_is_asked_for() {
        use Format::{Classic, OpenMetrics};
        let prometheus = "application/openmetrics-text;version=1.0.0,\
                          application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, format) in [
            (None, Classic),
            (Some("*/*"), Classic),
            (Some("text/plain"), Classic),
            (Some(prometheus), OpenMetrics),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                OpenMetrics,
            ),
            (Some("application/openmetrics-text, */*"), OpenMetrics),
            (
                Some("application/openmetrics-text;q=0.5, text/plain"),
                Classic,
            ),
            (
                Some("application/openmetrics-text;q=0.5, text/*;q=0.2"),
                OpenMetrics,
            ),
            (Some("application/openmetrics-text;q=0"), Classic),
            (Some("application/openmetrics-text;q=x"), Classic),
            // The specific type's weight counts, not the wildcard's.
            (
                Some("application/openmetrics-text;q=0.5, text/plain;q=0.1, */*"),
                OpenMetrics,
            ),
        ] {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
        // Several `Accept` headers count as one list.
        let headers = ["text/plain;q=0.5", "application/openmetrics-text"];
        assert_eq!(Format::negotiate(headers), OpenMetrics);
    }

    #[test]
    fn classic_names_counters_by_their_samples_and_drops_what_it_lacks() {
        let openmetrics = "\
# HELP web_requests HTTP requests, by route.
# TYPE web_requests counter
web_requests_total{route=\"a } # b\",code=\"200\"} 3
web_requests_created{route=\"a } # b\",code=\"200\"} 1700000000.5
# HELP web_latency_seconds Latency.
# TYPE web_latency_seconds histogram
# UNIT web_latency_seconds seconds
web_latency_seconds_sum 0.25
web_latency_seconds_count 1
web_latency_seconds_bucket{le=\"0.5\"} 1 # {trace=\"x\"} 0.25 1700000000.0
web_latency_seconds_bucket{le=\"+Inf\"} 1
# HELP web_build Build.
# TYPE web_build info
web_build_info{version=\"1\"} 1
# HELP web_up Up.
# TYPE web_up gauge
web_up 1.0 1700000000.25
# HELP web_other Other.
# TYPE web_other unknown
web_other 2
# EOF
";
        let classic = "\
# HELP web_requests_total HTTP requests, by route.
# TYPE web_requests_total counter
web_requests_total{route=\"a } # b\",code=\"200\"} 3
# HELP web_latency_seconds Latency.
# TYPE web_latency_seconds histogram
web_latency_seconds_sum 0.25
web_latency_seconds_count 1
web_latency_seconds_bucket{le=\"0.5\"} 1
web_latency_seconds_bucket{le=\"+Inf\"} 1
# HELP web_build_info Build.
# TYPE web_build_info gauge
web_build_info{version=\"1\"} 1
# HELP web_up Up.
# TYPE web_up gauge
web_up 1.0 1700000000250
# HELP web_other Other.
# TYPE web_other untyped
web_other 2
";
        assert_eq!(to_classic(openmetrics), classic);
        assert_eq!(
            Format::OpenMetrics.convert(openmetrics.to_owned()),
            openmetrics
        );
    }

    #[test]
    fn escaped_quotes_do_not_end_a_label_value() {
        let line = "x_total{a=\"q\\\"} \\\\\"} 1 # {b=\"c\"} 1";
        let kinds = |_: &str| "counter";
        assert_eq!(
            classic_sample(line, &kinds).as_deref(),
            Some("x_total{a=\"q\\\"} \\\\\"} 1")
        );
    }
}
