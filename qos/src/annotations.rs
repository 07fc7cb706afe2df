//! A pod's QoS policy from its annotations.
//!
//! Parsing is all or nothing, and reports every problem at once: a pod whose annotations
//! half-parse would run with a policy nobody wrote, and fixing typos one per rollout is slow.

use std::collections::BTreeMap;
use std::fmt;

use crate::policy::{Direction, PodPolicy, Priority};
use crate::rate::{parse_bandwidth, Rate, RateError};

/// The egress limit, as the Kubernetes bandwidth plugin reads it.
pub const EGRESS_BANDWIDTH: &str = "kubernetes.io/egress-bandwidth";
/// The ingress limit, as the Kubernetes bandwidth plugin reads it.
pub const INGRESS_BANDWIDTH: &str = "kubernetes.io/ingress-bandwidth";
/// Volcano's online/offline marker.
pub const VOLCANO_QOS_LEVEL: &str = "volcano.sh/qos-level";
pub const PRIORITY: &str = "quicklane.io/priority";
pub const EGRESS_GUARANTEE: &str = "quicklane.io/egress-guarantee";
pub const INGRESS_GUARANTEE: &str = "quicklane.io/ingress-guarantee";

/// Every key under this prefix must be one of ours, so a typo is refused, not ignored.
pub const QUICKLANE_PREFIX: &str = "quicklane.io/";
pub const QUICKLANE_KEYS: [&str; 3] = [PRIORITY, EGRESS_GUARANTEE, INGRESS_GUARANTEE];

/// One annotation that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationProblem {
    #[error("{key}: {error}")]
    Bandwidth { key: &'static str, error: RateError },
    #[error(
        "{key}={value:?}: not allowed; use -1 or BE for offline, 0, 1, 2, LS, LC or HLS for online",
        key = VOLCANO_QOS_LEVEL
    )]
    QosLevel { value: String },
    #[error("{key}={value:?}: not allowed; use 0 or high, 1 or medium, 2 or low", key = PRIORITY)]
    Priority { value: String },
    #[error("unknown annotation {key:?}; the quicklane.io/ annotations are {known}", known = QUICKLANE_KEYS.join(", "))]
    UnknownKey { key: String },
    #[error(
        "{p}={priority:?} conflicts with {q}={qos_level:?}: offline pods have no priority; drop one of them",
        p = PRIORITY,
        q = VOLCANO_QOS_LEVEL
    )]
    PriorityOnOffline { priority: String, qos_level: String },
    #[error(
        "{guarantee_key}={guarantee:?} exceeds {limit_key}={limit:?}; a guarantee must not exceed the limit"
    )]
    GuaranteeAboveLimit {
        guarantee_key: &'static str,
        guarantee: String,
        limit_key: &'static str,
        limit: String,
    },
}

/// Every problem in a pod's annotations: per-key ones in key order, then conflicts between
/// keys. Displayed joined with "; ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AnnotationError {
    problems: Vec<AnnotationProblem>,
}

impl AnnotationError {
    pub fn problems(&self) -> &[AnnotationProblem] {
        &self.problems
    }
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Reads a pod's QoS policy from its annotations:
///
/// - `kubernetes.io/egress-bandwidth`, `kubernetes.io/ingress-bandwidth`: limits, as
///   Kubernetes quantities in bits per second ([`parse_bandwidth`]).
/// - `volcano.sh/qos-level`: "-1" or "BE" makes the pod offline; "0", "1", "2", "LS", "LC"
///   and "HLS" keep it online and leave its priority alone.
/// - `quicklane.io/priority`: 0/high, 1/medium (the default) or 2/low; refused on an
///   offline pod.
/// - `quicklane.io/egress-guarantee`, `quicklane.io/ingress-guarantee`: guarantees, as
///   quantities; each must not exceed its limit.
///
/// Whether `key` is one the QoS policy reads (or refuses): a pod carrying any of them takes
/// part in QoS.
pub fn is_qos_key(key: &str) -> bool {
    key == EGRESS_BANDWIDTH
        || key == INGRESS_BANDWIDTH
        || key == VOLCANO_QOS_LEVEL
        || key.starts_with(QUICKLANE_PREFIX)
}

/// Any other `quicklane.io/` key is refused; all other keys are ignored.
pub fn pod_policy_from_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<PodPolicy, AnnotationError> {
    const BANDWIDTH_KEYS: [&str; 4] = [
        EGRESS_BANDWIDTH,
        INGRESS_BANDWIDTH,
        EGRESS_GUARANTEE,
        INGRESS_GUARANTEE,
    ];
    let mut problems = Vec::new();
    let mut settings: BTreeMap<&'static str, (Rate, &str)> = BTreeMap::new();
    let mut priority = None;
    let mut offline_level = None;
    // Visiting in key order keeps the problems in key order.
    for (key, value) in annotations {
        if let Some(&key) = BANDWIDTH_KEYS.iter().find(|&&known| known == key) {
            match parse_bandwidth(value) {
                Ok(rate) => {
                    settings.insert(key, (rate, value.as_str()));
                }
                Err(error) => problems.push(AnnotationProblem::Bandwidth { key, error }),
            }
            continue;
        }
        match key.as_str() {
            VOLCANO_QOS_LEVEL => match value.as_str() {
                "-1" | "BE" => offline_level = Some(value.as_str()),
                "0" | "1" | "2" | "LS" | "LC" | "HLS" => {}
                _ => problems.push(AnnotationProblem::QosLevel {
                    value: value.clone(),
                }),
            },
            PRIORITY => match value.parse::<Priority>() {
                Ok(p) => priority = Some((p, value.as_str())),
                Err(_) => problems.push(AnnotationProblem::Priority {
                    value: value.clone(),
                }),
            },
            k if k.starts_with(QUICKLANE_PREFIX) => {
                problems.push(AnnotationProblem::UnknownKey { key: key.clone() });
            }
            _ => {}
        }
    }

    if let (Some((_, p)), Some(q)) = (priority, offline_level) {
        problems.push(AnnotationProblem::PriorityOnOffline {
            priority: p.to_owned(),
            qos_level: q.to_owned(),
        });
    }
    let mut policy = PodPolicy::default();
    for (direction, limit_key, guarantee_key) in [
        (Direction::Egress, EGRESS_BANDWIDTH, EGRESS_GUARANTEE),
        (Direction::Ingress, INGRESS_BANDWIDTH, INGRESS_GUARANTEE),
    ] {
        let limit = settings.get(limit_key);
        let guarantee = settings.get(guarantee_key);
        if let (Some(&(limit, limit_text)), Some(&(guarantee, guarantee_text))) = (limit, guarantee)
        {
            if guarantee > limit {
                problems.push(AnnotationProblem::GuaranteeAboveLimit {
                    guarantee_key,
                    guarantee: guarantee_text.to_owned(),
                    limit_key,
                    limit: limit_text.to_owned(),
                });
            }
        }
        let dir = match direction {
            Direction::Egress => &mut policy.egress,
            Direction::Ingress => &mut policy.ingress,
        };
        dir.limit = limit.map(|&(rate, _)| rate);
        dir.guarantee = guarantee.map(|&(rate, _)| rate);
    }
    if !problems.is_empty() {
        return Err(AnnotationError { problems });
    }
    policy.offline = offline_level.is_some();
    if let Some((p, _)) = priority {
        policy.priority = p;
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DirectionPolicy;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn parse(pairs: &[(&str, &str)]) -> Result<PodPolicy, AnnotationError> {
        pod_policy_from_annotations(&annotations(pairs))
    }

    fn rate(bits: u64) -> Rate {
        Rate::from_bits_per_sec(bits)
    }

    #[test]
    fn no_annotations_is_the_default_policy() {
        let policy = parse(&[("app", "web"), ("kubernetes.io/psp", "x")]).unwrap();
        assert!(policy.is_unlimited());
    }

    #[test]
    fn reads_every_key() {
        let policy = parse(&[
            (EGRESS_BANDWIDTH, "600M"),
            (INGRESS_BANDWIDTH, "1Gi"),
            (EGRESS_GUARANTEE, "200M"),
            (INGRESS_GUARANTEE, "1e6"),
            (PRIORITY, "high"),
            (VOLCANO_QOS_LEVEL, "LS"),
        ])
        .unwrap();
        assert_eq!(
            policy,
            PodPolicy {
                priority: Priority::High,
                offline: false,
                egress: DirectionPolicy {
                    limit: Some(rate(600_000_000)),
                    guarantee: Some(rate(200_000_000))
                },
                ingress: DirectionPolicy {
                    limit: Some(rate(1 << 30)),
                    guarantee: Some(rate(1_000_000))
                },
            }
        );
    }

    #[test]
    fn volcano_levels() {
        for offline in ["-1", "BE"] {
            assert!(parse(&[(VOLCANO_QOS_LEVEL, offline)]).unwrap().offline);
        }
        for online in ["0", "1", "2", "LS", "LC", "HLS"] {
            let policy = parse(&[(VOLCANO_QOS_LEVEL, online)]).unwrap();
            assert_eq!(policy, PodPolicy::default(), "{online}");
        }
        let e = parse(&[(VOLCANO_QOS_LEVEL, "be")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "volcano.sh/qos-level=\"be\": not allowed; use -1 or BE for offline, 0, 1, 2, LS, LC \
             or HLS for online"
        );
        let offline = parse(&[(VOLCANO_QOS_LEVEL, "BE"), (EGRESS_BANDWIDTH, "1G")]).unwrap();
        assert_eq!(offline.egress.limit, Some(rate(1_000_000_000)));
    }

    #[test]
    fn refuses_unknown_quicklane_keys_naming_the_known_ones() {
        let e = parse(&[("quicklane.io/priorty", "high")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown annotation \"quicklane.io/priorty\"; the quicklane.io/ annotations are \
             quicklane.io/priority, quicklane.io/egress-guarantee, quicklane.io/ingress-guarantee"
        );
        assert!(parse(&[("other.quicklane.io/x", "1")]).is_ok());
    }

    #[test]
    fn offline_pods_have_no_priority() {
        let e = parse(&[(PRIORITY, "0"), (VOLCANO_QOS_LEVEL, "-1")]).unwrap_err();
        assert_eq!(
            e.problems(),
            [AnnotationProblem::PriorityOnOffline {
                priority: "0".to_owned(),
                qos_level: "-1".to_owned()
            }]
        );
        assert!(e.to_string().contains("offline pods have no priority"));
    }

    #[test]
    fn guarantee_above_limit_names_both_annotations() {
        let e = parse(&[(EGRESS_BANDWIDTH, "500M"), (EGRESS_GUARANTEE, "0.6G")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "quicklane.io/egress-guarantee=\"0.6G\" exceeds kubernetes.io/egress-bandwidth=\
             \"500M\"; a guarantee must not exceed the limit"
        );
        // Without a limit, any guarantee is fine.
        let policy = parse(&[(INGRESS_GUARANTEE, "10G")]).unwrap();
        assert_eq!(policy.ingress.guarantee, Some(rate(10_000_000_000)));
    }

    #[test]
    fn collects_every_problem_in_key_order() {
        let e = parse(&[
            (EGRESS_BANDWIDTH, "10Mbps"),
            (INGRESS_BANDWIDTH, "100M"),
            (PRIORITY, "urgent"),
            (VOLCANO_QOS_LEVEL, "offline"),
            ("quicklane.io/weight", "3"),
            (INGRESS_GUARANTEE, "200M"),
        ])
        .unwrap_err();
        assert_eq!(e.problems().len(), 5, "{e}");
        assert_eq!(
            e.to_string(),
            "kubernetes.io/egress-bandwidth: \"10Mbps\": unknown suffix \"bps\"; use a Kubernetes \
             quantity like 10M, 1.5G or 500Mi (bits per second); \
             quicklane.io/priority=\"urgent\": not allowed; use 0 or high, 1 or medium, 2 or low; \
             unknown annotation \"quicklane.io/weight\"; the quicklane.io/ annotations are \
             quicklane.io/priority, quicklane.io/egress-guarantee, quicklane.io/ingress-guarantee; \
             volcano.sh/qos-level=\"offline\": not allowed; use -1 or BE for offline, 0, 1, 2, LS, \
             LC or HLS for online; \
             quicklane.io/ingress-guarantee=\"200M\" exceeds kubernetes.io/ingress-bandwidth=\
             \"100M\"; a guarantee must not exceed the limit"
        );
    }

    #[test]
    fn bad_bandwidths_name_key_and_value() {
        for (key, value, needle) in [
            (EGRESS_BANDWIDTH, "10K", "kilo is a lowercase k"),
            (INGRESS_BANDWIDTH, "0", "zero"),
            (EGRESS_GUARANTEE, "-5M", "negative"),
            (INGRESS_GUARANTEE, "20T", "too large"),
            (EGRESS_BANDWIDTH, "", "empty"),
        ] {
            let e = parse(&[(key, value)]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{key}: ")), "{e}");
            assert!(e.contains(&format!("{value:?}")) || value.is_empty(), "{e}");
            assert!(e.contains(needle), "{e}");
        }
    }
}
