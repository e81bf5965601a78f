//! Label selectors: which labelled objects a selector picks.

use super::model::{LabelSelector, Labels, Requirement};

impl LabelSelector {
    /// Whether `labels` satisfy every `matchLabels` pair and every expression.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector picks everything (no pairs, no expressions).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl Requirement {
    /// Kubernetes' meaning: `NotIn` and `DoesNotExist` also hold where the key is absent. An
    /// operator validation would refuse matches nothing.
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator.as_str() {
            "In" => value.is_some_and(|v| self.values.contains(v)),
            "NotIn" => value.is_none_or(|v| !self.values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: &str, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn an_empty_selector_picks_everything() {
        assert!(LabelSelector::default().matches(&Labels::new()));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let s = LabelSelector {
            match_labels: labels(&[("app", "web"), ("tier", "front")]),
            ..Default::default()
        };
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn operators_as_kubernetes_defines_them() {
        let web = labels(&[("app", "web")]);
        let db = labels(&[("app", "db")]);
        let none = Labels::new();
        let cases = [
            (req("app", "In", &["web", "api"]), [true, false, false]),
            (req("app", "NotIn", &["web"]), [false, true, true]),
            (req("app", "Exists", &[]), [true, true, false]),
            (req("app", "DoesNotExist", &[]), [false, false, true]),
            (req("app", "Matches", &["web"]), [false, false, false]),
        ];
        for (r, want) in cases {
            let got = [r.matches(&web), r.matches(&db), r.matches(&none)];
            assert_eq!(got, want, "{r:?}");
        }
    }

    #[test]
    fn pairs_and_expressions_are_anded() {
        let s = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            match_expressions: vec![req("env", "NotIn", &["prod"])],
        };
        assert!(s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
    }
}
