//! Bandwidth parsing and display over random inputs.

use proptest::prelude::*;
use quicklane_qos::{parse_bandwidth, Rate};

const MIN: u64 = 1_000;
const MAX: u64 = 10_000_000_000_000;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn display_form_round_trips(bits in any::<u64>()) {
        let rate = Rate::from_bits_per_sec(bits);
        prop_assert_eq!(rate.to_string().parse::<Rate>(), Ok(rate));
    }

    #[test]
    fn plain_integers_are_bits_per_second(bits in 0u64..=MAX * 2) {
        let parsed = parse_bandwidth(&bits.to_string());
        if (MIN..=MAX).contains(&bits) {
            prop_assert_eq!(parsed, Ok(Rate::from_bits_per_sec(bits)));
        } else {
            prop_assert!(parsed.is_err());
        }
    }

    #[test]
    fn suffixes_multiply_exactly(
        whole in 0u64..100_000,
        fraction in 0u64..1_000,
        suffix in prop::sample::select(vec![
            ("k", 1_000u64), ("M", 1_000_000), ("G", 1_000_000_000),
            ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30),
        ]),
    ) {
        let (name, scale) = suffix;
        let text = format!("{whole}.{fraction:03}{name}");
        let exact = u128::from(whole) * u128::from(scale)
            + u128::from(fraction) * u128::from(scale) / 1_000;
        let parsed = parse_bandwidth(&text);
        if (u128::from(MIN)..=u128::from(MAX)).contains(&exact) {
            prop_assert_eq!(parsed.map(Rate::bits_per_sec), Ok(exact as u64), "{}", text);
        } else {
            prop_assert!(parsed.is_err(), "{}", text);
        }
    }

    #[test]
    fn errors_carry_the_input(text in "[-+0-9.eEkKMGTPmi bps]{0,14}|\\PC{0,16}") {
        if let Err(e) = parse_bandwidth(&text) {
            prop_assert_eq!(e.input(), text.as_str());
            if !text.is_empty() {
                prop_assert!(e.to_string().contains(&format!("{text:?}")), "{}", e);
            }
        }
        let _ = text.parse::<Rate>();
    }
}
