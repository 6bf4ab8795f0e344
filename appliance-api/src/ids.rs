//! The ids the control API names things by: items (32 hex digits), jobs and recovery points
//! (integers), each with `Display` as the API writes it and `FromStr` that says what is wrong.

use std::fmt;
use std::str::FromStr;

/// An item's id: 16 bytes, written as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ItemId(pub [u8; 16]);

/// Why a text is not an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not {expected}")]
pub struct BadId {
    /// The text given.
    pub text: String,
    /// What an id of this kind looks like.
    pub expected: &'static str,
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for ItemId {
    type Err = BadId;

    /// 32 hex digits, either case.
    fn from_str(text: &str) -> Result<Self, BadId> {
        let bad = || BadId {
            text: text.to_owned(),
            expected: "an item id (32 hex digits)",
        };
        if text.len() != 32 {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(text, &mut id).map_err(|_| bad())?;
        Ok(Self(id))
    }
}

/// A job's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(pub u64);

/// A recovery point's id (the sequence number of the frame that made it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PointId(pub u64);

macro_rules! integer_id {
    ($name:ident, $expected:literal) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = BadId;

            fn from_str(text: &str) -> Result<Self, BadId> {
                // Decimal digits only: no sign, no blanks (u64's parser takes a `+`).
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(BadId {
                        text: text.to_owned(),
                        expected: $expected,
                    });
                }
                text.parse().map(Self).map_err(|_| BadId {
                    text: text.to_owned(),
                    expected: $expected,
                })
            }
        }

        impl From<u64> for $name {
            fn from(id: u64) -> Self {
                Self(id)
            }
        }
    };
}

integer_id!(JobId, "a job id (a decimal integer)");
integer_id!(PointId, "a point id (a decimal integer)");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_round_trip_in_lowercase() {
        let text = "3F2A0000000000000000000000000001";
        let id: ItemId = text.parse().expect("id");
        assert_eq!(id.to_string(), text.to_ascii_lowercase());
        for bad in [
            "",
            "3f2a",
            "zz2a0000000000000000000000000001",
            &"a".repeat(33),
        ] {
            assert!(bad.parse::<ItemId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn integer_ids_take_digits_only() {
        assert_eq!("2000".parse::<PointId>(), Ok(PointId(2000)));
        assert_eq!(JobId(7).to_string(), "7");
        for bad in ["", "+1", "-1", "1.5", " 1", "18446744073709551616"] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
    }
}
