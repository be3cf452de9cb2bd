//! Lengths of time as the topology file writes them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A length of time written as a whole number and a unit: `90s`, `15m`, `36h`, `8d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span {
    ms: i64,
}

impl Span {
    pub const fn days(d: i64) -> Span {
        Span {
            ms: d * 24 * 3_600_000,
        }
    }

    pub const fn from_ms(ms: i64) -> Span {
        Span { ms }
    }

    pub fn as_ms(self) -> i64 {
        self.ms
    }
}

impl TryFrom<String> for Span {
    type Error = String;

    fn try_from(text: String) -> Result<Span, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let unit_ms: i64 = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "`{text}` is not a duration: write a whole number and one of s, m, h, d (e.g. \"8d\")"
                ))
            }
        };
        let n: i64 = n.parse().map_err(|_| {
            format!("`{text}` is not a duration: the number is missing or too large")
        })?;
        match n.checked_mul(unit_ms) {
            Some(ms) if ms > 0 => Ok(Span { ms }),
            Some(_) => Err(format!("`{text}`: a duration must be longer than zero")),
            None => Err(format!("`{text}` is too long a duration")),
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, ms) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)] {
            if self.ms % ms == 0 {
                return write!(f, "{}{unit}", self.ms / ms);
            }
        }
        write!(f, "{}s", self.ms / 1000)
    }
}

impl From<Span> for String {
    fn from(s: Span) -> String {
        s.to_string()
    }
}
