//! ISO 8601 durations (`PT3H`, `P1D`) as used by `maxRequestAccessDuration` and an
//! initiate port's `duration`.

use jiff::{Span, SpanRelativeTo};

/// A policy's maximum request duration: 5 minutes to 1 day.
pub const MIN_MAX_DURATION_SECS: i64 = 5 * 60;
pub const MAX_MAX_DURATION_SECS: i64 = 24 * 60 * 60;

/// Parses an ISO 8601 duration into whole seconds (fractions are dropped). Years and
/// months are refused (their length depends on the calendar); days count as 24 hours.
/// A value too large to represent (beyond about 20,000 years) is an error, never an
/// overflow.
pub fn parse_iso8601_secs(s: &str) -> Result<i64, String> {
    let bad = || format!("'{s}' is not an ISO 8601 duration such as PT3H, PT30M or P1D");
    let too_long = || format!("'{s}' is too long a duration");
    if !s.starts_with(['P', 'p']) {
        return Err(bad());
    }
    let span: Span = s.parse().map_err(|e: jiff::Error| {
        if e.is_range() || has_huge_number(s) {
            too_long()
        } else {
            bad()
        }
    })?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(format!(
            "'{s}': durations in years or months are not supported"
        ));
    }
    if span.is_negative() {
        return Err(format!("'{s}' is negative"));
    }
    // Exact (no floating point), and cannot overflow: every span without years or
    // months fits a SignedDuration.
    let total = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|_| too_long())?;
    Ok(total.as_secs())
}

/// True when `s` has a whole number of more than 12 significant digits: more than any
/// unit of a duration can hold (the largest, 631107417600 seconds, has 12), so the
/// text is a duration that is too long rather than not a duration.
fn has_huge_number(s: &str) -> bool {
    let mut prev = ' ';
    let mut fraction = false;
    let mut significant = 0usize;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !prev.is_ascii_digit() {
                fraction = prev == '.' || prev == ',';
                significant = 0;
            }
            if !fraction && (significant > 0 || c != '0') {
                significant += 1;
                if significant > 12 {
                    return true;
                }
            }
        }
        prev = c;
    }
    false
}

/// Seconds as an ISO 8601 duration (`P1D`, `PT1H30M`, `PT45S`).
pub fn format_iso8601_secs(secs: i64) -> String {
    let (d, rest) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    let mut out = String::from("P");
    if d > 0 {
        out.push_str(&format!("{d}D"));
    }
    if h > 0 || m > 0 || s > 0 || d == 0 {
        out.push('T');
        if h > 0 {
            out.push_str(&format!("{h}H"));
        }
        if m > 0 {
            out.push_str(&format!("{m}M"));
        }
        if s > 0 || (h == 0 && m == 0) {
            out.push_str(&format!("{s}S"));
        }
    }
    out
}

/// A validated maximum request duration, keeping the text the caller wrote so that it
/// round-trips unchanged through the Azure API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaxDuration {
    text: String,
    secs: i64,
}

impl MaxDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let secs = parse_iso8601_secs(s)?;
        if !(MIN_MAX_DURATION_SECS..=MAX_MAX_DURATION_SECS).contains(&secs) {
            return Err(format!(
                "'{s}' is outside the allowed range of 5 minutes (PT5M) to 1 day (P1D)"
            ));
        }
        Ok(MaxDuration {
            text: s.to_owned(),
            secs,
        })
    }

    /// The default when a port rule gives none: three hours, as Azure's portal.
    pub fn default_three_hours() -> Self {
        MaxDuration {
            text: "PT3H".to_owned(),
            secs: 3 * 3600,
        }
    }

    pub fn secs(&self) -> i64 {
        self.secs
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_iso8601_secs("PT3H").unwrap(), 10800);
        assert_eq!(parse_iso8601_secs("PT5M").unwrap(), 300);
        assert_eq!(parse_iso8601_secs("P1D").unwrap(), 86400);
        assert_eq!(parse_iso8601_secs("PT1H30M").unwrap(), 5400);
        assert_eq!(parse_iso8601_secs("PT90S").unwrap(), 90);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "3h", "1 hour", "P1M", "P1Y", "PT", "-PT1H", "PTXH"] {
            assert!(parse_iso8601_secs(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn huge_values_are_clean_errors() {
        for huge in [
            "PT99999999999999999H",
            "PT99999999999999999999999999999S",
            "P99999999999999999999D",
            "PT9223372036854775807S",
            "PT9223372036854775807H",
            "PT6311074176000S",
            "P1043498W",
            "P7304485D",
            "P19999999999W",
        ] {
            let e = parse_iso8601_secs(huge).unwrap_err();
            assert_eq!(e, format!("'{huge}' is too long a duration"));
            assert!(MaxDuration::parse(huge).is_err(), "{huge}");
        }
        // The largest values still parse, exactly.
        assert_eq!(
            parse_iso8601_secs("PT631107417600S").unwrap(),
            631_107_417_600
        );
        assert_eq!(parse_iso8601_secs("P7304484D").unwrap(), 7_304_484 * 86_400);
        assert_eq!(parse_iso8601_secs("PT1.999999999S").unwrap(), 1);
        // Long fractions and leading zeros are not large numbers.
        assert!(!has_huge_number("PT0000000000000001.0000000000000S"));
        assert!(has_huge_number("PT1000000000000S"));
        assert_eq!(parse_iso8601_secs("PT0000000000000001S").unwrap(), 1);
    }

    #[test]
    fn max_duration_bounds() {
        assert!(MaxDuration::parse("PT4M59S").is_err());
        assert!(MaxDuration::parse("PT5M").is_ok());
        assert!(MaxDuration::parse("P1D").is_ok());
        assert!(MaxDuration::parse("PT24H").is_ok());
        assert!(MaxDuration::parse("PT24H1S").is_err());
        assert!(MaxDuration::parse("P2D").is_err());
        assert_eq!(MaxDuration::parse("PT3H").unwrap().as_str(), "PT3H");
    }

    /// `P..W..DT..H..M..S` with each component present or not.
    fn iso_text(parts: [Option<u64>; 5], lower: bool) -> String {
        let [w, d, h, m, sec] = parts;
        let mut t = String::from("P");
        for (v, unit) in [(w, 'W'), (d, 'D')] {
            if let Some(v) = v {
                t.push_str(&format!("{v}{unit}"));
            }
        }
        if h.is_some() || m.is_some() || sec.is_some() {
            t.push('T');
            for (v, unit) in [(h, 'H'), (m, 'M'), (sec, 'S')] {
                if let Some(v) = v {
                    t.push_str(&format!("{v}{unit}"));
                }
            }
        }
        if lower { t.to_ascii_lowercase() } else { t }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary text never panics; anything accepted is a non-negative number of
        /// seconds, and MaxDuration accepts exactly the ones in its range, keeping the
        /// text.
        #[test]
        fn never_panics(s in prop_oneof![
            any::<String>(),
            "[PpTtYMWDHSymwdhs0-9.,+ -]{0,32}",
            "P[0-9]{0,25}[WD]?(T[0-9]{0,25}(\\.[0-9]{0,12})?[HMS]){0,3}",
        ]) {
            match parse_iso8601_secs(&s) {
                Ok(secs) => {
                    prop_assert!(secs >= 0);
                    let max = MaxDuration::parse(&s);
                    let in_range = (MIN_MAX_DURATION_SECS..=MAX_MAX_DURATION_SECS).contains(&secs);
                    prop_assert_eq!(max.is_ok(), in_range);
                    if let Ok(m) = max {
                        prop_assert_eq!(m.secs(), secs);
                        prop_assert_eq!(m.as_str(), s.as_str());
                    }
                }
                Err(e) => {
                    prop_assert!(!e.is_empty());
                    prop_assert!(MaxDuration::parse(&s).is_err());
                }
            }
        }

        /// Valid durations give exactly their number of seconds, in either case.
        #[test]
        fn valid_durations_round_trip(
            parts in [
                proptest::option::of(0u64..10_000),
                proptest::option::of(0u64..100_000),
                proptest::option::of(0u64..1_000_000),
                proptest::option::of(0u64..10_000_000),
                proptest::option::of(0u64..100_000_000),
            ],
            lower in any::<bool>(),
        ) {
            prop_assume!(parts.iter().any(Option::is_some));
            let [w, d, h, m, s] = parts.map(|p| p.unwrap_or(0) as i64);
            let want = w * 7 * 86_400 + d * 86_400 + h * 3_600 + m * 60 + s;
            let text = iso_text(parts, lower);
            prop_assert_eq!(parse_iso8601_secs(&text), Ok(want), "{}", text);
        }

        /// Fractions of a second are dropped, never rounded up.
        #[test]
        fn fractions_round_down(s in 0u64..1_000_000, frac in "[0-9]{1,9}") {
            prop_assert_eq!(parse_iso8601_secs(&format!("PT{s}.{frac}S")), Ok(s as i64));
        }

        /// Numbers of any size: never a panic or a wrapped value; an accepted one is
        /// exact.
        #[test]
        fn huge_numbers_are_exact_or_refused(
            digits in "[1-9][0-9]{0,39}",
            unit in prop_oneof![Just("W"), Just("D"), Just("TH"), Just("TM"), Just("TS")],
        ) {
            let text = format!("P{}{}{}", &unit[..unit.len() - 1], digits, &unit[unit.len() - 1..]);
            let per: i128 = match unit {
                "W" => 7 * 86_400,
                "D" => 86_400,
                "TH" => 3_600,
                "TM" => 60,
                _ => 1,
            };
            let want = digits.parse::<i128>().ok().and_then(|n| n.checked_mul(per));
            match parse_iso8601_secs(&text) {
                Ok(secs) => prop_assert_eq!(Some(i128::from(secs)), want, "{}", text),
                Err(e) => prop_assert!(e.contains(&text), "{}", e),
            }
        }
    }
}
