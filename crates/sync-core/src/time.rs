//! Timestamps: the RFC 3339 `time` of firehose events to Unix microseconds (for lag), no I/O.

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into Unix microseconds.
/// Returns `None` for anything else (the caller treats lag as unknown).
pub fn rfc3339_to_unix_micros(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.len() < 20 || !s.is_ascii() {
        return None;
    }
    let (date, rest) = s.split_at(10);
    let b = date.as_bytes();
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (year, month, day) = (num(&date[0..4])?, num(&date[5..7])?, num(&date[8..10])?);
    let rest = rest.strip_prefix(['T', 't', ' '])?;
    if rest.len() < 9 || rest.as_bytes()[2] != b':' || rest.as_bytes()[5] != b':' {
        return None;
    }
    let (hour, minute, second) = (num(&rest[0..2])?, num(&rest[3..5])?, num(&rest[6..8])?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut tail = &rest[8..];
    let mut micros = 0i64;
    if let Some(frac) = tail.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut scale = 100_000;
        for b in frac[..digits.min(6)].bytes() {
            micros += i64::from(b - b'0') * scale;
            scale /= 10;
        }
        tail = &frac[digits..];
    }
    let offset_secs = match tail {
        "Z" | "z" => 0,
        _ if tail.len() == 6
            && (tail.starts_with('+') || tail.starts_with('-'))
            && &tail[3..4] == ":" =>
        {
            let secs = num(&tail[1..3])? * 3600 + num(&tail[4..6])? * 60;
            if tail.starts_with('-') {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_secs;
    Some(secs * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firehose_times() {
        assert_eq!(rfc3339_to_unix_micros("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_to_unix_micros("1970-01-01T00:00:00.000001Z"),
            Some(1)
        );
        // 2024-10-02T14:03:28Z = 1727877808
        assert_eq!(
            rfc3339_to_unix_micros("2024-10-02T14:03:28.512Z"),
            Some(1_727_877_808_512_000)
        );
        assert_eq!(
            rfc3339_to_unix_micros("2024-10-02T16:03:28+02:00"),
            Some(1_727_877_808_000_000)
        );
        assert_eq!(
            rfc3339_to_unix_micros("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000_000)
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "2024-10-02",
            "2024-13-02T00:00:00Z",
            "2024-10-02T00:00:00",
            "2024-10-02T00:00:00.Z",
            "２０２４-10-02T00:00:00Z",
        ] {
            assert_eq!(rfc3339_to_unix_micros(bad), None, "{bad}");
        }
    }
}
