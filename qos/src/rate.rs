//! Bandwidth values, and the parser for the Kubernetes quantities that bandwidth annotations
//! carry (`kubernetes.io/egress-bandwidth: 100M` means 100 Mbit/s).

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A bandwidth in bits per second.
///
/// It displays in the largest decimal unit that keeps a whole part, with as many decimals as
/// it takes to be exact ("1.5Gbit/s", "800kbit/s", "1.000001Mbit/s"), so the display form
/// parses back to the same value. Serde writes that form and reads it or a Kubernetes
/// quantity (see the [`FromStr`] impl).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Rate(u64);

impl Rate {
    pub const ZERO: Rate = Rate(0);
    /// The smallest bandwidth a quantity may ask for; Kubernetes' bandwidth plugin has the
    /// same floor.
    pub const MIN_QUANTITY: Rate = Rate(1_000);
    /// The largest bandwidth a quantity may ask for. Kubernetes allows up to 1P, but no NIC
    /// comes near 10T, so a larger value is far likelier a typo than a wish.
    pub const MAX_QUANTITY: Rate = Rate(10_000_000_000_000);

    pub const fn from_bits_per_sec(bits: u64) -> Rate {
        Rate(bits)
    }

    pub const fn bits_per_sec(self) -> u64 {
        self.0
    }

    /// Rounded down, so a byte-counting token bucket never exceeds the rate.
    pub const fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
}

const UNITS: [(u64, &str); 4] = [
    (1_000_000_000_000, "T"),
    (1_000_000_000, "G"),
    (1_000_000, "M"),
    (1_000, "k"),
];

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match UNITS.iter().find(|(scale, _)| self.0 >= *scale) {
            None => format!("{}bit/s", self.0),
            Some(&(scale, prefix)) => {
                let (whole, part) = (self.0 / scale, self.0 % scale);
                if part == 0 {
                    format!("{whole}{prefix}bit/s")
                } else {
                    let width = scale.ilog10() as usize;
                    let decimals = format!("{part:0width$}");
                    format!("{whole}.{}{prefix}bit/s", decimals.trim_end_matches('0'))
                }
            }
        };
        // `pad` so status tables can align rates with `{:>12}`.
        f.pad(&text)
    }
}

/// Reads the display form ("1.5Gbit/s"; any value, 0 included, since it is how computed
/// rates are written) or else a Kubernetes quantity through [`parse_bandwidth`], with its
/// range checks.
impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Rate, RateError> {
        match s.strip_suffix("bit/s") {
            Some(number) => parse_display_form(s, number),
            None => parse_bandwidth(s),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Rate, D::Error> {
        struct RateVisitor;
        impl de::Visitor<'_> for RateVisitor {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a bandwidth string like \"100M\" or \"1.5Gbit/s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(RateVisitor)
    }
}

const HINT: &str = "use a Kubernetes quantity like 10M, 1.5G or 500Mi (bits per second)";

/// Why a bandwidth string was refused. Every variant but `Empty` carries the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("empty bandwidth; {hint}", hint = HINT)]
    Empty,
    #[error("{input:?}: contains whitespace; {hint}", hint = HINT)]
    Whitespace { input: String },
    #[error("{input:?}: not a number; {hint}", hint = HINT)]
    NotANumber { input: String },
    #[error("{input:?}: unknown suffix {suffix:?}; {hint}", hint = HINT)]
    UnknownSuffix { input: String, suffix: String },
    #[error(
        "{input:?}: unknown suffix \"K\": kilo is a lowercase k in Kubernetes quantities \
         (or Ki for 1024); {hint}",
        hint = HINT
    )]
    UppercaseKilo { input: String },
    #[error("{input:?}: negative bandwidth; {hint}", hint = HINT)]
    Negative { input: String },
    #[error("{input:?}: zero bandwidth; leave the setting out instead")]
    Zero { input: String },
    #[error(
        "{input:?}: too small; the minimum is 1k (1 kbit/s){}",
        milli_hint(input)
    )]
    TooSmall { input: String },
    #[error("{input:?}: too large; the maximum is 10T (10 Tbit/s)")]
    TooLarge { input: String },
    #[error("{input:?}: does not fit in 64 bits per second")]
    Overflow { input: String },
}

impl RateError {
    /// The refused string ("" for `Empty`).
    pub fn input(&self) -> &str {
        match self {
            RateError::Empty => "",
            RateError::Whitespace { input }
            | RateError::NotANumber { input }
            | RateError::UnknownSuffix { input, .. }
            | RateError::UppercaseKilo { input }
            | RateError::Negative { input }
            | RateError::Zero { input }
            | RateError::TooSmall { input }
            | RateError::TooLarge { input }
            | RateError::Overflow { input } => input,
        }
    }
}

// "10m" is 10 millibit/s in Kubernetes; the likely intent was 10M.
fn milli_hint(input: &str) -> &'static str {
    if input.ends_with('m') {
        " (\"m\" means milli; mega is M)"
    } else {
        ""
    }
}

/// Parses a Kubernetes quantity as bits per second, the way `kubernetes.io/egress-bandwidth`
/// and `kubernetes.io/ingress-bandwidth` are read: a plain number ("1000000"), a decimal
/// fraction ("1.5G", ".5M"), a decimal suffix (k, M, G, T, P, E, and m for milli), a binary
/// one (Ki, Mi, Gi, Ti, Pi, Ei) or an exponent ("1e9", "1E6"). Sub-bit remainders are
/// rounded down. The result must lie in 1k..=10T.
///
/// Refused: empty input, any whitespace, a sign other than "+", zero, values out of range,
/// and unknown suffixes such as "K", "Mbps" or "mb" (suffixes are case-sensitive).
pub fn parse_bandwidth(s: &str) -> Result<Rate, RateError> {
    let input = || s.to_owned();
    if s.is_empty() {
        return Err(RateError::Empty);
    }
    if s.chars().any(char::is_whitespace) {
        return Err(RateError::Whitespace { input: input() });
    }
    let number = Number::split(s).ok_or_else(|| RateError::NotANumber { input: input() })?;
    let (exp10, shift) = quantity_suffix(s, number.rest)?;
    let exp10 = exp10.saturating_sub(number.frac_len);
    match floor(&number.digits, exp10, shift) {
        Floor::Zero => Err(RateError::Zero { input: input() }),
        _ if number.negative => Err(RateError::Negative { input: input() }),
        Floor::Overflow => Err(RateError::TooLarge { input: input() }),
        Floor::Value { whole, fraction } => {
            let max = Rate::MAX_QUANTITY.0;
            if whole > max || (whole == max && fraction) {
                Err(RateError::TooLarge { input: input() })
            } else if whole < Rate::MIN_QUANTITY.0 {
                Err(RateError::TooSmall { input: input() })
            } else {
                Ok(Rate(whole))
            }
        }
    }
}

fn parse_display_form(input: &str, number: &str) -> Result<Rate, RateError> {
    let owned = || input.to_owned();
    if input.chars().any(char::is_whitespace) {
        return Err(RateError::Whitespace { input: owned() });
    }
    let (number, exp10) = match number.as_bytes().last() {
        Some(b'k') => (&number[..number.len() - 1], 3),
        Some(b'M') => (&number[..number.len() - 1], 6),
        Some(b'G') => (&number[..number.len() - 1], 9),
        Some(b'T') => (&number[..number.len() - 1], 12),
        _ => (number, 0),
    };
    let parsed = Number::split(number)
        .filter(|n| !n.negative && n.rest.is_empty() && !number.starts_with('+'))
        .ok_or_else(|| RateError::NotANumber { input: owned() })?;
    match floor(&parsed.digits, exp10 - parsed.frac_len, 0) {
        Floor::Zero => Ok(Rate::ZERO),
        Floor::Value { whole, .. } => Ok(Rate(whole)),
        Floor::Overflow => Err(RateError::Overflow { input: owned() }),
    }
}

/// The numeric head of a quantity: `[+-]digits[.digits]`, at least one digit.
struct Number<'a> {
    negative: bool,
    /// Integer and fraction digits together, as values 0..=9.
    digits: Vec<u8>,
    frac_len: i64,
    rest: &'a str,
}

impl<'a> Number<'a> {
    fn split(s: &'a str) -> Option<Number<'a>> {
        let (negative, body) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let int_len = body.bytes().take_while(u8::is_ascii_digit).count();
        let (frac, after) = match body[int_len..].strip_prefix('.') {
            Some(tail) => {
                let n = tail.bytes().take_while(u8::is_ascii_digit).count();
                (&tail[..n], &tail[n..])
            }
            None => ("", &body[int_len..]),
        };
        if int_len + frac.len() == 0 {
            return None;
        }
        // "1.2.3" or "1.5e.3": a second number part is a malformed number, not a suffix.
        if after.starts_with('.') {
            return None;
        }
        let digits = body[..int_len]
            .bytes()
            .chain(frac.bytes())
            .map(|b| b - b'0')
            .collect();
        Some(Number {
            negative,
            digits,
            frac_len: i64::try_from(frac.len()).unwrap_or(i64::MAX),
            rest: after,
        })
    }
}

/// The suffix of a quantity as `(decimal exponent, binary shift)`.
fn quantity_suffix(input: &str, suffix: &str) -> Result<(i64, u32), RateError> {
    const BINARY: [(&str, u32); 6] = [
        ("Ki", 10),
        ("Mi", 20),
        ("Gi", 30),
        ("Ti", 40),
        ("Pi", 50),
        ("Ei", 60),
    ];
    const DECIMAL: [(&str, i64); 7] = [
        ("k", 3),
        ("M", 6),
        ("G", 9),
        ("T", 12),
        ("P", 15),
        ("E", 18),
        ("m", -3),
    ];
    let unknown = |suffix: &str| RateError::UnknownSuffix {
        input: input.to_owned(),
        suffix: suffix.to_owned(),
    };
    if suffix.is_empty() {
        return Ok((0, 0));
    }
    if let Some((exp, rest)) = exponent(suffix) {
        return if rest.is_empty() {
            Ok((exp, 0))
        } else {
            Err(unknown(rest))
        };
    }
    let known = BINARY
        .iter()
        .find_map(|&(s, shift)| suffix.strip_prefix(s).map(|rest| ((0, shift), rest)))
        .or_else(|| {
            DECIMAL
                .iter()
                .find_map(|&(s, exp)| suffix.strip_prefix(s).map(|rest| ((exp, 0), rest)))
        });
    match known {
        Some((scale, "")) => Ok(scale),
        Some((_, rest)) => Err(unknown(rest)),
        None if suffix.starts_with('K') => Err(RateError::UppercaseKilo {
            input: input.to_owned(),
        }),
        None => Err(unknown(suffix)),
    }
}

/// `e`/`E`, an optional sign and digits; a bare "E" is the exa suffix instead.
fn exponent(suffix: &str) -> Option<(i64, &str)> {
    let tail = suffix.strip_prefix(['e', 'E'])?;
    let (negative, tail) = match tail.as_bytes().first() {
        Some(b'-') => (true, &tail[1..]),
        Some(b'+') => (false, &tail[1..]),
        _ => (false, tail),
    };
    let len = tail.bytes().take_while(u8::is_ascii_digit).count();
    if len == 0 {
        return None;
    }
    // Saturating: any exponent this large is out of range either way.
    let magnitude = tail[..len]
        .bytes()
        .fold(0i64, |acc, b| {
            acc.saturating_mul(10).saturating_add(i64::from(b - b'0'))
        })
        .min(1 << 40);
    Some((if negative { -magnitude } else { magnitude }, &tail[len..]))
}

enum Floor {
    Zero,
    Value { whole: u64, fraction: bool },
    Overflow,
}

/// `floor(digits × 10^exp10 × 2^shift)`, exactly: the digits are multiplied out in decimal so
/// that long fractions and binary suffixes never lose precision to floating point.
fn floor(digits: &[u8], exp10: i64, shift: u32) -> Floor {
    let Some(first) = digits.iter().position(|&d| d != 0) else {
        return Floor::Zero;
    };
    let mut digits = digits[first..].to_vec();
    for _ in 0..shift / 10 {
        multiply(&mut digits, 1024);
    }
    let len = i64::try_from(digits.len()).unwrap_or(i64::MAX);
    let whole_len = len.saturating_add(exp10);
    // u64::MAX has 20 digits.
    if whole_len > 20 {
        return Floor::Overflow;
    }
    let split = usize::try_from(whole_len.clamp(0, len)).unwrap_or(0);
    let (whole_digits, fraction_digits) = digits.split_at(split);
    let trailing_zeros = usize::try_from(exp10.max(0)).unwrap_or(0);
    let whole = whole_digits
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0, trailing_zeros))
        .try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d))
        });
    match whole {
        Some(whole) => Floor::Value {
            whole,
            fraction: fraction_digits.iter().any(|&d| d != 0),
        },
        None => Floor::Overflow,
    }
}

/// Multiplies a big-endian decimal digit string in place.
fn multiply(digits: &mut Vec<u8>, factor: u32) {
    let mut carry = 0u32;
    for d in digits.iter_mut().rev() {
        let product = u32::from(*d) * factor + carry;
        *d = (product % 10) as u8;
        carry = product / 10;
    }
    let mut head = Vec::new();
    while carry > 0 {
        head.push((carry % 10) as u8);
        carry /= 10;
    }
    head.reverse();
    digits.splice(0..0, head);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> u64 {
        parse_bandwidth(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .bits_per_sec()
    }

    fn refused(s: &str) -> String {
        parse_bandwidth(s).expect_err(s).to_string()
    }

    #[test]
    fn accepts_kubernetes_quantities() {
        assert_eq!(bits("1000000"), 1_000_000);
        assert_eq!(bits("+1000"), 1_000);
        assert_eq!(bits("1k"), 1_000);
        assert_eq!(bits("10M"), 10_000_000);
        assert_eq!(bits("1.5G"), 1_500_000_000);
        assert_eq!(bits("0.5M"), 500_000);
        assert_eq!(bits(".5M"), 500_000);
        assert_eq!(bits("5.M"), 5_000_000);
        assert_eq!(bits("10T"), 10_000_000_000_000);
        assert_eq!(bits("0.001P"), 1_000_000_000_000);
        assert_eq!(bits("1Ki"), 1_024);
        assert_eq!(bits("500Mi"), 500 * (1 << 20));
        assert_eq!(bits("1.5Gi"), 3 * (1 << 29));
        assert_eq!(bits("2Ti"), 2 << 40);
        assert_eq!(bits("1e9"), 1_000_000_000);
        assert_eq!(bits("1E6"), 1_000_000);
        assert_eq!(bits("1.5e+3"), 1_500);
        assert_eq!(bits("2500000e-3"), 2_500);
        assert_eq!(bits("2000000m"), 2_000);
        assert_eq!(bits("000123k"), 123_000);
    }

    #[test]
    fn rounds_sub_bit_remainders_down() {
        assert_eq!(bits("1.0005k"), 1_000);
        assert_eq!(bits("1.9999999k"), 1_999);
        assert_eq!(bits("1.0001Ki"), 1_024); // 1024.1024
        assert_eq!(bits("0.0000000000000000000000000000001e34"), 1_000);
    }

    #[test]
    fn refuses_with_the_input_and_a_hint() {
        assert_eq!(
            refused("10Mbps"),
            "\"10Mbps\": unknown suffix \"bps\"; use a Kubernetes quantity like 10M, 1.5G or \
             500Mi (bits per second)"
        );
        assert!(
            refused("10K").contains("kilo is a lowercase k"),
            "{}",
            refused("10K")
        );
        assert!(refused("10Kbps").contains("kilo is a lowercase k"));
        assert!(refused("10g").contains("unknown suffix \"g\""));
        assert!(refused("10Mb").contains("unknown suffix \"b\""));
        assert!(refused("10Mbit/s").contains("unknown suffix \"bit/s\""));
        assert!(refused("1e").contains("unknown suffix \"e\""));
        assert!(refused("1e9k").contains("unknown suffix \"k\""));
        assert_eq!(parse_bandwidth(""), Err(RateError::Empty));
        assert!(refused("10 M").contains("whitespace"));
        assert!(refused(" 10M").contains("whitespace"));
        assert!(refused("10M\n").contains("whitespace"));
        assert!(refused("-10M").contains("negative"));
        assert!(refused("0").contains("zero"));
        assert!(refused("-0.0").contains("zero"));
        assert!(refused("0Gi").contains("zero"));
        for nan in [
            "NaN", "nan", "inf", "-inf", "M", ".", "-", "+", "1.2.3", "--1", "0x10k",
        ] {
            let e = parse_bandwidth(nan).expect_err(nan);
            assert!(
                matches!(
                    e,
                    RateError::NotANumber { .. } | RateError::UnknownSuffix { .. }
                ),
                "{nan}: {e}"
            );
            assert_eq!(e.input(), nan);
        }
        assert_eq!(
            refused("999"),
            "\"999\": too small; the minimum is 1k (1 kbit/s)"
        );
        assert!(refused("10m").ends_with("(\"m\" means milli; mega is M)"));
        assert!(refused("0.9999999k").contains("too small"));
        assert_eq!(
            refused("11T"),
            "\"11T\": too large; the maximum is 10T (10 Tbit/s)"
        );
        assert!(refused("10.000000000001T").contains("too large"));
        assert!(refused("10Ti").contains("too large"));
        assert!(refused("1E").contains("too large"));
        assert!(refused("1e999999999999999999999999").contains("too large"));
        assert!(refused("1e-999999999999999999999999").contains("too small"));
        assert!(refused("99999999999999999999999999999").contains("too large"));
    }

    #[test]
    fn displays_in_the_largest_whole_unit_exactly() {
        let show = |b| Rate::from_bits_per_sec(b).to_string();
        assert_eq!(show(0), "0bit/s");
        assert_eq!(show(999), "999bit/s");
        assert_eq!(show(800_000), "800kbit/s");
        assert_eq!(show(100_000_000), "100Mbit/s");
        assert_eq!(show(1_500_000_000), "1.5Gbit/s");
        assert_eq!(show(1_000_001), "1.000001Mbit/s");
        assert_eq!(show(10_000_000_000_000), "10Tbit/s");
        assert_eq!(show(u64::MAX), "18446744.073709551615Tbit/s");
        assert_eq!(
            format!("{:>10}", Rate::from_bits_per_sec(1_000)),
            "   1kbit/s"
        );
    }

    #[test]
    fn reads_the_display_form_and_quantities() {
        for b in [0, 1, 999, 1_000, 1_500_000_000, 1_000_001, u64::MAX] {
            let r = Rate::from_bits_per_sec(b);
            assert_eq!(r.to_string().parse::<Rate>(), Ok(r));
        }
        assert_eq!(
            "1.5G".parse::<Rate>().map(Rate::bits_per_sec),
            Ok(1_500_000_000)
        );
        assert!("1.5Gibit/s".parse::<Rate>().is_err());
        assert!("-1bit/s".parse::<Rate>().is_err());
        assert!("bit/s".parse::<Rate>().is_err());
        assert!("1 Mbit/s".parse::<Rate>().is_err());
        assert!(matches!(
            "18446745Tbit/s".parse::<Rate>(),
            Err(RateError::Overflow { .. })
        ));
    }

    #[test]
    fn serde_uses_the_string_form() {
        let r = Rate::from_bits_per_sec(1_500_000_000);
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"1.5Gbit/s\"");
        assert_eq!(serde_json::from_str::<Rate>("\"1.5Gbit/s\"").unwrap(), r);
        assert_eq!(serde_json::from_str::<Rate>("\"1500M\"").unwrap(), r);
        let e = serde_json::from_str::<Rate>("\"10Mbps\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown suffix \"bps\""), "{e}");
        assert!(serde_json::from_str::<Rate>("1500").is_err());
    }

    #[test]
    fn converts_to_bytes_rounding_down() {
        assert_eq!(
            Rate::from_bits_per_sec(8_000_007).bytes_per_sec(),
            1_000_000
        );
    }
}
