//! A stand-in Kubernetes API server, for testing `trellisd --datastore kube` (and its real
//! `kube::Client`) where no kube-apiserver can run. It is not a cluster and says so: its CA is
//! "trellis stand-in kube-apiserver CA (not a cluster)", its token starts with `trellis-standin-`.
//!
//! It speaks the real wire protocol for what Trellis uses — v1 Nodes, and for NetworkPolicy
//! (issue 14) Namespaces, Pods (`/api/v1/pods`, `/api/v1/namespaces/NS/pods/NAME`) and
//! `networking.k8s.io/v1` NetworkPolicies — so a client cannot tell it apart on those calls:
//! - HTTPS (HTTP/1.1, ALPN `http/1.1`) with a CA generated per server; bearer-token
//!   authentication (401 and a `Status` body without the right token);
//! - `GET /api/v1/nodes/NAME`; `PATCH` of it with a JSON merge patch (a strategic merge patch is
//!   taken as one: maps merge, lists are replaced whole);
//! - lists with `limit` and `continue` (consistent pages from a snapshot) for quorum reads (no
//!   `resourceVersion`), and in one page from the "watch cache" when one is given (`0`: any),
//!   as the real server decides;
//! - watches: chunked JSON lines, replay from a retained resource version, BOOKMARKs,
//!   `timeoutSeconds`, and the `ERROR` 410 `Expired` event for a compacted resource version;
//! - one resource version counter for all objects (etcd's revision), bumped only by changes.
//!
//! And what a test needs to break it on purpose: [`Fault`]s (403 from RBAC, 5xx), compaction
//! ([`ApiServer::expire_watches`]), a killed and restarted server ([`ApiServer::stop`],
//! [`ApiServer::restart`]), and what the client sent ([`ApiServer::requests`] and counters).
//!
//! What it does NOT do (a test that needs one of these needs a real cluster): other resources,
//! lists and watches within one namespace (namespaced resources are listed and watched across
//! all namespaces only; `/api/v1/namespaces/NS/pods` is a 404), create
//! / update / delete over HTTP (tests change objects with the methods here), server-side apply
//! and JSON patch (415), strategic merge patch's list merging and directives, label selectors
//! and field selectors other than `metadata.name` (refused with 400, never silently ignored),
//! `resourceVersionMatch=Exact`, watching one object by its path (`nodes/NAME?watch=true`;
//! the field selector is served), exact-version pagination of a `resourceVersion=N` list (it
//! is served whole from the current state), streaming lists (`sendInitialEvents`), dry runs,
//! discovery (`/api`, `/apis`, `/version`), health endpoints, protobuf, HTTP/2, authorization
//! beyond the all-or-nothing [`Fault::Forbidden`], admission and validation, finalizers, and
//! the 3 s wait before answering "too large resource version".
//!
//! The server runs on its own tokio runtime; every method here is synchronous and may be called
//! from plain `#[test]` functions and from inside another runtime alike. Dropping the
//! [`ApiServer`] closes its listener and connections and shuts its runtime down.

mod http;
mod log;
mod server;
mod status;
mod store;
pub(crate) mod tls;

pub use log::{ListKind, RecordedRequest};
pub use status::SERVICE_ACCOUNT_USER;
pub use tls::unrelated_ca_pem;

use crate::Netns;
use serde_json::{json, Value};
use server::Running;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use store::Store;
pub use store::{Resource, NAMESPACES, NETWORK_POLICIES, NODES, PODS};
use tokio::runtime::Runtime;
use tokio_rustls::TlsAcceptor;

/// A failure every request gets (after authentication) until it is set back to `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// 403 `Forbidden`, as RBAC answers a service account without the role.
    Forbidden,
    /// This code (500, 503, 429…) with a `Status` body.
    Status(u16),
}

#[derive(Clone, Debug)]
pub struct Options {
    /// How often a watch that allows bookmarks gets one (the real server: about a minute).
    pub bookmark_interval: Duration,
    /// How many change events watches can replay; a watch from before them gets 410 Expired
    /// (the real watch cache keeps a few minutes' worth).
    pub history: usize,
    /// Print a line per request on stderr.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            bookmark_interval: Duration::from_secs(1),
            history: 1000,
            verbose: false,
        }
    }
}

/// What the runtime's tasks share with the test-side methods.
struct Shared {
    store: Mutex<Store>,
    log: Mutex<log::Log>,
    fault: Mutex<Fault>,
    token: String,
    options: Options,
}

/// A lock that a panicking test closure does not poison for everyone after it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn log(&self) -> MutexGuard<'_, log::Log> {
        lock(&self.log)
    }

    fn fault(&self) -> MutexGuard<'_, Fault> {
        lock(&self.fault)
    }
}

/// A running stand-in API server; see the [module documentation](self).
pub struct ApiServer {
    shared: Arc<Shared>,
    ca_pem: String,
    tls: TlsAcceptor,
    addr: SocketAddr,
    netns: Option<PathBuf>,
    running: Mutex<Option<Running>>,
    rt: Option<Runtime>,
}

impl ApiServer {
    /// Starts serving on `addr` (port 0: one the kernel picks, see [`ApiServer::addr`]), inside
    /// `netns` when given, with the default [`Options`]. Panics if it cannot.
    pub fn start(netns: Option<&Netns>, addr: SocketAddr) -> ApiServer {
        ApiServer::start_with(netns, addr, Options::default())
    }

    pub fn start_with(netns: Option<&Netns>, addr: SocketAddr, options: Options) -> ApiServer {
        let pki = tls::generate(addr.ip());
        let mut random = [0u8; 24];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut random)
            .expect("random bytes");
        let token = format!(
            "trellis-standin-{}",
            random.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-standin")
            .enable_all()
            .build()
            .expect("a tokio runtime for the stand-in API server");
        let netns = netns.map(|n| n.path().to_path_buf());
        let listener = server::bind(netns.as_deref(), addr)
            .unwrap_or_else(|e| panic!("stand-in API server: binding {addr} (netns {netns:?}): {e}"));
        let addr = listener.local_addr().expect("the listener's address");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(options.history)),
            log: Mutex::default(),
            fault: Mutex::new(Fault::None),
            token,
            options,
        });
        let tls = TlsAcceptor::from(pki.server_config);
        let running = Running::spawn(&rt, shared.clone(), listener, tls.clone()).expect("serve the listener");
        ApiServer {
            shared,
            ca_pem: pki.ca_pem,
            tls,
            addr,
            netns,
            running: Mutex::new(Some(running)),
            rt: Some(rt),
        }
    }

    /// The address it listens on (with the actual port when started with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The CA that signed its serving certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes a kubeconfig for this server (its URL, its CA, its token).
    pub fn write_kubeconfig(&self, path: &Path) {
        self.write_kubeconfig_with_ca(path, &self.ca_pem);
    }

    /// Writes a kubeconfig for this server that trusts `ca_pem` instead of its CA (for example
    /// [`unrelated_ca_pem`], to see a client refuse the server).
    pub fn write_kubeconfig_with_ca(&self, path: &Path, ca_pem: &str) {
        write(path, &tls::kubeconfig(&self.url(), ca_pem, &self.shared.token));
    }

    /// Writes `token`, `ca.crt` and `namespace` (`kube-system`) into `dir`, as a pod's service
    /// account mount (`/var/run/secrets/kubernetes.io/serviceaccount`) has them.
    pub fn write_incluster_files(&self, dir: &Path) {
        write(&dir.join("token"), &self.shared.token);
        write(&dir.join("ca.crt"), &self.ca_pem);
        write(&dir.join("namespace"), "kube-system");
    }

    /// Stops listening and drops every open connection at once, as a killed kube-apiserver
    /// does (clients see connections reset, then refused); the objects are kept.
    pub fn stop(&self) {
        if let Some(running) = lock(&self.running).take() {
            running.stop();
        }
    }

    /// Listens again after [`ApiServer::stop`]: same address (and namespace), CA, token and
    /// objects. Panics if it is running or cannot bind.
    pub fn restart(&self) {
        let mut running = lock(&self.running);
        assert!(running.is_none(), "the stand-in API server is running; stop() it first");
        let listener = server::bind(self.netns.as_deref(), self.addr)
            .unwrap_or_else(|e| panic!("stand-in API server: binding {} again: {e}", self.addr));
        let rt = self.rt.as_ref().expect("the runtime lives until drop");
        *running =
            Some(Running::spawn(rt, self.shared.clone(), listener, self.tls.clone()).expect("serve the listener"));
    }

    /// Every request fails with `fault` from now on (`Fault::None`: none does). Setting a fault
    /// ends the open watches.
    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault() = fault;
        if fault != Fault::None {
            self.shared.store().end_watches();
        }
    }

    /// Compaction: every open watch gets an ERROR 410 `Expired` event and ends, and every
    /// resource version given out so far becomes too old to watch or continue a list from (the
    /// current one moves on, as other writes in a real cluster move it). A new list gives one
    /// that can be watched from.
    pub fn expire_watches(&self) {
        self.shared.store().compact();
    }

    /// Watches open now.
    pub fn open_watches(&self) -> usize {
        self.shared.store().open_watches()
    }

    /// The current resource version (etcd's revision: the latest change to any object).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv()
    }

    /// Creates a Node as kubelet and the controller manager's node IPAM leave it: `spec.podCIDR`
    /// and `spec.podCIDRs` (none when `pod_cidrs` is empty: not allocated yet), an `InternalIP`
    /// and a `Hostname` address. Panics if it exists.
    pub fn create_node(&self, name: &str, pod_cidrs: &[&str], internal_ip: Option<&str>) -> Value {
        let mut addresses: Vec<Value> = internal_ip
            .map(|ip| json!({"type": "InternalIP", "address": ip}))
            .into_iter()
            .collect();
        addresses.push(json!({"type": "Hostname", "address": name}));
        let mut node = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {},
            "status": {"addresses": addresses},
        });
        if let Some(first) = pod_cidrs.first() {
            node["spec"] = json!({"podCIDR": first, "podCIDRs": pod_cidrs});
        }
        self.create(&NODES, node)
    }

    /// Creates an object of `res` (`metadata.name`, and `metadata.namespace` for namespaced
    /// ones) with the fields the server sets, sending ADDED. Panics if it exists.
    /// Every object of `res` as stored, in key order.
    pub fn all(&self, res: &'static Resource) -> Vec<Value> {
        self.shared.store().all(res)
    }

    pub fn create(&self, res: &'static Resource, obj: Value) -> Value {
        self.shared
            .store()
            .create(res, obj)
            .unwrap_or_else(|e| panic!("{}", e.message))
    }

    /// Changes the object at `key` (`name`, or `namespace/name`) with `f`, as another client's
    /// update would, sending MODIFIED if anything changed. Panics if it does not exist. `f` runs
    /// under the store's lock: it must not call the server.
    pub fn update(&self, res: &'static Resource, key: &str, f: impl FnOnce(&mut Value)) -> Value {
        let mut store = self.shared.store();
        let mut obj = store
            .get(res, key)
            .cloned()
            .unwrap_or_else(|| panic!("no {} {key:?} to update", res.kind));
        f(&mut obj);
        store.replace(res, key, obj).unwrap_or_else(|e| panic!("{}", e.message))
    }

    /// Deletes the object at `key`, sending DELETED; returns it as last stored. Panics if it
    /// does not exist.
    pub fn delete(&self, res: &'static Resource, key: &str) -> Value {
        self.shared
            .store()
            .delete(res, key)
            .unwrap_or_else(|e| panic!("{}", e.message))
    }

    /// Changes a Node with `f` (as another client's update would), sending MODIFIED if anything
    /// changed; name, uid and resource version are the server's. Returns the Node. Panics if it
    /// does not exist. `f` runs under the store's lock: it must not call the server.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Value)) -> Value {
        self.update(&NODES, name, f)
    }

    /// Deletes a Node, sending DELETED. Returns it as last stored. Panics if it does not exist.
    pub fn delete_node(&self, name: &str) -> Value {
        self.delete(&NODES, name)
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.store().get(&NODES, name).cloned()
    }

    /// Every Node, by name.
    pub fn nodes(&self) -> Vec<Value> {
        self.shared.store().all(&NODES)
    }

    /// The requests answered so far, oldest first (the latest 10 000).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log().requests()
    }

    /// How many requests were answered (all of them).
    pub fn request_count(&self) -> u64 {
        self.shared.log().total()
    }

    /// How many `method` requests were answered with `status`.
    pub fn count(&self, method: &str, status: u16) -> u64 {
        self.shared.log().count(method, status)
    }

    /// How many TCP connections were accepted (attempts while stopped are refused by the
    /// kernel and counted nowhere).
    pub fn connections(&self) -> u64 {
        self.shared.log().connections()
    }

    /// How many lists of this kind were answered.
    pub fn lists(&self, kind: ListKind) -> u64 {
        self.shared.log().lists(kind)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            // Not a blocking shutdown: the drop may happen inside another runtime.
            rt.shutdown_background();
        }
    }
}

fn write(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
