//! UTC calendar arithmetic for the rollup periods (hour, day, month) and the date formats
//! the API and CLI accept. Plain integer math on Unix seconds (no time-zone database: the
//! periods are UTC by definition).

/// Seconds in an hour and a day.
pub const HOUR: i64 = 3600;
pub const DAY: i64 = 86_400;

/// Days since 1970-01-01 of a civil date (proleptic Gregorian; H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

pub fn hour_start(t: i64) -> i64 {
    t.div_euclid(HOUR) * HOUR
}

pub fn day_start(t: i64) -> i64 {
    t.div_euclid(DAY) * DAY
}

/// Start of the UTC calendar month holding `t`.
pub fn month_start(t: i64) -> i64 {
    let (y, m, _) = civil_from_days(t.div_euclid(DAY));
    days_from_civil(y, m, 1) * DAY
}

/// `2026-12-06T04:00:00Z`.
pub fn format_utc(t: i64) -> String {
    let (y, m, d) = civil_from_days(t.div_euclid(DAY));
    let s = t.rem_euclid(DAY);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Parses Unix seconds, `YYYY-MM-DD` (midnight UTC), `YYYY-MM-DDTHH[:MM[:SS]][Z]`, or
/// `now`, `today`, `-7d` / `-24h` (relative to `now`).
pub fn parse_time(s: &str, now: i64) -> Result<i64, String> {
    let s = s.trim();
    let bad = || {
        format!("{s:?}: expected Unix seconds, YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ, now, today, -Nd or -Nh")
    };
    if s == "now" {
        return Ok(now);
    }
    if s == "today" {
        return Ok(day_start(now));
    }
    if let Some(rel) = s.strip_prefix('-') {
        let (n, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: i64 = n.parse().map_err(|_| bad())?;
        return match unit {
            "d" => Ok(now - n * DAY),
            "h" => Ok(now - n * HOUR),
            _ => Err(bad()),
        };
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| bad());
    }
    let s2 = s.trim_end_matches('Z');
    let (date, time) = s2.split_once('T').unwrap_or((s2, ""));
    let mut dp = date.split('-');
    let (Some(y), Some(m), Some(d), None) = (dp.next(), dp.next(), dp.next(), dp.next()) else {
        return Err(bad());
    };
    let y: i64 = y.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    let d: u32 = d.parse().map_err(|_| bad())?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut secs = 0i64;
    if !time.is_empty() {
        let mul = [3600, 60, 1];
        let parts: Vec<&str> = time.split(':').collect();
        if parts.len() > 3 {
            return Err(bad());
        }
        for (p, k) in parts.iter().zip(mul) {
            let v: i64 = p.parse().map_err(|_| bad())?;
            secs += v * k;
        }
    }
    Ok(days_from_civil(y, m, d) * DAY + secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip_and_periods() {
        for z in [-800_000i64, -1, 0, 1, 19_000, 20_428, 2_000_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        // 2026-12-06T04:15:30Z
        let t = days_from_civil(2026, 12, 6) * DAY + 4 * 3600 + 15 * 60 + 30;
        assert_eq!(format_utc(t), "2026-12-06T04:15:30Z");
        assert_eq!(format_utc(hour_start(t)), "2026-12-06T04:00:00Z");
        assert_eq!(format_utc(day_start(t)), "2026-12-06T00:00:00Z");
        assert_eq!(format_utc(month_start(t)), "2026-12-01T00:00:00Z");
        assert_eq!(parse_time("2026-12-06", 0), Ok(day_start(t)));
        assert_eq!(parse_time("2026-12-06T04:15:30Z", 0), Ok(t));
        assert_eq!(parse_time("-1d", t), Ok(t - DAY));
        assert_eq!(parse_time("today", t), Ok(day_start(t)));
        assert!(parse_time("yesterday", t).is_err());
        assert!(parse_time("2026-13-01", t).is_err());
    }
}
