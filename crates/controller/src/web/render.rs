//! Small pure helpers of the dashboard: URL components, times people read, and the
//! geometry of its charts (drawn as SVG by the templates, so no script draws them).

use jitgate_core::Timestamp;

/// Percent-encodes a query or path component.
pub fn url_component(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// An API time (RFC 3339) as people read it: `2026-11-30 14:05 UTC`.
pub fn when(rfc3339: &str) -> String {
    rfc3339
        .parse::<Timestamp>()
        .map(|t| t.strftime("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|_| rfc3339.to_owned())
}

/// How long ago `then` was, from `now`: `3 min ago`, `2 h ago`, `4 days ago`.
pub fn ago(then: Timestamp, now: Timestamp) -> String {
    let s = now.duration_since(then).as_secs().max(0);
    match s {
        0..60 => "just now".to_owned(),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} days ago", s / 86_400),
    }
}

/// A duration in minutes as people read it: `45 min`, `3 h`, `1 h 30 min`.
pub fn minutes(m: i64) -> String {
    match (m / 60, m % 60) {
        (0, m) => format!("{m} min"),
        (h, 0) => format!("{h} h"),
        (h, m) => format!("{h} h {m} min"),
    }
}

/// One bar of a chart: its label, value and geometry (in the SVG's user units).
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub value: u64,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// A bar chart `width` × `height` of `values` (labels alongside), scaled to the
/// largest; a zero value draws no bar.
pub fn bars(values: &[(String, u64)], width: u32, height: u32) -> Vec<Bar> {
    let n = values.len().max(1) as u32;
    let slot = (width / n).max(1);
    let max = values.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    values
        .iter()
        .enumerate()
        .map(|(i, (label, v))| {
            let h = ((*v as f64 / max as f64) * f64::from(height)).round() as u32;
            let h = if *v > 0 { h.max(1) } else { 0 };
            Bar {
                label: label.clone(),
                value: *v,
                x: i as u32 * slot,
                y: height - h,
                width: slot.saturating_sub(1).max(1),
                height: h,
            }
        })
        .collect()
}

/// Counts of `times` in `buckets` equal slices of `seconds` ending at `now`, oldest
/// first (each time with its weight).
pub fn bucket(
    times: impl IntoIterator<Item = (Timestamp, u64)>,
    now: Timestamp,
    seconds: i64,
    buckets: usize,
) -> Vec<u64> {
    let mut out = vec![0u64; buckets];
    let span = seconds * buckets as i64;
    for (t, w) in times {
        let age = now.duration_since(t).as_secs();
        if age < 0 || age >= span {
            continue;
        }
        let i = buckets - 1 - (age / seconds) as usize;
        out[i] += w;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn components_are_encoded() {
        assert_eq!(url_component("/ui?a=1&b"), "%2Fui%3Fa%3D1%26b");
        assert_eq!(url_component("web-1"), "web%2D1");
    }

    #[test]
    fn times_read_well() {
        assert_eq!(when("2026-11-30T14:05:09Z"), "2026-11-30 14:05 UTC");
        assert_eq!(when("not a time"), "not a time");
        let now = t("2026-11-30T14:00:00Z");
        assert_eq!(ago(t("2026-11-30T13:59:30Z"), now), "just now");
        assert_eq!(ago(t("2026-11-30T13:57:00Z"), now), "3 min ago");
        assert_eq!(ago(t("2026-11-30T11:00:00Z"), now), "3 h ago");
        assert_eq!(ago(t("2026-11-26T14:00:00Z"), now), "4 days ago");
        assert_eq!(minutes(45), "45 min");
        assert_eq!(minutes(180), "3 h");
        assert_eq!(minutes(90), "1 h 30 min");
    }

    #[test]
    fn bars_scale_to_the_largest() {
        let b = bars(
            &[("a".into(), 0), ("b".into(), 5), ("c".into(), 10)],
            30,
            20,
        );
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].height, b[0].y), (0, 20));
        assert_eq!((b[1].height, b[1].y, b[1].x), (10, 10, 10));
        assert_eq!((b[2].height, b[2].y, b[2].x), (20, 0, 20));
        // A small value still shows.
        let b = bars(&[("a".into(), 1), ("b".into(), 1000)], 20, 20);
        assert_eq!(b[0].height, 1);
    }

    #[test]
    fn times_fall_in_their_bucket() {
        let now = t("2026-11-30T12:00:00Z");
        let got = bucket(
            [
                (t("2026-11-30T11:59:00Z"), 1), // newest bucket
                (t("2026-11-30T10:30:00Z"), 2), // two hours back
                (t("2026-11-30T09:00:00Z"), 7), // outside three hourly buckets
                (t("2026-11-30T12:30:00Z"), 9), // in the future: ignored
            ],
            now,
            3600,
            3,
        );
        assert_eq!(got, vec![0, 2, 1]);
    }
}
