//! Route reflection (RFC 4456) with real sessions: in-process speakers in their own network
//! namespaces, two of them reflectors of one cluster with four clients and no mesh; and BIRD
//! as a client of our reflector, which must see ORIGINATOR_ID and CLUSTER_LIST.

#[path = "common/bird.rs"]
mod bird;

use bird::*;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use trellisd::bgp::policy::Rejected;
use trellisd::bgp::{PeerConfig, Routes};

const T: Duration = Duration::from_secs(20);
const CLUSTER_ID: &str = "1.0.0.1";
const REFLECTORS: [usize; 2] = [1, 2];

fn cluster_id() -> Ipv4Addr {
    CLUSTER_ID.parse().unwrap()
}

/// A reflector's peers: every other node of `nodes`, the non-reflectors as clients.
fn reflector_peers(i: usize, nodes: &[usize]) -> Vec<PeerConfig> {
    nodes
        .iter()
        .filter(|j| **j != i)
        .map(|j| PeerConfig {
            rr_client: !REFLECTORS.contains(j),
            ..node_peer(*j)
        })
        .collect()
}

/// A client's peers: the reflectors.
fn client_peers() -> Vec<PeerConfig> {
    REFLECTORS.iter().map(|j| node_peer(*j)).collect()
}

/// Node i's view holds exactly the CIDRs of `nodes` but its own, via their own addresses
/// (next hops unchanged through the reflectors), fresh.
fn complete(r: &Routes, i: usize, nodes: &[usize]) -> bool {
    r.len() == 2 * (nodes.len() - 1)
        && nodes.iter().filter(|j| **j != i).all(|j| {
            has(r, &format!("10.244.{j}.0/24"), &node_v4(*j).to_string())
                && has(r, &format!("fd00:244:0:{j}::/64"), &node_v6(*j).to_string())
        })
}

/// Two reflectors (one cluster ID) and four clients, no mesh: every node learns every other
/// node's CIDRs, and the reflectors drop what the other one reflects back into the cluster
/// (CLUSTER_LIST). A prefix added and withdrawn on a client reaches the other clients. Then
/// reflector 1 goes away (its speaker dropped, as a crash): the clients keep their routes
/// through reflector 2; reflector 1's own routes stay (graceful restart, stale) for its restart
/// time, during which reflector 2 keeps reflecting them (a client that comes up then learns
/// them), and go after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reflectors_four_clients_one_reflector_lost() {
    let lab = Lab::new(6);
    let all = [1, 2, 3, 4, 5, 6];
    let mut sp = Vec::new();
    for i in 1..=5 {
        let mut cfg = lab.config(i);
        let peers = if REFLECTORS.contains(&i) {
            cfg.rr_cluster_id = Some(cluster_id());
            // Reflector 1's routes are kept this long by its peers once it is gone.
            if i == 1 {
                cfg.graceful_restart_secs = 8;
            }
            reflector_peers(i, &all)
        } else {
            client_peers()
        };
        sp.push(lab.speaker_with(cfg, i, peers).await);
    }
    let up = [1, 2, 3, 4, 5];
    for (n, (_, rx)) in sp.iter_mut().enumerate() {
        wait_routes(rx, T, &format!("node {} learns every node", n + 1), |r| {
            complete(r, n + 1, &up)
        })
        .await;
    }
    // Clients' sessions: the two reflectors only.
    for (s, _) in &sp[2..] {
        wait_established(s, &[node_v4(1), node_v4(2)], T).await;
        assert_eq!(s.established(), [node_v4(1), node_v4(2)]);
    }
    // What reflector 1 reflects to reflector 2 (a non-client) carries their common cluster ID:
    // dropped there, and the other way round.
    for i in REFLECTORS {
        let t = Instant::now();
        while lab.metrics(i).bgp_routes_dropped(Rejected::ClusterListLoop).get() == 0 {
            assert!(t.elapsed() < T, "reflector {i}: {}", lab.metrics(i).render());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for i in 3..=5 {
        assert_eq!(lab.metrics(i).bgp_routes_dropped(Rejected::ClusterListLoop).get(), 0);
    }

    // A client's new prefix reaches the other clients through the reflectors, and goes.
    let extra: ipnetwork::IpNetwork = "10.244.103.0/24".parse().unwrap();
    let mut exports = pod_cidrs(3);
    exports.push(extra);
    sp[2].0.set_exports(exports, Some(node_v4(3)), Some(node_v6(3)));
    for (_, rx) in sp.iter_mut().skip(3) {
        wait_routes(rx, T, "the new prefix", |r| has(r, "10.244.103.0/24", "192.168.77.13")).await;
    }
    sp[2].0.set_exports(pod_cidrs(3), Some(node_v4(3)), Some(node_v6(3)));
    for (_, rx) in sp.iter_mut().skip(3) {
        wait_routes(rx, T, "the prefix withdrawn", |r| !r.contains_key(&extra)).await;
    }

    // Reflector 1 is gone, without a NOTIFICATION.
    let lost = Instant::now();
    drop(sp.remove(0));
    // Client 6 comes up now: it only ever talks to reflector 2, which still holds reflector 1's
    // routes (stale) and reflects them.
    let (s6, mut rx6) = lab.speaker(6, client_peers()).await;
    let node1 = "10.244.1.0/24";
    wait_routes(
        &mut rx6,
        T,
        "client 6 learns every node, node 1 through reflector 2",
        |r| complete(r, 6, &all) && r[&node1.parse().unwrap()].peer == node_v4(2),
    )
    .await;
    assert!(
        lost.elapsed() < Duration::from_secs(8),
        "reflector 1's restart time passed before the check ({:?}): the test proves nothing",
        lost.elapsed()
    );
    // Reflector 1's restart time over: its routes are gone everywhere; the clients have each
    // other's routes through reflector 2, fresh.
    let rest = [2, 3, 4, 5, 6];
    for (n, (_, rx)) in sp.iter_mut().enumerate() {
        let i = n + 2;
        wait_routes(rx, T, &format!("node {i} without reflector 1"), |r| {
            complete(r, i, &rest) && (i == 2 || r.values().all(|x| x.peer == node_v4(2)))
        })
        .await;
    }
    wait_routes(&mut rx6, T, "client 6 without reflector 1", |r| complete(r, 6, &rest)).await;
    assert_eq!(s6.established(), [node_v4(2)]);
}

/// BIRD as a route-reflector client of our reflector (node 1), beside another client (node 2,
/// our speaker): each learns the other's routes with the next hop unchanged, and BIRD shows
/// the ORIGINATOR_ID and CLUSTER_LIST we set; our own routes go without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bird_client_of_our_reflector() {
    let mut lab = Lab::new(2);
    let mut conf = BirdConf::new(ASN).neighbor(node_v4(1), ASN, false);
    conf.statics = vec!["10.244.100.0/24".into(), "fd00:244:0:100::/64".into()];
    lab.start_bird(&conf);
    let mut cfg = lab.config(1);
    cfg.rr_cluster_id = Some(cluster_id());
    let clients = vec![
        PeerConfig {
            rr_client: true,
            ..bird_peer()
        },
        PeerConfig {
            rr_client: true,
            ..node_peer(2)
        },
    ];
    let (_rr, mut rx1) = lab.speaker_with(cfg, 1, clients).await;
    let (_client, mut rx2) = lab.speaker(2, vec![node_peer(1)]).await;
    wait_routes(&mut rx1, T, "the reflector learns both clients", |r| {
        has(r, "10.244.100.0/24", BIRD_V4) && has(r, "10.244.2.0/24", "192.168.77.12")
    })
    .await;
    wait_routes(&mut rx2, T, "node 2 learns BIRD's routes through the reflector", |r| {
        has(r, "10.244.100.0/24", BIRD_V4)
            && has(r, "fd00:244:0:100::/64", BIRD_V6)
            && has(r, "10.244.1.0/24", "192.168.77.11")
    })
    .await;
    let bird = lab.bird();
    bird.wait_routes(T, "node 2's routes reflected, node 1's own", |r| {
        bird_has(r, "10.244.2.0/24", "192.168.77.12")
            && bird_has(r, "fd00:244:0:2::/64", "fd00:77::12")
            && bird_has(r, "10.244.1.0/24", "192.168.77.11")
    })
    .await;
    let routes = bird.routes();
    for p in ["10.244.2.0/24", "fd00:244:0:2::/64"] {
        let r = &routes[p];
        assert!(r.contains("BGP.originator_id: 192.168.77.12"), "{p}: {r}");
        assert!(r.contains(&format!("BGP.cluster_list: {CLUSTER_ID}")), "{p}: {r}");
    }
    let own = &routes["10.244.1.0/24"];
    assert!(!own.contains("originator_id") && !own.contains("cluster_list"), "{own}");
    // BIRD's routes are not reflected back to it (nothing of ours is dropped as a loop there),
    // and nothing came back to us as a loop.
    assert!(!routes["10.244.100.0/24"].contains("cluster_list"));
    for i in [1, 2] {
        for r in [Rejected::OriginatorIsUs, Rejected::ClusterListLoop] {
            assert_eq!(lab.metrics(i).bgp_routes_dropped(r).get(), 0, "node {i} {r:?}");
        }
    }
}
