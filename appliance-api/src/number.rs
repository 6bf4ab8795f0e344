//! JSON integers as JSON Schema counts them: `2124` and `2124.0` are the same integer (a
//! number whose fractional part is zero), so a request field typed `integer` in the OpenAPI
//! document accepts both. serde's `u64` takes only the first; these deserializers take both
//! and refuse a fraction, a negative number or one beyond `u64::MAX` with a named error.

use serde::{Deserialize, Deserializer, de};

/// Largest f64 that converts to u64 without saturating (2^64 is not below it).
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

/// The integer a JSON number stands for, if it is a non-negative integer within `u64`.
fn integral(value: &serde_json::Number) -> Option<u64> {
    if let Some(unsigned) = value.as_u64() {
        return Some(unsigned);
    }
    let float = value.as_f64()?;
    // The cast is exact: the value is integral and within 0..2^64.
    (float.fract() == 0.0 && (0.0..TWO_POW_64).contains(&float)).then_some(float as u64)
}

/// A `u64` field given as a JSON integer, in either notation.
pub fn u64_integral<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    integral(&number).ok_or_else(|| {
        de::Error::invalid_value(
            de::Unexpected::Other(&number.to_string()),
            &"a non-negative integer within u64",
        )
    })
}

/// An optional `u64` field (`null` or absent: `None`).
pub fn opt_u64_integral<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(deserializer)? {
        None => Ok(None),
        Some(number) => integral(&number).map(Some).ok_or_else(|| {
            de::Error::invalid_value(
                de::Unexpected::Other(&number.to_string()),
                &"a non-negative integer within u64",
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Probe {
        #[serde(deserialize_with = "u64_integral")]
        value: u64,
        #[serde(default, deserialize_with = "opt_u64_integral")]
        optional: Option<u64>,
    }

    fn parse(text: &str) -> Result<Probe, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn integers_in_either_notation_are_taken() {
        assert_eq!(parse(r#"{"value": 2124}"#).expect("int").value, 2124);
        assert_eq!(parse(r#"{"value": 2124.0}"#).expect("float").value, 2124);
        assert_eq!(parse(r#"{"value": 1e3}"#).expect("exponent").value, 1000);
        // Parsed exactly (serde_json's float_roundtrip), so an integral float stays integral.
        assert_eq!(
            parse(r#"{"value": 2251799813685247.0}"#)
                .expect("2^51 - 1")
                .value,
            2_251_799_813_685_247
        );
        assert_eq!(
            parse(r#"{"value": 18446744073709551615}"#)
                .expect("max")
                .value,
            u64::MAX
        );
        let probe = parse(r#"{"value": 1, "optional": 7.0}"#).expect("optional");
        assert_eq!(probe.optional, Some(7));
        assert_eq!(
            parse(r#"{"value": 1, "optional": null}"#)
                .expect("null")
                .optional,
            None
        );
        assert_eq!(parse(r#"{"value": 1}"#).expect("absent").optional, None);
    }

    #[test]
    fn fractions_negatives_and_overflow_are_refused_by_name() {
        for text in [
            r#"{"value": 2124.5}"#,
            r#"{"value": -1}"#,
            r#"{"value": -1.0}"#,
            r#"{"value": 18446744073709551616.0}"#,
            r#"{"value": 1e300}"#,
            r#"{"value": "5"}"#,
            r#"{"value": 1, "optional": 0.5}"#,
        ] {
            let error = parse(text).expect_err(text);
            assert!(
                error.contains("integer") || error.contains("invalid type"),
                "{text}: {error}"
            );
        }
    }
}
