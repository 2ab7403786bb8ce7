//! Label selectors (`metav1.LabelSelector`) as the API reference defines them: `matchLabels` and
//! every `matchExpressions` requirement must hold (AND); an empty selector matches everything.
//!
//! A selector the API server would have refused (an unknown operator, `In` without values,
//! `Exists` with values) is not guessed at: [`Selector::parse`] says why, and the policy that
//! holds it is left out whole (see `model`), as a controller must not widen or narrow what an
//! operator wrote.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::{BTreeMap, BTreeSet};

pub type Labels = BTreeMap<String, String>;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    /// The label is set to one of these (`matchLabels` entries are `In` with one value).
    In(String, BTreeSet<String>),
    /// The label is unset, or set to none of these.
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed selector: all requirements must hold. Canonical (sorted, deduplicated), so two
/// selectors that mean the same compare equal and can share one address set.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector(pub BTreeSet<Requirement>);

impl Selector {
    /// Matches everything (`{}`).
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn parse(s: &LabelSelector) -> Result<Selector, String> {
        let mut reqs = BTreeSet::new();
        for (k, v) in s.match_labels.iter().flatten() {
            reqs.insert(Requirement::In(k.clone(), [v.clone()].into()));
        }
        for e in s.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let key = e.key.clone();
            let r = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!("matchExpressions: {} {} needs values", key, e.operator));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!("matchExpressions: {} {} takes no values", key, e.operator));
                }
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => return Err(format!("matchExpressions: unknown operator {other:?} on {key}")),
            };
            reqs.insert(r);
        }
        Ok(Selector(reqs))
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    pub fn is_everything(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for Selector {
    /// As `kubectl` prints selectors: `app=web,tier in (a,b),!legacy`; `{}` for everything.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("{}");
        }
        let join = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Requirement::In(k, vs) if vs.len() == 1 => format!("{k}={}", join(vs)),
                Requirement::In(k, vs) => format!("{k} in ({})", join(vs)),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", join(vs)),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn sel(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::parse(&LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        })
        .unwrap()
    }

    #[test]
    fn empty_matches_everything_and_requirements_are_anded() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        assert!(sel(&[], vec![]).matches(&none));
        let s = sel(&[("app", "web")], vec![expr("tier", "In", Some(&["front", "back"]))]);
        assert!(s.matches(&web) && !s.matches(&db) && !s.matches(&none));
        assert_eq!(s.to_string(), "app=web,tier in (back,front)");
    }

    #[test]
    fn operators_as_the_api_reference_defines_them() {
        let (web, db, none) = (labels(&[("app", "web")]), labels(&[("app", "db")]), labels(&[]));
        let not_in = sel(&[], vec![expr("app", "NotIn", Some(&["web"]))]);
        // NotIn also matches where the label is absent.
        assert!(!not_in.matches(&web) && not_in.matches(&db) && not_in.matches(&none));
        let exists = sel(&[], vec![expr("app", "Exists", None)]);
        assert!(exists.matches(&web) && exists.matches(&db) && !exists.matches(&none));
        let absent = sel(&[], vec![expr("app", "DoesNotExist", Some(&[]))]);
        assert!(!absent.matches(&web) && absent.matches(&none));
        assert_eq!(absent.to_string(), "!app");
    }

    #[test]
    fn selectors_the_api_server_refuses_are_errors_not_guesses() {
        for e in [
            expr("app", "In", None),
            expr("app", "NotIn", Some(&[])),
            expr("app", "Exists", Some(&["x"])),
            expr("app", "Matches", Some(&["x"])),
        ] {
            let s = LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![e.clone()]),
            };
            assert!(Selector::parse(&s).is_err(), "{e:?}");
        }
    }

    #[test]
    fn equal_meaning_equal_selector() {
        let a = sel(&[("app", "web")], vec![]);
        let b = sel(&[], vec![expr("app", "In", Some(&["web"]))]);
        assert_eq!(a, b, "one shared address set for both");
    }
}
