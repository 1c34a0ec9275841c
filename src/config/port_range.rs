//! Port ranges such as `1024-65535` or a single `8080`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port, inclusive.
    pub end: u16,
}

impl PortRange {
    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

    /// How many ports the range holds.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    /// A range always holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th port of the range (wrapping).
    pub fn nth(&self, i: u32) -> u16 {
        // len() >= 1 and the result is <= end, so the conversion cannot fail.
        u16::try_from(u32::from(self.start) + i % self.len()).unwrap_or(self.end)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("bad port '{p}' in range '{s}'"));
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if start == 0 || start > end {
            return Err(format!("bad range '{s}': expected start-end with 1 <= start <= end"));
        }
        Ok(PortRange { start, end })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let r: PortRange = "1024-65535".parse().unwrap();
        assert!(r.contains(1024) && r.contains(65535) && !r.contains(80));
        assert_eq!(r.len(), 64512);
        assert_eq!(r.nth(r.len()), 1024);
        assert_eq!("8080".parse::<PortRange>().unwrap().len(), 1);
        assert!("9-1".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("a-b".parse::<PortRange>().is_err());
    }
}
