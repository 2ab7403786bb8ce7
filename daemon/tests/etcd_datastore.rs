//! The etcd datastore against a real etcd server (one per test, on loopback ports).

use etcd_client::{Client, GetOptions};
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};
use trellis_tests::etcd::Etcd;
use trellisd::config::Pool;
use trellisd::datastore::etcd::EtcdStore;
use trellisd::datastore::{Event, NodeInfo};
use trellisd::lease::{BackendData, Lease};
use trellisd::metrics::Metrics;

const TTL: Duration = Duration::from_secs(3);
const PREFIX: &str = "/trellis/leases/";

fn pool(network: &str, len: u8, min: &str, max: &str) -> Pool {
    Pool {
        network: network.parse().unwrap(),
        subnet_len: len,
        min: min.parse().unwrap(),
        max: max.parse().unwrap(),
    }
}

fn v4_pool() -> Pool {
    pool("10.244.0.0/16", 24, "10.244.1.0/24", "10.244.255.0/24")
}

/// A pool holding only `ip`/24.
fn one_cidr_pool(ip: &str) -> Pool {
    let cidr = format!("{ip}/24");
    pool("10.244.0.0/16", 24, &cidr, &cidr)
}

fn node(name: &str, n: u8) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        underlay_ip: format!("192.168.0.{n}").parse().unwrap(),
        backend: BackendData::HostGw,
    }
}

/// A running node: its lease, and what it has learnt of every node's lease.
struct Node {
    lease: Lease,
    rx: mpsc::Receiver<Event>,
    view: BTreeMap<String, Lease>,
    metrics: Metrics,
}

/// Logs to the test's output (shown when it fails, or with `--nocapture`).
fn log_to_test_output() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("trellisd=debug")
            .init()
    });
}

/// A client of the test's etcd.
async fn client(server: &Etcd) -> Client {
    Client::connect([server.endpoint()], None).await.expect("etcd client")
}

/// The etcd datastore of the test's server, for a daemon with node ID `id`.
fn store(server: &Etcd, id: &str) -> EtcdStore {
    EtcdStore::new(vec![server.endpoint()]).with_ttl(TTL).with_identity(id)
}

async fn start_node(server: &Etcd, name: &str, n: u8, pools: Vec<Pool>) -> Node {
    log_to_test_output();
    let metrics = Metrics::new();
    let store = store(server, &format!("id-of-{name}"));
    let (lease, rx) = timeout(
        Duration::from_secs(10),
        store.start(node(name, n), pools, metrics.clone()),
    )
    .await
    .expect("node gets a lease in time")
    .expect("node gets a lease");
    Node {
        lease,
        rx,
        view: BTreeMap::new(),
        metrics,
    }
}

impl Node {
    fn cidr(&self) -> IpNetwork {
        self.lease.pod_cidrs[0]
    }

    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Snapshot(all) => self.view = all.into_iter().map(|l| (l.node.clone(), l)).collect(),
            Event::Upsert(l) => {
                self.view.insert(l.node.clone(), l);
            }
            Event::Remove(n) => {
                self.view.remove(&n);
            }
            Event::Owners(_) | Event::Owner { .. } => {}
            Event::Lost(why) => panic!("the etcd datastore gave up this node's lease: {why}"),
        }
    }

    /// Applies events until `done` holds of the view; panics after `within`.
    async fn wait_until(&mut self, within: Duration, what: &str, done: impl Fn(&BTreeMap<String, Lease>) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.view) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.apply(ev),
                Ok(None) => panic!("event stream ended while waiting for {what}"),
                Err(_) => panic!("no {what} within {within:?}; view: {:?}", self.view.keys()),
            }
        }
    }

    async fn wait_for_nodes(&mut self, names: &[&str]) {
        let want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let what = format!("view of {want:?}");
        self.wait_until(Duration::from_secs(15), &what, |v| {
            v.keys().cloned().collect::<Vec<_>>() == want
        })
        .await;
    }
}

/// The owner recorded under the CIDR's ownership key, and that key's etcd lease.
async fn cidr_owner(client: &mut Client, cidr: &IpNetwork) -> Option<(String, i64)> {
    let key = format!("{PREFIX}cidrs/{}_{}", cidr.network(), cidr.prefix());
    let resp = client.get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| (kv.value_str().unwrap().to_string(), kv.lease()))
}

/// The node record's create revision, if it exists.
async fn record_created(client: &mut Client, name: &str) -> Option<i64> {
    let resp = client.get(format!("{PREFIX}{name}"), None).await.unwrap();
    resp.kvs().first().map(|kv| kv.create_revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_get_different_cidrs_and_see_each_other() {
    let server = Etcd::start();
    let v6 = pool("fd00:244::/56", 64, "fd00:244:0:1::/64", "fd00:244:0:ff::/64");
    let mut a = start_node(&server, "node-a", 1, vec![v4_pool(), v6.clone()]).await;
    let mut b = start_node(&server, "node-b", 2, vec![v4_pool(), v6]).await;
    for n in [&a, &b] {
        assert!(
            n.lease.cidr_v4().is_some() && n.lease.cidr_v6().is_some(),
            "{:?}",
            n.lease
        );
    }
    assert_ne!(a.lease.cidr_v4(), b.lease.cidr_v4());
    assert_ne!(a.lease.cidr_v6(), b.lease.cidr_v6());
    a.wait_for_nodes(&["node-a", "node-b"]).await;
    b.wait_for_nodes(&["node-a", "node-b"]).await;
    assert_eq!(a.view["node-b"], b.lease);
    assert_eq!(b.view["node-a"], a.lease);
    let mut c = client(&server).await;
    for cidr in &a.lease.pod_cidrs {
        assert_eq!(cidr_owner(&mut c, cidr).await.unwrap().0, "node-a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_gets_its_cidr_back() {
    let server = Etcd::start();
    let first = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    let cidr = first.cidr();
    // Another node in between must not take it.
    let other = start_node(&server, "node-b", 2, vec![v4_pool()]).await;
    assert_ne!(other.cidr(), cidr);
    // The daemon dies: its task stops renewing, its records stay until the TTL.
    drop(first);
    sleep(Duration::from_millis(200)).await;
    let again = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    assert_eq!(again.cidr(), cidr);
    // The records moved to the new etcd lease: they outlive the old one's TTL.
    sleep(TTL + Duration::from_secs(2)).await;
    let mut c = client(&server).await;
    assert!(
        record_created(&mut c, "node-a").await.is_some(),
        "record expired with the old etcd lease"
    );
    assert_eq!(cidr_owner(&mut c, &cidr).await.unwrap().0, "node-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_expires_and_frees_its_cidr() {
    let server = Etcd::start();
    let mut a = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    // node-b may only have one CIDR, which node-a does not hold.
    let only = if a.cidr().to_string() == "10.244.7.0/24" {
        "10.244.8.0"
    } else {
        "10.244.7.0"
    };
    let b = start_node(&server, "node-b", 2, vec![one_cidr_pool(only)]).await;
    a.wait_for_nodes(&["node-a", "node-b"]).await;
    drop(b);
    let t0 = tokio::time::Instant::now();
    a.wait_for_nodes(&["node-a"]).await;
    assert!(
        t0.elapsed() >= TTL - Duration::from_secs(1),
        "removed after {:?}, before the TTL",
        t0.elapsed()
    );
    let c = start_node(&server, "node-c", 3, vec![one_cidr_pool(only)]).await;
    assert_eq!(c.cidr().to_string(), format!("{only}/24"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_for_the_last_cidr_never_share_it() {
    let server = Etcd::start();
    let last = "10.244.9.0";
    log_to_test_output();
    let start = |name: &'static str, n: u8| {
        let store = EtcdStore::new(vec![server.endpoint()]).with_ttl(TTL);
        tokio::spawn(store.start(node(name, n), vec![one_cidr_pool(last)], Metrics::new()))
    };
    let (mut a, mut b) = (start("node-a", 1), start("node-b", 2));
    let winner = tokio::select! {
        r = &mut a => r,
        r = &mut b => r,
        _ = sleep(Duration::from_secs(10)) => panic!("neither node got the last CIDR"),
    };
    let (won, winner_rx) = winner.unwrap().unwrap();
    assert_eq!(won.pod_cidrs[0].to_string(), format!("{last}/24"));
    let loser = if won.node == "node-a" { b } else { a };
    // The other one keeps retrying.
    sleep(Duration::from_secs(3)).await;
    assert!(!loser.is_finished(), "both nodes hold the last CIDR");
    let mut c = client(&server).await;
    let (owner, lease_id) = cidr_owner(&mut c, &won.pod_cidrs[0]).await.unwrap();
    assert_eq!(owner, won.node);
    // The winner goes away and its etcd lease is revoked: the CIDR is free at once.
    drop(winner_rx);
    c.lease_revoke(lease_id).await.unwrap();
    let (got, _rx) = timeout(Duration::from_secs(10), loser)
        .await
        .expect("the waiting node gets the freed CIDR")
        .unwrap()
        .unwrap();
    assert_ne!(got.node, won.node);
    assert_eq!(got.pod_cidrs, won.pod_cidrs);
    assert_eq!(cidr_owner(&mut c, &got.pod_cidrs[0]).await.unwrap().0, got.node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_rides_out_an_etcd_restart() {
    let mut server = Etcd::start();
    let mut a = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    a.wait_for_nodes(&["node-a"]).await;
    let created = record_created(&mut client(&server).await, "node-a").await;
    server.kill();
    sleep(Duration::from_secs(1)).await;
    server.restart();
    let b = start_node(&server, "node-b", 2, vec![v4_pool()]).await;
    a.wait_for_nodes(&["node-a", "node-b"]).await;
    assert_eq!(a.view["node-b"], b.lease);
    // Same record, never re-created: the etcd lease survived the downtime.
    assert_eq!(record_created(&mut client(&server).await, "node-a").await, created);
    assert!(a.metrics.datastore_errors().get() > 0, "the outage went uncounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_etcd_lease_is_recreated_with_the_same_cidr() {
    let server = Etcd::start();
    let mut a = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    a.wait_for_nodes(&["node-a"]).await;
    let mut c = client(&server).await;
    let (_, lease_id) = cidr_owner(&mut c, &a.cidr()).await.unwrap();
    // What etcd does when the lease expires (e.g. etcd unreachable for longer than the TTL).
    c.lease_revoke(lease_id).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match cidr_owner(&mut c, &a.cidr()).await {
            Some((owner, id)) if id != lease_id => break assert_eq!(owner, "node-a"),
            _ if tokio::time::Instant::now() > deadline => panic!("records not re-created"),
            _ => sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(record_created(&mut c, "node-a").await.is_some());
    // The node was never told that it has no lease.
    while let Ok(Some(ev)) = timeout(Duration::from_secs(1), a.rx.recv()).await {
        assert_ne!(ev, Event::Remove("node-a".into()));
        a.apply(ev);
    }
    assert_eq!(a.view.get("node-a"), Some(&a.lease));
    assert!(a.metrics.datastore_errors().get() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_values_are_ignored() {
    let server = Etcd::start();
    let mut c = client(&server).await;
    c.put(format!("{PREFIX}bogus"), "{not json", None).await.unwrap();
    c.put(format!("{PREFIX}cidrs/garbage"), "node-x", None).await.unwrap();
    let mut a = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    match a.rx.recv().await.unwrap() {
        Event::Snapshot(all) => assert_eq!(all, vec![a.lease.clone()]),
        ev => panic!("first event {ev:?} is not a snapshot"),
    }
    c.put(format!("{PREFIX}evil"), "[1, 2", None).await.unwrap();
    let peer = Lease {
        node: "peer".into(),
        underlay_ip: "192.168.0.9".parse().unwrap(),
        pod_cidrs: vec!["10.244.200.0/24".parse().unwrap()],
        backend: BackendData::HostGw,
    };
    c.put(format!("{PREFIX}peer"), serde_json::to_string(&peer).unwrap(), None)
        .await
        .unwrap();
    // The next lease event (ownership records, which the node checks leases against, aside).
    let ev = loop {
        match timeout(Duration::from_secs(5), a.rx.recv()).await.unwrap().unwrap() {
            Event::Owners(_) | Event::Owner { .. } => {}
            ev => break ev,
        }
    };
    assert_eq!(ev, Event::Upsert(peer));
    let all = c.get(PREFIX, Some(GetOptions::new().with_prefix())).await.unwrap();
    assert!(all.kvs().len() >= 5, "the bad keys were left alone");
}

/// A dataplane that records the nodes of every run.
#[derive(Clone, Default)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>);

impl trellisd::node::Plane for Recorder {
    async fn run(
        &mut self,
        leases: &BTreeMap<String, Lease>,
        _: Option<&[trellisd::backend::bgp::BgpRoute]>,
        _: bool,
    ) -> Result<(), String> {
        self.0.lock().unwrap().push(leases.keys().cloned().collect());
        Ok(())
    }
}

impl Recorder {
    fn last(&self) -> Vec<String> {
        self.0.lock().unwrap().last().cloned().unwrap_or_default()
    }

    /// Every node any run was given.
    fn ever(&self) -> std::collections::BTreeSet<String> {
        self.0.lock().unwrap().iter().flatten().cloned().collect()
    }
}

/// Runs `n`'s lease events through the node loop into a [`Recorder`], as the daemon does.
fn run_node(n: Node) -> (Recorder, Metrics, Lease) {
    let rec = Recorder::default();
    let bounds = trellisd::datastore::trust::Bounds {
        cluster: vec!["10.244.0.0/16".parse().unwrap()],
        underlay: "192.168.0.1/24".parse().unwrap(),
    };
    let (tx, rx) = mpsc::channel(64);
    let node = trellisd::node::Node::new(rec.clone(), n.lease.clone(), false, bounds, n.metrics.clone());
    tokio::spawn(trellisd::node::forward_leases(n.rx, tx));
    tokio::spawn(node.run(rx));
    (rec, n.metrics, n.lease)
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "no {what} within 15 s");
        sleep(Duration::from_millis(50)).await;
    }
}

/// The datastore lies: leases written straight into etcd by someone holding its credentials.
/// None reaches the dataplane, and each is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_leases_never_reach_the_dataplane() {
    use trellisd::datastore::trust::Refusal;
    let server = Etcd::start();
    let a = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    let b = start_node(&server, "node-b", 2, vec![v4_pool()]).await;
    let b_cidr = b.cidr();
    let a_cidr = a.cidr();
    let (rec, metrics, _) = run_node(a);
    wait_for("run with both nodes", || rec.last() == ["node-a", "node-b"]).await;
    let mut c = client(&server).await;
    let put = |c: &mut Client, node: &str, ip: &str, cidr: String| {
        let l = Lease {
            node: node.into(),
            underlay_ip: ip.parse().unwrap(),
            pod_cidrs: vec![cidr.parse().unwrap()],
            backend: BackendData::HostGw,
        };
        let mut c = c.clone();
        async move {
            c.put(format!("{PREFIX}{}", l.node), serde_json::to_string(&l).unwrap(), None)
                .await
                .unwrap()
        }
    };
    let half = format!("{}/25", a_cidr.network());
    // Hijack node-b's CIDR; route 8.0.0.0/5; shadow half of node-a's own CIDR (with an
    // ownership record to match); the underlay subnet; a tunnel endpoint on loopback.
    put(&mut c, "thief", "192.168.0.66", b_cidr.to_string()).await;
    put(&mut c, "wide", "192.168.0.67", "8.0.0.0/5".into()).await;
    c.put(format!("{PREFIX}cidrs/{}_25", a_cidr.network()), "half", None)
        .await
        .unwrap();
    put(&mut c, "half", "192.168.0.68", half).await;
    put(&mut c, "under", "192.168.0.69", "192.168.0.0/24".into()).await;
    c.put(format!("{PREFIX}cidrs/10.244.250.0_24"), "lo", None)
        .await
        .unwrap();
    put(&mut c, "lo", "127.0.0.1", "10.244.250.0/24".into()).await;
    // node-b's ownership record overwritten to name another thief, who claims the CIDR.
    put(&mut c, "evictor", "192.168.0.70", b_cidr.to_string()).await;
    c.put(
        format!("{PREFIX}cidrs/{}_{}", b_cidr.network(), b_cidr.prefix()),
        "evictor",
        None,
    )
    .await
    .unwrap();
    let refused = || {
        Refusal::ALL
            .iter()
            .map(|r| metrics.leases_refused(*r).get())
            .sum::<u64>()
    };
    wait_for("six refusals", || refused() >= 6).await;
    sleep(Duration::from_secs(1)).await;
    let ever = rec.ever();
    for liar in ["thief", "wide", "half", "under", "lo", "evictor"] {
        assert!(!ever.contains(liar), "{liar}'s lease reached the dataplane: {ever:?}");
    }
    let count = |r: Refusal| metrics.leases_refused(r).get();
    assert!(count(Refusal::NotOwner) >= 1, "thief");
    assert_eq!(count(Refusal::OutsideCluster), 2, "wide, under");
    assert_eq!(count(Refusal::OverlapsOwn), 1, "half");
    assert_eq!(count(Refusal::BadEndpoint), 1, "lo");
    assert!(count(Refusal::OverlapsPeer) + count(Refusal::NotOwner) >= 2, "evictor");
    // node-b restores its ownership record: it is back in node-a's dataplane.
    wait_for("node-b back", || rec.last().contains(&"node-b".to_string())).await;
    drop(b);
}

/// A second daemon under a live node's name (a cloned VM, a wrong NODE_NAME) is refused,
/// naming the node and the holder; the first keeps its record and CIDR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_with_a_live_nodes_name_is_refused() {
    let server = Etcd::start();
    let mut a = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    a.wait_for_nodes(&["node-a"]).await;
    let mut c = client(&server).await;
    let created = record_created(&mut c, "node-a").await;
    let clone = store(&server, "id-of-the-clone");
    let t = tokio::time::Instant::now();
    let r = timeout(TTL * 3, clone.start(node("node-a", 9), vec![v4_pool()], Metrics::new()))
        .await
        .expect("the clone gives up within a TTL or so");
    let e = r.expect_err("the clone was refused").to_string();
    assert!(e.contains("node-a") && e.contains("id-of-node-a"), "{e}");
    assert!(
        t.elapsed() >= TTL,
        "refused after {:?}, before a dead holder's record could expire",
        t.elapsed()
    );
    // The first keeps its record (never rewritten) and its CIDR, and the attempt is on record.
    assert_eq!(record_created(&mut c, "node-a").await, created);
    assert_eq!(cidr_owner(&mut c, &a.cidr()).await.unwrap().0, "node-a");
    let rec = c.get(format!("{PREFIX}node-a"), None).await.unwrap();
    let lease: Lease = serde_json::from_slice(rec.kvs()[0].value()).unwrap();
    assert_eq!(lease, a.lease, "the clone rewrote the record");
    let claim = c.get(format!("{PREFIX}claims/node-a"), None).await.unwrap();
    assert!(claim.kvs()[0].value_str().unwrap().contains("id-of-the-clone"));
}

/// A reboot empties /run: the node comes back with a new ID and takes its name back once its
/// old record (no longer renewed) expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_new_id_takes_its_name_back_once_the_old_record_expires() {
    let server = Etcd::start();
    let old = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    let cidr = old.cidr();
    drop(old);
    let rebooted = store(&server, "a-new-id").with_hint(vec![cidr]);
    let (lease, _rx) = timeout(
        TTL * 3,
        rebooted.start(node("node-a", 1), vec![v4_pool()], Metrics::new()),
    )
    .await
    .expect("the name is taken back within a TTL or so")
    .expect("the rebooted node gets its lease");
    assert_eq!(lease.pod_cidrs, vec![cidr]);
}

/// Someone rewrites a live node's record: it notices, fails /healthz, and puts its record back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restores_its_rewritten_record_and_says_so() {
    let server = Etcd::start();
    let mut a = start_node(&server, "node-a", 1, vec![v4_pool()]).await;
    a.wait_for_nodes(&["node-a"]).await;
    let mut c = client(&server).await;
    let mut forged = a.lease.clone();
    forged.underlay_ip = "192.168.0.66".parse().unwrap();
    c.put(format!("{PREFIX}node-a"), serde_json::to_string(&forged).unwrap(), None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rec = c.get(format!("{PREFIX}node-a"), None).await.unwrap();
        let now: Lease = serde_json::from_slice(rec.kvs()[0].value()).unwrap();
        if now == a.lease {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "record not restored: {now:?}");
        sleep(Duration::from_millis(100)).await;
    }
    let health = a.metrics.health().unwrap_err();
    assert!(
        health.contains("rewritten") && health.contains("192.168.0.66"),
        "{health}"
    );
}

/// The etcd datastore of `server` with TLS files and a user as `security` says.
fn secured(server: &Etcd, security: trellisd::datastore::etcd::Security) -> EtcdStore {
    // As main() does: the one crypto provider for the etcd client's TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    EtcdStore::new(vec![server.endpoint()])
        .with_ttl(TTL)
        .with_security(security)
}

/// A node that `store` must keep from its lease: still trying after 3 s, each failure counted
/// as a credentials problem of `reason`, with backoff (a handful of tries, not a spin).
async fn refused(store: EtcdStore, what: &str, reason: &'static str) {
    log_to_test_output();
    let metrics = Metrics::new();
    let task = tokio::spawn(store.start(node("node-x", 9), vec![v4_pool()], metrics.clone()));
    sleep(Duration::from_secs(3)).await;
    assert!(!task.is_finished(), "{what}: the node stopped trying, or got through");
    task.abort();
    let (errors, refused) = (
        metrics.datastore_errors().get(),
        metrics.datastore_credential_errors(reason).get(),
    );
    assert!(
        refused >= 2,
        "{what}: {refused} failures counted as {reason} ({errors} errors)"
    );
    assert!(errors <= 8, "{what}: {errors} tries in 3 s is no backoff");
    assert_eq!(refused, errors, "{what}: every failure was the credentials'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_needs_the_right_ca_and_a_client_certificate() {
    use trellis_tests::etcd::{Pki, Security as Protect};
    use trellisd::datastore::etcd::Security;
    let server = Etcd::start_secured(Protect { tls: true, auth: false });
    let pki = server.pki().expect("TLS etcd").clone();
    let right = Security {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
        ..Default::default()
    };
    let metrics = Metrics::new();
    let (lease, mut rx) = timeout(
        Duration::from_secs(10),
        secured(&server, right.clone()).start(node("node-a", 1), vec![v4_pool()], metrics),
    )
    .await
    .expect("a lease over TLS in time")
    .expect("a lease over TLS");
    match timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap() {
        Event::Snapshot(all) => assert_eq!(all, vec![lease]),
        ev => panic!("first event {ev:?} is not a snapshot"),
    }
    let elsewhere = trellis_tests::TempDir::new("pki");
    let other = Pki::generate(elsewhere.path());
    let wrong_ca = Security {
        ca_file: Some(other.ca.clone()),
        ..right.clone()
    };
    refused(secured(&server, wrong_ca), "wrong CA", "tls").await;
    let no_cert = Security {
        ca_file: Some(pki.ca.clone()),
        ..Default::default()
    };
    refused(secured(&server, no_cert), "no client certificate", "tls").await;
    let foreign_cert = Security {
        cert_file: Some(other.client_cert.clone()),
        key_file: Some(other.client_key.clone()),
        ..right
    };
    refused(
        secured(&server, foreign_cert),
        "client certificate of another CA",
        "tls",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_authentication_needs_the_right_password() {
    use trellis_tests::etcd::{Security as Protect, ROOT_PASSWORD};
    use trellisd::datastore::etcd::Security;
    let server = Etcd::start_secured(Protect { tls: false, auth: true });
    let dir = trellis_tests::TempDir::new("etcd-password");
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let user = |password_file| Security {
        username: Some("root".into()),
        password_file: Some(password_file),
        ..Default::default()
    };
    refused(
        secured(&server, user(file("wrong", "not-it\n"))),
        "wrong password",
        "auth",
    )
    .await;
    refused(secured(&server, Security::default()), "no user", "auth").await;
    // A Secret's key, with the newline `kubectl create secret --from-file` often keeps.
    let right = user(file("right", &format!("{ROOT_PASSWORD}\n")));
    let (lease, _rx) = timeout(
        Duration::from_secs(10),
        secured(&server, right).start(node("node-a", 1), vec![v4_pool()], Metrics::new()),
    )
    .await
    .expect("a lease with the right password in time")
    .expect("a lease with the right password");
    assert_eq!(lease.node, "node-a");
}
