//! What the stand-in saw: every request (the latest [`KEPT`] whole), exact counters, and the
//! TCP connections it accepted (a client retrying against a stopped server shows up as
//! connections, not requests, once it is back).

use std::collections::{BTreeMap, VecDeque};

/// How many requests [`Log`] keeps whole; the counters count them all.
const KEPT: usize = 10_000;

/// How a list was read, as the real server decides it from `resourceVersion` and `continue`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListKind {
    /// No `resourceVersion`: a quorum read of etcd, paginated by `limit` (the first page).
    Quorum,
    /// A later page, from a `continue` token.
    Continue,
    /// A `resourceVersion` given (`0`: any; `N`: not older than N): served from the watch cache
    /// in one page, `limit` ignored.
    Cache,
}

/// One request, as the stand-in answered it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    /// As RBAC names it (`get`, `list`, `watch`, `patch`, `create`, …); empty for a path that
    /// names no resource.
    pub verb: &'static str,
    /// The resource's plural (`nodes`); empty for a path that names none.
    pub resource: &'static str,
    pub list: Option<ListKind>,
    pub status: u16,
    pub user_agent: Option<String>,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
}

#[derive(Default)]
pub struct Log {
    recent: VecDeque<RecordedRequest>,
    total: u64,
    by_status: BTreeMap<(String, u16), u64>,
    lists: BTreeMap<ListKind, u64>,
    connections: u64,
}

impl Log {
    pub fn record(&mut self, r: RecordedRequest) {
        self.total += 1;
        *self.by_status.entry((r.method.clone(), r.status)).or_default() += 1;
        if let Some(kind) = r.list {
            *self.lists.entry(kind).or_default() += 1;
        }
        self.recent.push_back(r);
        if self.recent.len() > KEPT {
            self.recent.pop_front();
        }
    }

    pub fn connection(&mut self) {
        self.connections += 1;
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recent.iter().cloned().collect()
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn count(&self, method: &str, status: u16) -> u64 {
        self.by_status.get(&(method.to_string(), status)).copied().unwrap_or(0)
    }

    pub fn lists(&self, kind: ListKind) -> u64 {
        self.lists.get(&kind).copied().unwrap_or(0)
    }

    pub fn connections(&self) -> u64 {
        self.connections
    }
}
