//! Durations and times as people write and read them.
//!
//! In: `30m`, `3h`, `1h30m`, `1h 30m`, `1d`, `45s`, or ISO 8601 (`PT3H`, `P30D`) for
//! scripts written against the Azure API. The controller speaks ISO 8601 only, so what
//! a person types is turned into `PT<seconds>S` before it is sent (ISO text is sent as
//! written).
//!
//! Out: `2h 58m` rather than `PT10680S`, and times in the local time zone with what is
//! left or past (`14:05 (in 2h 58m)`) rather than nanosecond UTC. `--json` keeps the
//! wire values untouched; only tables and sentences are humanized.

use jiff::tz::TimeZone;
use jitgate_core::Timestamp;

/// What a duration flag accepts, for error messages.
pub const DURATION_FORMS: &str = "30m, 3h, 1h30m, 1d or ISO 8601 (PT3H, P1D)";

/// Parses a duration into whole seconds, more than zero.
pub fn parse_secs(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let too_long = || format!("'{text}' is too long a duration");
    let zero = || format!("'{text}' is zero: give some time");
    if t.starts_with(['P', 'p']) {
        let secs = jitgate_core::duration::parse_iso8601_secs(t)?;
        if secs <= 0 {
            return Err(zero());
        }
        return Ok(secs);
    }
    let bad = || format!("'{text}' is not a duration such as {DURATION_FORMS}");
    let mut secs: i64 = 0;
    let mut num = String::new();
    // A space may separate whole parts (`1h 30m`), never a number from its unit.
    let mut after_unit = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            after_unit = false;
            continue;
        }
        if c == ' ' && num.is_empty() && after_unit {
            continue;
        }
        if num.is_empty() {
            return Err(bad());
        }
        let unit: i64 = match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        // Only digits: parsing fails only when the number is too large.
        let n: i64 = num.parse().map_err(|_| too_long())?;
        num.clear();
        after_unit = true;
        secs = n
            .checked_mul(unit)
            .and_then(|s| secs.checked_add(s))
            .ok_or_else(too_long)?;
    }
    if !num.is_empty() || t.is_empty() {
        return Err(bad());
    }
    if secs <= 0 {
        return Err(zero());
    }
    // The controller must be able to read it back.
    jitgate_core::duration::parse_iso8601_secs(&format!("PT{secs}S")).map_err(|_| too_long())?;
    Ok(secs)
}

/// A duration flag's value as the controller wants it: ISO 8601 as written, anything
/// else as `PT<seconds>S`.
pub fn to_iso(text: &str) -> Result<String, String> {
    let secs = parse_secs(text)?;
    let t = text.trim();
    if t.starts_with(['P', 'p']) {
        Ok(t.to_ascii_uppercase())
    } else {
        Ok(format!("PT{secs}S"))
    }
}

/// Seconds of an ISO 8601 duration from the controller; 0 when unreadable.
pub fn iso_secs(iso: &str) -> i64 {
    jitgate_core::duration::parse_iso8601_secs(iso).unwrap_or(0)
}

/// `3h`, `1h 30m`, `2d 4h`, `58m 10s`, `45s`: the two largest units, rounded down.
pub fn duration(secs: i64) -> String {
    if secs <= 0 {
        return "0s".into();
    }
    let parts = [
        (secs / 86400, "d"),
        (secs % 86400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    let first = parts.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    let mut out = format!("{}{}", parts[first].0, parts[first].1);
    if let Some((n, u)) = parts.get(first + 1).filter(|(n, _)| *n > 0) {
        out.push_str(&format!(" {n}{u}"));
    }
    out
}

/// An ISO 8601 duration from the controller as `duration` writes it; the text itself
/// when it cannot be read.
pub fn iso(iso: &str) -> String {
    match jitgate_core::duration::parse_iso8601_secs(iso) {
        Ok(secs) => duration(secs),
        Err(_) => iso.to_owned(),
    }
}

/// `14:05 (in 2h 58m)`, `09:12 (3m ago)`, `2026-05-19 14:05 (in 1d 2h)`: local wall
/// time (with the date unless it is today) and how far from `now`.
pub fn time_at(t: Timestamp, now: Timestamp, tz: &TimeZone) -> String {
    let zoned = t.to_zoned(tz.clone());
    let today = now.to_zoned(tz.clone()).date();
    let wall = if zoned.date() == today {
        zoned.strftime("%H:%M").to_string()
    } else {
        zoned.strftime("%Y-%m-%d %H:%M").to_string()
    };
    let delta = t.duration_since(now).as_secs();
    let rel = if delta > 0 {
        format!("in {}", duration(delta))
    } else if delta < 0 {
        format!("{} ago", duration(-delta))
    } else {
        "now".to_owned()
    };
    format!("{wall} ({rel})")
}

/// `time_at` for a time the controller sent (RFC 3339), now, in the local time zone;
/// `-` for none, the text itself when it is not a time.
pub fn time(text: &str) -> String {
    match parse(text) {
        Some(t) => time_at(t, Timestamp::now(), &TimeZone::system()),
        None if text.is_empty() || text == "-" || text == "null" => "-".into(),
        None => text.to_owned(),
    }
}

/// A full local date and time to the second (`2026-05-17 14:05:07`), for logs.
pub fn stamp_in(t: Timestamp, tz: &TimeZone) -> String {
    t.to_zoned(tz.clone())
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// `stamp_in` for a time the controller sent, in the local time zone.
pub fn stamp(text: &str) -> String {
    match parse(text) {
        Some(t) => stamp_in(t, &TimeZone::system()),
        None => text.to_owned(),
    }
}

/// What is left until `text` (a time the controller sent): `2h 58m`, or `ended`.
pub fn left(text: &str) -> String {
    match parse(text) {
        Some(t) => {
            let secs = t.duration_since(Timestamp::now()).as_secs();
            if secs > 0 {
                duration(secs)
            } else {
                "ended".into()
            }
        }
        None => "?".into(),
    }
}

fn parse(text: &str) -> Option<Timestamp> {
    jitgate_core::request::parse_time(text).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_what_people_write_and_iso() {
        for (text, secs) in [
            ("3h", 10800),
            ("30m", 1800),
            ("1h30m", 5400),
            ("1h 30m", 5400),
            ("1d", 86400),
            ("30d", 30 * 86400),
            ("45s", 45),
            ("PT3H", 10800),
            ("P30D", 30 * 86400),
            ("p1d", 86400),
        ] {
            assert_eq!(parse_secs(text), Ok(secs), "{text}");
        }
        assert_eq!(to_iso("3h").unwrap(), "PT10800S");
        assert_eq!(to_iso("P30D").unwrap(), "P30D");
        assert_eq!(to_iso("pt3h").unwrap(), "PT3H");
        for bad in [
            "", "3", "h", "3x", "-1h", "0m", "P", "soon", "PT0S", "1h m", "1 h", " ", "3h ",
        ] {
            // A trailing space is trimmed away; the rest are refused.
            if bad == "3h " {
                assert_eq!(parse_secs(bad), Ok(10800));
                continue;
            }
            assert!(parse_secs(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_secs("soon").unwrap_err();
        assert!(e.contains("30m") && e.contains("PT3H"), "{e}");
    }

    #[test]
    fn huge_durations_are_clean_errors() {
        // Regression: these overflowed (a panic in debug builds, a wrapped, possibly
        // negative duration in release).
        for huge in [
            "99999999999999999h",
            "9223372036854775807s1s",
            "999999999999999999999999d",
            "106751991167301d",
            "99999999d",
            "PT99999999999999999H",
        ] {
            let e = parse_secs(huge).unwrap_err();
            assert!(e.contains("too long"), "{huge}: {e}");
        }
    }

    #[test]
    fn durations_read_like_people_write_them() {
        for (secs, text) in [
            (10800, "3h"),
            (5400, "1h 30m"),
            (10680, "2h 58m"),
            (10699, "2h 58m"),
            (86400, "1d"),
            (2 * 86400 + 4 * 3600 + 59, "2d 4h"),
            (3490, "58m 10s"),
            (45, "45s"),
            (0, "0s"),
        ] {
            assert_eq!(duration(secs), text, "{secs}");
        }
        assert_eq!(iso("PT10800S"), "3h");
        assert_eq!(iso("P1D"), "1d");
        assert_eq!(iso("garbage"), "garbage");
    }

    #[test]
    fn times_are_local_with_what_is_left() {
        let tz = TimeZone::fixed(jiff::tz::offset(2));
        let now: Timestamp = "2026-05-17T09:07:00Z".parse().unwrap();
        let at = |s: &str| time_at(s.parse().unwrap(), now, &tz);
        assert_eq!(at("2026-05-17T12:05:00Z"), "14:05 (in 2h 58m)");
        assert_eq!(at("2026-05-17T09:04:00Z"), "11:04 (3m ago)");
        assert_eq!(at("2026-05-17T09:07:00Z"), "11:07 (now)");
        assert_eq!(at("2026-05-18T12:05:00Z"), "2026-05-18 14:05 (in 1d 2h)");
        // Local midnight decides what "today" is, not UTC's.
        assert_eq!(at("2026-05-17T22:30:00Z"), "2026-05-18 00:30 (in 13h 23m)");
        assert_eq!(
            stamp_in("2026-05-17T09:07:05.123456789Z".parse().unwrap(), &tz),
            "2026-05-17 11:07:05"
        );
        assert_eq!(time(""), "-");
        assert_eq!(time("-"), "-");
        assert_eq!(time("not a time"), "not a time");
        assert_eq!(left("2000-01-01T00:00:00Z"), "ended");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Arbitrary text never panics; whatever is accepted is an ISO 8601 duration
        /// the controller reads as more than zero seconds.
        #[test]
        fn durations_never_panic(text in proptest::prop_oneof![
            proptest::prelude::any::<String>(),
            "[0-9dhmsPTHMSx -]{0,30}",
            "[0-9]{1,30}[dhms]([0-9]{1,30}[dhms]){0,3}",
        ]) {
            if let Ok(iso) = to_iso(&text) {
                let secs = jitgate_core::duration::parse_iso8601_secs(&iso);
                proptest::prop_assert!(matches!(secs, Ok(n) if n > 0), "{} -> {} -> {:?}", text, iso, secs);
            }
        }

        /// `1d2h3m4s` and its parts give exactly their seconds, and what `duration`
        /// prints for a whole number of units reads back the same.
        #[test]
        fn valid_durations_round_trip(
            parts in proptest::array::uniform4(proptest::option::of(0i64..100_000)),
        ) {
            let text: String = parts
                .iter()
                .zip(["d", "h", "m", "s"])
                .filter_map(|(n, u)| n.map(|n| format!("{n}{u}")))
                .collect();
            let want: i64 = parts
                .iter()
                .zip([86_400, 3_600, 60, 1])
                .map(|(n, u)| n.unwrap_or(0) * u)
                .sum();
            match to_iso(&text) {
                Ok(iso) => {
                    proptest::prop_assert_eq!(&iso, &format!("PT{want}S"));
                    proptest::prop_assert_eq!(jitgate_core::duration::parse_iso8601_secs(&iso), Ok(want));
                    proptest::prop_assert_eq!(to_iso(&iso), Ok(iso.clone()));
                }
                Err(_) => proptest::prop_assert!(want == 0, "{} refused", text),
            }
        }

        #[test]
        fn printed_durations_parse_back(secs in 1i64..10_000_000) {
            let printed = duration(secs);
            let back = parse_secs(&printed).unwrap();
            proptest::prop_assert!(back <= secs && back > 0, "{} -> {} -> {}", secs, printed, back);
        }
    }
}
