//! ZODB timestamps (`persistent.TimeStamp`), the encoding of every tid.
//!
//! 8 bytes = two big-endian u32 values `A | B`. `A` counts minutes since 1900-01-01 00:00
//! UTC on a fake calendar in which every month has 31 days; `B` is the seconds within the
//! minute scaled by 2^32/60 (one unit is about 14 ns). Byte order is time order, which is
//! why new tids only need to compare greater than the previous one.

use crate::Tid;
use std::time::{SystemTime, UNIX_EPOCH};

/// One unit of `B` in seconds, as in persistent's `_timestamp.c`.
const SCONV: f64 = 60.0 / 65536.0 / 65536.0;

/// A broken-down UTC time with fractional seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Parts {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: f64,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 {
                29
            } else {
                28
            }
        }
    }
}

impl Parts {
    /// Breaks a POSIX time into UTC parts (what Python's `gmtime(t)[:5] + (t % 60,)` gives).
    pub fn from_unix(t: f64) -> Parts {
        let whole_minutes = (t / 60.0).floor();
        let second = t - whole_minutes * 60.0;
        let mins = whole_minutes as i64;
        let days = mins.div_euclid(1440);
        let in_day = mins.rem_euclid(1440);
        let (year, month, day) = civil_from_days(days);
        Parts {
            year,
            month,
            day,
            hour: (in_day / 60) as u32,
            minute: (in_day % 60) as u32,
            second,
        }
    }

    /// Encodes the parts as a timestamp.
    pub fn to_tid(self) -> Tid {
        let a = ((((self.year - 1900) * 12 + self.month as i64 - 1) * 31 + self.day as i64 - 1)
            * 24
            + self.hour as i64)
            * 60
            + self.minute as i64;
        let b = (self.second / SCONV) as u64;
        Tid(((a as u64 & 0xffff_ffff) << 32) | (b & 0xffff_ffff))
    }

    /// Decodes a timestamp.
    pub fn from_tid(tid: Tid) -> Parts {
        let a = tid.0 >> 32;
        let b = tid.0 & 0xffff_ffff;
        Parts {
            year: (a / 535_680) as i64 + 1900,
            month: ((a / 44_640) % 12) as u32 + 1,
            day: ((a / 1440) % 31) as u32 + 1,
            hour: ((a / 60) % 24) as u32,
            minute: (a % 60) as u32,
            second: b as f64 * SCONV,
        }
    }

    /// POSIX seconds on the real calendar (`TimeStamp.timeTime()`).
    pub fn to_unix(self) -> f64 {
        let days = days_from_civil(self.year, self.month, self.day);
        (days * 86400 + self.hour as i64 * 3600 + self.minute as i64 * 60) as f64 + self.second
    }
}

/// The tid for a POSIX time, as `TimeStamp(*gmtime(t)[:5] + (t % 60,))` computes it.
pub fn tid_from_unix(t: f64) -> Tid {
    Parts::from_unix(t).to_tid()
}

/// The POSIX time of a tid, as `TimeStamp(tid).timeTime()` computes it.
pub fn tid_to_unix(tid: Tid) -> f64 {
    Parts::from_tid(tid).to_unix()
}

/// `TimeStamp.laterThan`: `ts` if it is later than `prev`, else the smallest tid after
/// `prev`. When the second field overflows, the minute advances on the real calendar.
///
/// `None` when there is no usable tid after `prev`: at the top of the range (year 9917)
/// Python's `laterThan` wraps around to tid 0, which would write a "time-stamp reduction"
/// into the file and send clients a tid that goes backwards; and `0xff..ff` itself is
/// never returned (see [`LAST_TID_EXCLUSIVE`]).
pub fn later_than(ts: Tid, prev: Tid) -> Option<Tid> {
    let usable = |t: Tid| t > prev && t < LAST_TID_EXCLUSIVE;
    if ts > prev {
        return Some(ts).filter(|t| usable(*t));
    }
    if prev.0 & 0xffff_ffff != 0xffff_ffff {
        return Some(Tid(prev.0 + 1)).filter(|t| usable(*t));
    }
    let mut p = Parts::from_tid(prev);
    p.second = 0.0;
    p.minute += 1;
    if p.minute == 60 {
        p.minute = 0;
        p.hour += 1;
        if p.hour == 24 {
            p.hour = 0;
            p.day += 1;
            if p.day > days_in_month(p.year, p.month) {
                p.day = 1;
                p.month += 1;
                if p.month > 12 {
                    p.month = 1;
                    p.year += 1;
                }
            }
        }
    }
    // When the minutes since 1900 no longer fit in 32 bits, `to_tid` wraps around to a
    // small tid: there is nothing after `prev`.
    Some(p.to_tid()).filter(|t| usable(*t))
}

/// The one tid never handed out: ZODB's MVCC adapter computes `last tid + 1` when a
/// connection opens, so a storage whose last tid is `0xff..ff` cannot be opened by ZODB.
const LAST_TID_EXCLUSIVE: Tid = Tid(u64::MAX);

/// How far ahead of this server's clock an explicit tid may be (clock skew between the
/// machine that wrote a transaction being copied and this one). Beyond it, a tid is a
/// client's mistake or an attack: every later transaction would be stamped after it.
pub const EXPLICIT_TID_MAX_AHEAD_SECONDS: f64 = 24.0 * 3600.0;

/// Whether an explicit tid given at `tpc_begin` (copies and restores, ZODB's own tests)
/// may be used after `last`: it must be later than `last` and not more than
/// [`EXPLICIT_TID_MAX_AHEAD_SECONDS`] ahead of `now` (POSIX seconds). The error says why.
pub fn check_explicit_tid(tid: Tid, last: Tid, now: f64) -> Result<(), String> {
    if tid <= last {
        return Err(format!(
            "transaction id {tid} is not later than the last transaction {last}"
        ));
    }
    let limit = tid_from_unix(now + EXPLICIT_TID_MAX_AHEAD_SECONDS);
    if tid > limit {
        return Err(format!(
            "transaction id {tid} ({}) is more than {} hours ahead of the server's clock",
            format_tid(tid),
            EXPLICIT_TID_MAX_AHEAD_SECONDS / 3600.0
        ));
    }
    Ok(())
}

/// The current wall-clock time as a POSIX float.
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A new tid for a transaction starting now, strictly after `prev`; `None` when `prev`
/// is the last tid there is (see [`later_than`]).
pub fn new_tid(prev: Tid) -> Option<Tid> {
    later_than(tid_from_unix(now_unix()), prev)
}

/// Formats a tid the way ZODB prints timestamps (`2024-01-02 03:04:05.500000`).
pub fn format_tid(tid: Tid) -> String {
    let p = Parts::from_tid(tid);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:09.6}",
        p.year, p.month, p.day, p.hour, p.minute, p.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_spec_example() {
        let p = Parts::from_tid(Tid(0x03f5945817777777));
        assert_eq!(
            (p.year, p.month, p.day, p.hour, p.minute),
            (2024, 1, 2, 3, 4)
        );
        assert!((p.second - 5.5).abs() < 1e-6);
        assert_eq!(
            format_tid(Tid(0x03f5945817777777)),
            "2024-01-02 03:04:05.500000"
        );
    }

    #[test]
    fn encodes_unix_time() {
        // 2024-01-02 03:04:05.5 UTC
        let t = 1_704_164_645.5;
        let tid = tid_from_unix(t);
        assert_eq!(tid.0 >> 32, 0x03f59458);
        assert!((tid_to_unix(tid) - t).abs() < 1e-6);
    }

    #[test]
    fn later_than_rolls_into_next_real_month() {
        assert_eq!(
            later_than(Tid(0x03eead5fffffffff), Tid(0x03eead5fffffffff)),
            Some(Tid(0x03eebe4000000000))
        );
        assert_eq!(later_than(Tid(5), Tid(9)), Some(Tid(10)));
        assert_eq!(later_than(Tid(11), Tid(9)), Some(Tid(11)));
    }

    #[test]
    fn no_tid_after_the_last_one() {
        // Python's laterThan wraps these to tid 0 (a "time-stamp reduction").
        assert_eq!(later_than(Tid(0), Tid(u64::MAX)), None);
        assert_eq!(new_tid(Tid(u64::MAX)), None);
        // The last minute of the range: its seconds can still advance, the minute cannot.
        let last_minute = Tid(0xffff_ffff_0000_0000);
        assert_eq!(
            later_than(Tid(0), last_minute),
            Some(Tid(0xffff_ffff_0000_0001))
        );
        assert_eq!(
            later_than(Tid(0), Tid(0xffff_ffff_ffff_fffd)),
            Some(Tid(0xffff_ffff_ffff_fffe))
        );
        // 0xff..ff would make ZODB's MVCC overflow: never handed out.
        assert_eq!(later_than(Tid(0), Tid(0xffff_ffff_ffff_fffe)), None);
        assert_eq!(later_than(Tid(u64::MAX), Tid(5)), None);
        // A minute that rolls over into a year that still fits.
        let t = later_than(Tid(0), Tid(0xfff0_0000_ffff_ffff)).unwrap();
        assert!(t > Tid(0xfff0_0000_ffff_ffff));
    }

    #[test]
    fn explicit_tids_within_a_day_of_the_clock() {
        let now = 1_704_164_645.5;
        let last = tid_from_unix(now - 60.0);
        assert!(check_explicit_tid(tid_from_unix(now), last, now).is_ok());
        assert!(check_explicit_tid(tid_from_unix(now + 23.0 * 3600.0), last, now).is_ok());
        assert!(check_explicit_tid(Tid(1), Tid::ZERO, now).is_ok());
        let e = check_explicit_tid(tid_from_unix(now + 25.0 * 3600.0), last, now).unwrap_err();
        assert!(e.contains("ahead of the server's clock"), "{e}");
        assert!(check_explicit_tid(Tid(u64::MAX), last, now).is_err());
        let e = check_explicit_tid(last, last, now).unwrap_err();
        assert!(e.contains("not later than"), "{e}");
    }

    #[test]
    fn new_tids_increase() {
        let a = new_tid(Tid::ZERO).unwrap();
        let b = new_tid(a).unwrap();
        assert!(b > a);
        let far = Tid(u64::MAX >> 1);
        assert!(new_tid(far).unwrap() > far);
    }
}
