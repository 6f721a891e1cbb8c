//! ISO 8601 durations (`PT3H`, `P1D`) as used by `maxRequestAccessDuration` and an
//! initiate port's `duration`.

use jiff::{Span, SpanTotal, Unit};

/// A policy's maximum request duration: 5 minutes to 1 day.
pub const MIN_MAX_DURATION_SECS: i64 = 5 * 60;
pub const MAX_MAX_DURATION_SECS: i64 = 24 * 60 * 60;

/// Parses an ISO 8601 duration into whole seconds. Years and months are refused (their
/// length depends on the calendar); days count as 24 hours.
pub fn parse_iso8601_secs(s: &str) -> Result<i64, String> {
    let bad = || format!("'{s}' is not an ISO 8601 duration such as PT3H, PT30M or P1D");
    if !s.starts_with(['P', 'p']) {
        return Err(bad());
    }
    let span: Span = s.parse().map_err(|_| bad())?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(format!(
            "'{s}': durations in years or months are not supported"
        ));
    }
    if span.is_negative() {
        return Err(format!("'{s}' is negative"));
    }
    let total = span
        .total(SpanTotal::from(Unit::Second).days_are_24_hours())
        .map_err(|_| bad())?;
    Ok(total.floor() as i64)
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
    fn max_duration_bounds() {
        assert!(MaxDuration::parse("PT4M59S").is_err());
        assert!(MaxDuration::parse("PT5M").is_ok());
        assert!(MaxDuration::parse("P1D").is_ok());
        assert!(MaxDuration::parse("PT24H").is_ok());
        assert!(MaxDuration::parse("PT24H1S").is_err());
        assert!(MaxDuration::parse("P2D").is_err());
        assert_eq!(MaxDuration::parse("PT3H").unwrap().as_str(), "PT3H");
    }
}
