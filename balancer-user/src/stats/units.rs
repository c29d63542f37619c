//! Numbers in human units, the same on the stats page and in `mxlb status`: `1.2 MiB`,
//! `2m13s`.

/// `1.2 MiB`: binary units, one decimal above bytes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `2m13s`, `1h2m`, `3d4h`: the two largest units, enough to read at a glance.
pub fn human_duration(secs: f64) -> String {
    let total = finite_or_zero(secs) as u64;
    let (days, hours, minutes, seconds) = (
        total / 86_400,
        total / 3_600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m{seconds}s"),
        (0, _, _) => format!("{hours}h{minutes}m"),
        _ => format!("{days}d{hours}h"),
    }
}

/// Durations from the daemon are never negative or NaN, but the page must not show
/// nonsense if one were.
pub fn finite_or_zero(secs: f64) -> f64 {
    if secs.is_finite() && secs > 0.0 {
        secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanises_numbers() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_duration(0.4), "0s");
        assert_eq!(human_duration(133.0), "2m13s");
        assert_eq!(human_duration(3725.0), "1h2m");
        assert_eq!(human_duration(3.0 * 86_400.0 + 4.0 * 3_600.0), "3d4h");
        assert_eq!(human_duration(f64::NAN), "0s");
        assert_eq!(human_duration(-5.0), "0s");
    }
}
