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

async fn start_node(server: &Etcd, name: &str, n: u8, pools: Vec<Pool>) -> Node {
    log_to_test_output();
    let metrics = Metrics::new();
    let store = EtcdStore::new(vec![server.endpoint()]).with_ttl(TTL);
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
    let ev = timeout(Duration::from_secs(5), a.rx.recv()).await.unwrap().unwrap();
    assert_eq!(ev, Event::Upsert(peer));
    let all = c.get(PREFIX, Some(GetOptions::new().with_prefix())).await.unwrap();
    assert!(all.kvs().len() >= 5, "the bad keys were left alone");
}
