//! Why a remote node gets no route, logged once per node and reason rather than on every
//! reconcile (a node that cannot be reached stays unreachable for a while, and the reconciler
//! runs every few seconds).

use std::collections::BTreeMap;

/// The notices of one reconcile run: (node, topic) -> message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Notices {
    current: BTreeMap<(String, &'static str), String>,
}

impl Notices {
    /// Notes that `node` cannot be served, for `topic` ("subnet", "backend"...), with `message`.
    pub fn note(&mut self, node: &str, topic: &'static str, message: String) {
        self.current.insert((node.to_string(), topic), message);
    }

    /// The messages of this run that the previous run did not have (new, or changed).
    pub fn fresh<'a>(&'a self, previous: &'a Notices) -> impl Iterator<Item = &'a str> + 'a {
        self.current
            .iter()
            .filter(|(k, msg)| previous.current.get(*k) != Some(*msg))
            .map(|(_, msg)| msg.as_str())
    }

    /// Forgets what was noted for `node`, whatever the topic.
    pub fn forget(&mut self, node: &str) {
        let keys: Vec<(String, &'static str)> = self
            .current
            .range((node.to_string(), "")..)
            .take_while(|((n, _), _)| n == node)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.current.remove(&k);
        }
    }

    /// Adds `other`'s notes (replacing those of the same node and topic).
    pub fn extend(&mut self, other: Notices) {
        self.current.extend(other.current);
    }

    /// Every message of this run.
    pub fn messages(&self) -> impl Iterator<Item = &str> {
        self.current.values().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_is_fresh_once_per_node_and_change() {
        let mut first = Notices::default();
        first.note("n2", "subnet", "n2 off subnet at 10.0.0.2".into());
        assert_eq!(first.fresh(&Notices::default()).count(), 1);

        let mut second = Notices::default();
        second.note("n2", "subnet", "n2 off subnet at 10.0.0.2".into());
        assert_eq!(second.fresh(&first).count(), 0, "same notice again: not logged");

        let mut third = Notices::default();
        third.note("n2", "subnet", "n2 off subnet at 10.0.0.3".into());
        third.note("n3", "subnet", "n3 off subnet".into());
        let fresh: Vec<_> = third.fresh(&second).collect();
        assert_eq!(fresh, ["n2 off subnet at 10.0.0.3", "n3 off subnet"]);

        // Gone, then back: logged again.
        let gone = Notices::default();
        assert_eq!(third.fresh(&gone).count(), 2);
    }
}
