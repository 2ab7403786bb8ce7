//! What etcd and the watch cache hold for the real API server: the objects, one resource version
//! counter for all of them (etcd's revision), a bounded history of change events for watches to
//! replay, the open watches, and the snapshots paginated lists continue from.
//!
//! Everything here is synchronous and runs under one lock, so an event reaches every watch in
//! the order of the resource versions, and a watch that starts replays exactly the events after
//! its resource version and then receives the live ones, with no gap and no duplicate.

use super::status::ApiError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hyper::body::Bytes;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use tokio::sync::mpsc;

/// A kind of object the stand-in serves. Namespaced objects are keyed `namespace/name` here
/// (the order the real server lists them in); cluster-scoped ones by name.
pub struct Resource {
    pub plural: &'static str,
    pub kind: &'static str,
    /// `v1`, `networking.k8s.io/v1`.
    pub api_version: &'static str,
    pub namespaced: bool,
}

pub const NODES: Resource = Resource {
    plural: "nodes",
    kind: "Node",
    api_version: "v1",
    namespaced: false,
};

pub const NAMESPACES: Resource = Resource {
    plural: "namespaces",
    kind: "Namespace",
    api_version: "v1",
    namespaced: false,
};

pub const PODS: Resource = Resource {
    plural: "pods",
    kind: "Pod",
    api_version: "v1",
    namespaced: true,
};

pub const NETWORK_POLICIES: Resource = Resource {
    plural: "networkpolicies",
    kind: "NetworkPolicy",
    api_version: "networking.k8s.io/v1",
    namespaced: true,
};

/// Every resource the stand-in serves.
pub const RESOURCES: &[&Resource] = &[&NODES, &NAMESPACES, &PODS, &NETWORK_POLICIES];

impl Resource {
    /// The store's key of `obj`: `namespace/name` or `name`.
    pub fn key_of(&self, obj: &Value) -> String {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        match (self.namespaced, obj["metadata"]["namespace"].as_str()) {
            (true, Some(ns)) => format!("{ns}/{name}"),
            _ => name.to_string(),
        }
    }
}

/// How many paginated-list snapshots stay available for `continue` tokens.
const SNAPSHOTS: usize = 16;

/// One change, serialized once as the watch line every watcher gets.
struct Change {
    resource: &'static str,
    name: String,
    rv: u64,
    line: Bytes,
}

struct Watcher {
    resource: &'static str,
    /// `fieldSelector=metadata.name=NAME`.
    name: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
    /// The resource version it has seen everything up to (for the `Expired` message).
    last_rv: u64,
}

/// The objects of one resource at one resource version, for the pages after the first.
struct Snapshot {
    resource: &'static str,
    rv: u64,
    objects: Arc<Vec<Value>>,
}

/// Where a list reads from.
pub enum Read {
    /// No `resourceVersion`: the current state (a quorum read of etcd), paginated by `limit`.
    Quorum,
    /// A `continue` token from an earlier page: the same snapshot, after its last name.
    Continue(String),
    /// `resourceVersion=N`: the watch cache, at least as new as N (0: anything), in one page.
    Cache(u64),
}

/// One page of a list.
pub struct Page {
    pub items: Vec<Value>,
    pub rv: u64,
    pub cont: Option<String>,
    /// `metadata.remainingItemCount`: given with `cont` when no selector filtered the items.
    pub remaining: Option<usize>,
}

/// How a watch begins: the lines to send first, then what arrives on `rx`, in order.
pub struct WatchStart {
    pub id: u64,
    pub first: Vec<Bytes>,
    pub rx: mpsc::UnboundedReceiver<Bytes>,
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    history: VecDeque<Change>,
    history_len: usize,
    /// Watches and lists from a resource version below this get 410 Expired.
    compacted: u64,
    watchers: BTreeMap<u64, Watcher>,
    next_watch: u64,
    snapshots: VecDeque<Snapshot>,
}

impl Store {
    pub fn new(history_len: usize) -> Store {
        Store {
            // A fresh cluster's revision is well above 1 already; starting higher than the
            // objects' count catches clients that confuse the two.
            rv: 100,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_len,
            compacted: 0,
            watchers: BTreeMap::new(),
            next_watch: 0,
            snapshots: VecDeque::new(),
        }
    }

    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, res: &Resource, name: &str) -> Option<&Value> {
        self.objects.get(res.plural)?.get(name)
    }

    pub fn all(&self, res: &Resource) -> Vec<Value> {
        self.objects
            .get(res.plural)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Stores a new object named by its `metadata.name`, with the fields the server sets.
    pub fn create(&mut self, res: &'static Resource, mut obj: Value) -> Result<Value, ApiError> {
        if res.namespaced && obj["metadata"]["namespace"].as_str().is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(format!(
                "a {} needs metadata.namespace",
                res.kind
            )));
        }
        let name = res.key_of(&obj);
        if self.get(res, &name).is_some() {
            return Err(ApiError::already_exists(res.plural, &name));
        }
        self.rv += 1;
        obj["apiVersion"] = json!(res.api_version);
        obj["kind"] = json!(res.kind);
        let meta = &mut obj["metadata"];
        meta["uid"] = json!(random_uid());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["resourceVersion"] = json!(self.rv.to_string());
        self.objects.entry(res.plural).or_default().insert(name, obj.clone());
        self.emit(res, "ADDED", &obj);
        Ok(obj)
    }

    /// Replaces an object; identity fields (name, uid, creation time, kind) cannot change. Bumps
    /// the resource version and sends MODIFIED only when something did change, as the real
    /// server does.
    pub fn replace(&mut self, res: &'static Resource, name: &str, mut obj: Value) -> Result<Value, ApiError> {
        let old = self
            .get(res, name)
            .ok_or_else(|| ApiError::not_found(res.plural, name))?;
        for field in ["apiVersion", "kind"] {
            obj[field] = old[field].clone();
        }
        for field in ["name", "namespace", "uid", "creationTimestamp", "resourceVersion"] {
            obj["metadata"][field] = old["metadata"][field].clone();
        }
        if obj == *old {
            return Ok(obj);
        }
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects
            .entry(res.plural)
            .or_default()
            .insert(name.to_string(), obj.clone());
        self.emit(res, "MODIFIED", &obj);
        Ok(obj)
    }

    /// Applies a JSON merge patch (RFC 7386). A `metadata.resourceVersion` in the patch is a
    /// precondition: a stale one is a 409 Conflict.
    pub fn patch(&mut self, res: &'static Resource, name: &str, patch: &Value) -> Result<Value, ApiError> {
        let mut obj = self
            .get(res, name)
            .ok_or_else(|| ApiError::not_found(res.plural, name))?
            .clone();
        if let Some(want) = patch["metadata"].get("resourceVersion").and_then(Value::as_str) {
            if obj["metadata"]["resourceVersion"] != want {
                return Err(ApiError::conflict(res.plural, name));
            }
        }
        merge_patch(&mut obj, patch);
        self.replace(res, name, obj)
    }

    /// Removes an object; the DELETED event carries it at the deletion's resource version.
    pub fn delete(&mut self, res: &'static Resource, name: &str) -> Result<Value, ApiError> {
        let mut obj = self
            .objects
            .get_mut(res.plural)
            .and_then(|m| m.remove(name))
            .ok_or_else(|| ApiError::not_found(res.plural, name))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(res, "DELETED", &obj);
        Ok(obj)
    }

    fn emit(&mut self, res: &'static Resource, kind: &str, obj: &Value) {
        // Watches by name (`fieldSelector=metadata.name=`) match the name, not the key.
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let line = watch_line(kind, obj);
        let rv = self.rv;
        self.watchers.retain(|_, w| {
            if w.resource != res.plural || w.name.as_ref().is_some_and(|n| *n != name) {
                return !w.tx.is_closed();
            }
            w.last_rv = rv;
            w.tx.send(line.clone()).is_ok()
        });
        self.history.push_back(Change {
            resource: res.plural,
            name,
            rv,
            line,
        });
        while self.history.len() > self.history_len {
            if let Some(gone) = self.history.pop_front() {
                self.compacted = gone.rv;
            }
        }
    }

    /// Lists `res`, filtered by name when `name` is given; `limit` 0 means no limit.
    pub fn list(
        &mut self,
        res: &'static Resource,
        read: Read,
        limit: usize,
        name: Option<&str>,
    ) -> Result<Page, ApiError> {
        let (objects, rv, start, limit) = match read {
            Read::Quorum => (Arc::new(self.all(res)), self.rv, String::new(), limit),
            Read::Continue(token) => {
                let (rv, start) = decode_continue(&token)?;
                let snap = self
                    .snapshots
                    .iter()
                    .find(|s| s.resource == res.plural && s.rv == rv && rv >= self.compacted)
                    .ok_or_else(ApiError::continue_expired)?;
                (snap.objects.clone(), rv, start, limit)
            }
            Read::Cache(min) => {
                self.check_rv(min)?;
                (Arc::new(self.all(res)), self.rv, String::new(), 0)
            }
        };
        let mut matching = objects
            .iter()
            .filter(|o| res.key_of(o).as_str() >= start.as_str())
            .filter(|o| name.is_none_or(|n| o["metadata"]["name"] == n));
        let items: Vec<Value> = match limit {
            0 => matching.by_ref().cloned().collect(),
            n => matching.by_ref().take(n).cloned().collect(),
        };
        let left = matching.count();
        if left == 0 {
            return Ok(Page {
                items,
                rv,
                cont: None,
                remaining: None,
            });
        }
        if !self.snapshots.iter().any(|s| s.resource == res.plural && s.rv == rv) {
            self.snapshots.push_back(Snapshot {
                resource: res.plural,
                rv,
                objects,
            });
            if self.snapshots.len() > SNAPSHOTS {
                self.snapshots.pop_front();
            }
        }
        let last = items.last().map(|o| res.key_of(o)).unwrap_or_default();
        Ok(Page {
            cont: Some(encode_continue(rv, &last)),
            rv,
            remaining: name.is_none().then_some(left),
            items,
        })
    }

    /// A list or watch from resource version `rv` can be served: not compacted, not in the future.
    fn check_rv(&self, rv: u64) -> Result<(), ApiError> {
        if rv > self.rv {
            return Err(ApiError::too_large(rv, self.rv));
        }
        if rv != 0 && rv < self.compacted {
            return Err(ApiError::too_old(rv, self.compacted));
        }
        Ok(())
    }

    /// Opens a watch of `res` (of the one object `name`, when given). From a resource version:
    /// the retained events after it, then live ones. From 0 (none given): an ADDED event per
    /// current object, then live ones. A compacted resource version is a 410 [`ApiError`], which
    /// the real server sends as the stream's only event.
    pub fn watch(&mut self, res: &'static Resource, from: u64, name: Option<&str>) -> Result<WatchStart, ApiError> {
        self.check_rv(from)?;
        let wanted = |n: &str| name.is_none_or(|want| want == n);
        let first = if from == 0 {
            let objects = self.objects.get(res.plural).into_iter().flat_map(|m| m.iter());
            objects
                .filter(|(n, _)| wanted(n))
                .map(|(_, o)| watch_line("ADDED", o))
                .collect()
        } else {
            let changes = self.history.iter().filter(|c| c.rv > from && c.resource == res.plural);
            changes.filter(|c| wanted(&c.name)).map(|c| c.line.clone()).collect()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_watch;
        self.next_watch += 1;
        let watcher = Watcher {
            resource: res.plural,
            name: name.map(str::to_string),
            tx,
            last_rv: self.rv,
        };
        self.watchers.insert(id, watcher);
        Ok(WatchStart { id, first, rx })
    }

    /// Queues a BOOKMARK at the current resource version on watch `id`, after the events
    /// already queued there (so it never claims a version whose events are still to come).
    pub fn bookmark(&self, id: u64, res: &Resource) {
        if let Some(w) = self.watchers.get(&id) {
            let obj = json!({"kind": res.kind, "apiVersion": res.api_version, "metadata": {"resourceVersion": self.rv.to_string()}});
            let _ = w.tx.send(watch_line("BOOKMARK", &obj));
        }
    }

    /// Watches still open (whose client has not gone away).
    pub fn open_watches(&self) -> usize {
        self.watchers.values().filter(|w| !w.tx.is_closed()).count()
    }

    /// Ends every open watch, without an event (as a server going away does).
    pub fn end_watches(&mut self) {
        self.watchers.clear();
    }

    /// The cluster moves on and etcd compacts: the revision is bumped (as writes to other
    /// objects do in a real cluster) and every resource version given out so far becomes too
    /// old. Open watches get an ERROR 410 event and end; a new list gives a version that can
    /// be watched from.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        self.history.clear();
        self.snapshots.clear();
        for (_, w) in std::mem::take(&mut self.watchers) {
            let _ = w.tx.send(watch_line(
                "ERROR",
                &ApiError::too_old(w.last_rv, self.compacted).status(),
            ));
        }
    }
}

/// RFC 7386: objects merge key by key, `null` deletes a key, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(target) = target else {
        unreachable!("made an object above")
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// One watch event and its newline, `type` first as the real server writes it (a `json!` map
/// would sort the keys).
pub fn watch_line(kind: &str, obj: &Value) -> Bytes {
    Bytes::from(format!("{{\"type\":\"{kind}\",\"object\":{obj}}}\n"))
}

/// The real server's token: base64url of `{"v":"meta.k8s.io/v1","rv":N,"start":"LAST\u0000"}`.
fn encode_continue(rv: u64, last: &str) -> String {
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{last}\u{0}")});
    URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let invalid = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|e| invalid(&e.to_string()))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(&e.to_string()))?;
    match (v["v"].as_str(), v["rv"].as_u64(), v["start"].as_str()) {
        (Some("meta.k8s.io/v1"), Some(rv), Some(start)) => Ok((rv, start.to_string())),
        _ => Err(invalid("unexpected content")),
    }
}

fn random_uid() -> String {
    let mut b = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .expect("random bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Now, to the second, as Kubernetes writes timestamps (`2026-01-02T03:04:05Z`).
fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .expect("a valid time")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::merge_patch;
    use serde_json::json;

    /// The examples of RFC 7386, appendix A.
    #[test]
    fn merge_patch_follows_rfc_7386() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": "b", "b": "c"}), json!({"a": null}), json!({"b": "c"})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (json!({"a": [{"b": "c"}]}), json!({"a": [1]}), json!({"a": [1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!([1, 2]), json!({"a": "b", "c": null}), json!({"a": "b"})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
        ];
        for (target, patch, want) in cases {
            let mut got = target.clone();
            merge_patch(&mut got, &patch);
            assert_eq!(got, want, "{target} patched with {patch}");
        }
    }
}
