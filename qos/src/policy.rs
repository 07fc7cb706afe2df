//! What a pod asks for and what a node offers.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::rate::Rate;

/// An online pod's priority. Lower numbers are served first: every competing `High` pod is
/// filled to its limit before a `Medium` pod gets more than its guarantee.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub enum Priority {
    High = 0,
    /// The default, so that most pods stay unannotated and a few can be raised or lowered.
    #[default]
    Medium = 1,
    Low = 2,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Medium, Priority::Low];

    /// 0, 1 or 2: the pod's class in an activity mask.
    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// "0", "1", "2", "high", "medium" or "low", exactly.
impl FromStr for Priority {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Priority, PolicyError> {
        match s {
            "0" | "high" => Ok(Priority::High),
            "1" | "medium" => Ok(Priority::Medium),
            "2" | "low" => Ok(Priority::Low),
            _ => Err(PolicyError::UnknownPriority {
                value: s.to_owned(),
            }),
        }
    }
}

impl Serialize for Priority {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Reads the string forms, and the bare integers 0, 1 and 2 that TOML users will write.
impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Priority, D::Error> {
        struct PriorityVisitor;
        impl de::Visitor<'_> for PriorityVisitor {
            type Value = Priority;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a priority: 0, 1, 2, \"high\", \"medium\" or \"low\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Priority, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Priority, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Priority, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_any(PriorityVisitor)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        })
    }
}

/// A pod's bandwidth settings in one direction. `None` means unlimited / no guarantee.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectionPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guarantee: Option<Rate>,
}

impl DirectionPolicy {
    /// The direction only names the settings in the error.
    pub fn validate(&self, direction: Direction) -> Result<(), PolicyError> {
        match (self.guarantee, self.limit) {
            (Some(guarantee), Some(limit)) if guarantee > limit => {
                Err(PolicyError::GuaranteeAboveLimit {
                    direction,
                    guarantee,
                    limit,
                })
            }
            _ => Ok(()),
        }
    }
}

/// What one pod asks for.
///
/// An offline pod has no priority: its `priority` field is ignored (the annotations refuse
/// to set both).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodPolicy {
    pub priority: Priority,
    pub offline: bool,
    pub egress: DirectionPolicy,
    pub ingress: DirectionPolicy,
}

/// The offline class's index in an activity mask, after the three online priorities.
pub const OFFLINE_CLASS: usize = 3;

impl PodPolicy {
    /// Nothing set at all: the default policy, which needs no QoS treatment.
    pub fn is_unlimited(&self) -> bool {
        *self == PodPolicy::default()
    }

    pub fn direction(&self, direction: Direction) -> &DirectionPolicy {
        match direction {
            Direction::Egress => &self.egress,
            Direction::Ingress => &self.ingress,
        }
    }

    /// 0..=2 for online pods (their priority), [`OFFLINE_CLASS`] for offline ones.
    pub fn class(&self) -> usize {
        if self.offline {
            OFFLINE_CLASS
        } else {
            self.priority.index()
        }
    }

    /// The pod's class as an activity-mask bit.
    pub fn class_bit(&self) -> u8 {
        1 << self.class()
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        self.egress.validate(Direction::Egress)?;
        self.ingress.validate(Direction::Ingress)
    }
}

/// What a node offers, and how it splits between online and offline pods (Volcano's
/// `networkQosConfig`): while online pods demand at least `online_watermark_percent` of the
/// capacity, offline pods get `offline_low_percent`; below it they get what online pods
/// leave, between `offline_low_percent` and `offline_high_percent`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePolicy {
    pub capacity: Rate,
    #[serde(default = "default_watermark")]
    pub online_watermark_percent: u8,
    #[serde(default = "default_offline_low")]
    pub offline_low_percent: u8,
    #[serde(default = "default_offline_high")]
    pub offline_high_percent: u8,
}

fn default_watermark() -> u8 {
    NodePolicy::DEFAULT_ONLINE_WATERMARK_PERCENT
}
fn default_offline_low() -> u8 {
    NodePolicy::DEFAULT_OFFLINE_LOW_PERCENT
}
fn default_offline_high() -> u8 {
    NodePolicy::DEFAULT_OFFLINE_HIGH_PERCENT
}

impl NodePolicy {
    // Volcano's defaults.
    pub const DEFAULT_ONLINE_WATERMARK_PERCENT: u8 = 80;
    pub const DEFAULT_OFFLINE_LOW_PERCENT: u8 = 10;
    pub const DEFAULT_OFFLINE_HIGH_PERCENT: u8 = 40;

    /// The capacity has no sensible default: it is the node's link, or less.
    pub fn with_capacity(capacity: Rate) -> NodePolicy {
        NodePolicy {
            capacity,
            online_watermark_percent: Self::DEFAULT_ONLINE_WATERMARK_PERCENT,
            offline_low_percent: Self::DEFAULT_OFFLINE_LOW_PERCENT,
            offline_high_percent: Self::DEFAULT_OFFLINE_HIGH_PERCENT,
        }
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.capacity == Rate::ZERO {
            return Err(PolicyError::ZeroCapacity);
        }
        for (field, value) in [
            ("online_watermark_percent", self.online_watermark_percent),
            ("offline_low_percent", self.offline_low_percent),
            ("offline_high_percent", self.offline_high_percent),
        ] {
            if !(1..=100).contains(&value) {
                return Err(PolicyError::PercentOutOfRange { field, value });
            }
        }
        if self.offline_low_percent > self.offline_high_percent {
            return Err(PolicyError::OfflineLowAboveHigh {
                low: self.offline_low_percent,
                high: self.offline_high_percent,
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("priority {value:?} is not allowed; use 0 or high, 1 or medium, 2 or low")]
    UnknownPriority { value: String },
    #[error("{direction} guarantee {guarantee} exceeds the {direction} limit {limit}; a guarantee must not exceed the limit")]
    GuaranteeAboveLimit {
        direction: Direction,
        guarantee: Rate,
        limit: Rate,
    },
    #[error("node capacity must be more than 0bit/s")]
    ZeroCapacity,
    #[error("{field} = {value} is out of range; percentages must be 1 to 100")]
    PercentOutOfRange { field: &'static str, value: u8 },
    #[error("offline_low_percent = {low} exceeds offline_high_percent = {high}; low must not exceed high")]
    OfflineLowAboveHigh { low: u8, high: u8 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(bits: u64) -> Rate {
        Rate::from_bits_per_sec(bits)
    }

    #[test]
    fn parses_priorities() {
        for (s, p) in [
            ("0", Priority::High),
            ("high", Priority::High),
            ("1", Priority::Medium),
            ("medium", Priority::Medium),
            ("2", Priority::Low),
            ("low", Priority::Low),
        ] {
            assert_eq!(s.parse(), Ok(p));
        }
        let e = "High".parse::<Priority>().unwrap_err().to_string();
        assert_eq!(
            e,
            "priority \"High\" is not allowed; use 0 or high, 1 or medium, 2 or low"
        );
        assert!("3".parse::<Priority>().is_err());
        assert!(Priority::High < Priority::Low);
    }

    #[test]
    fn guarantee_must_not_exceed_limit() {
        let ok = DirectionPolicy {
            limit: Some(rate(10)),
            guarantee: Some(rate(10)),
        };
        assert_eq!(ok.validate(Direction::Egress), Ok(()));
        let only_guarantee = DirectionPolicy {
            limit: None,
            guarantee: Some(rate(10)),
        };
        assert_eq!(only_guarantee.validate(Direction::Egress), Ok(()));
        let bad = PodPolicy {
            ingress: DirectionPolicy {
                limit: Some(rate(1_000)),
                guarantee: Some(rate(2_000)),
            },
            ..PodPolicy::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "ingress guarantee 2kbit/s exceeds the ingress limit 1kbit/s; a guarantee must not \
             exceed the limit"
        );
    }

    #[test]
    fn unlimited_means_nothing_set() {
        assert!(PodPolicy::default().is_unlimited());
        assert!(!PodPolicy {
            offline: true,
            ..PodPolicy::default()
        }
        .is_unlimited());
        assert!(!PodPolicy {
            priority: Priority::High,
            ..PodPolicy::default()
        }
        .is_unlimited());
        let limited = PodPolicy {
            egress: DirectionPolicy {
                limit: Some(rate(1_000)),
                guarantee: None,
            },
            ..PodPolicy::default()
        };
        assert!(!limited.is_unlimited());
    }

    #[test]
    fn classes() {
        let pod = |priority, offline| PodPolicy {
            priority,
            offline,
            ..PodPolicy::default()
        };
        assert_eq!(pod(Priority::High, false).class_bit(), 0b0001);
        assert_eq!(pod(Priority::Low, false).class_bit(), 0b0100);
        assert_eq!(pod(Priority::High, true).class(), OFFLINE_CLASS);
    }

    #[test]
    fn validates_node_policy() {
        let node = NodePolicy::with_capacity(rate(1_000_000_000));
        assert_eq!(node.validate(), Ok(()));
        assert_eq!(
            NodePolicy {
                capacity: Rate::ZERO,
                ..node
            }
            .validate(),
            Err(PolicyError::ZeroCapacity)
        );
        let e = NodePolicy {
            online_watermark_percent: 0,
            ..node
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "online_watermark_percent = 0 is out of range; percentages must be 1 to 100"
        );
        assert!(NodePolicy {
            offline_high_percent: 101,
            ..node
        }
        .validate()
        .is_err());
        let e = NodePolicy {
            offline_low_percent: 50,
            ..node
        }
        .validate()
        .unwrap_err();
        assert_eq!(e, PolicyError::OfflineLowAboveHigh { low: 50, high: 40 });
    }

    #[test]
    fn node_policy_from_toml_needs_only_capacity() {
        let node: NodePolicy = toml::from_str("capacity = \"10G\"").unwrap();
        assert_eq!(node, NodePolicy::with_capacity(rate(10_000_000_000)));
        let e = toml::from_str::<NodePolicy>("capacity = \"10G\"\nwatermark = 5").unwrap_err();
        assert!(e.to_string().contains("unknown field `watermark`"), "{e}");
        let e = toml::from_str::<NodePolicy>("capacity = \"10 G\"").unwrap_err();
        assert!(e.to_string().contains("whitespace"), "{e}");
    }

    #[test]
    fn pod_policy_round_trips_through_json_and_toml() {
        let pod = PodPolicy {
            priority: Priority::High,
            offline: false,
            egress: DirectionPolicy {
                limit: Some(rate(600_000_000)),
                guarantee: Some(rate(1_000)),
            },
            ingress: DirectionPolicy::default(),
        };
        let json = serde_json::to_string(&pod).unwrap();
        assert_eq!(
            json,
            r#"{"priority":"high","offline":false,"egress":{"limit":"600Mbit/s","guarantee":"1kbit/s"},"ingress":{}}"#
        );
        assert_eq!(serde_json::from_str::<PodPolicy>(&json).unwrap(), pod);
        let toml_text = toml::to_string(&pod).unwrap();
        assert_eq!(toml::from_str::<PodPolicy>(&toml_text).unwrap(), pod);
        let short: PodPolicy = toml::from_str("priority = 0\n[egress]\nlimit = \"600M\"").unwrap();
        assert_eq!(short.priority, Priority::High);
        assert_eq!(short.egress.limit, Some(rate(600_000_000)));
        assert!(toml::from_str::<PodPolicy>("priority = 3").is_err());
    }
}
