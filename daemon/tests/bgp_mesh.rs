//! Speakers among themselves, without BIRD: an iBGP full mesh of three nodes (peers added and
//! removed at run time), and a session over IPv6.

#[path = "common/bird.rs"]
mod bird;

use bird::*;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use trellisd::bgp::{PeerConfig, Routes};

const T: Duration = Duration::from_secs(20);

fn others(i: usize) -> Vec<PeerConfig> {
    (1..=3).filter(|j| *j != i).map(node_peer).collect()
}

/// Node i's view holds exactly the other nodes' CIDRs via their underlay addresses.
fn mesh_complete(r: &Routes, i: usize, nodes: &[usize]) -> bool {
    r.len() == 2 * (nodes.len() - 1)
        && nodes.iter().filter(|j| **j != i).all(|j| {
            has(r, &format!("10.244.{j}.0/24"), &node_v4(*j).to_string())
                && has(r, &format!("fd00:244:0:{j}::/64"), &node_v6(*j).to_string())
        })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mesh_of_three_speakers() {
    let lab = Lab::new(3);
    let started = Instant::now();
    let mut sp = Vec::new();
    for i in 1..=3 {
        sp.push(lab.speaker(i, others(i)).await);
    }
    for (n, (_, rx)) in sp.iter_mut().enumerate() {
        wait_routes(rx, T, &format!("node {} learns the mesh", n + 1), |r| {
            mesh_complete(r, n + 1, &[1, 2, 3])
        })
        .await;
    }
    eprintln!(
        "full mesh: 3 speakers started to all routes learned by all: {:?}",
        started.elapsed()
    );
    // Synced (End-of-RIB from every peer) means complete.
    for (n, (s, rx)) in sp.iter().enumerate() {
        let mut synced = s.synced();
        tokio::time::timeout(T, synced.wait_for(|s| *s)).await.unwrap().unwrap();
        assert!(mesh_complete(&rx.borrow(), n + 1, &[1, 2, 3]));
    }
    for (n, (s, _)) in sp.iter().enumerate() {
        let want: Vec<IpAddr> = (1..=3).filter(|j| *j != n + 1).map(node_v4).collect();
        wait_established(s, &want, T).await;
        assert_eq!(s.established(), want, "one session per peer after the collisions");
    }

    // A prefix added and removed on node 1: how long until nodes 2 and 3 see it.
    let (mut add, mut del) = (Vec::new(), Vec::new());
    for k in 0..20u8 {
        let extra: ipnetwork::IpNetwork = format!("10.244.{}.0/24", 100 + k).parse().unwrap();
        let mut exports = pod_cidrs(1);
        exports.push(extra);
        let t = Instant::now();
        sp[0].0.set_exports(exports, Some(node_v4(1)), Some(node_v6(1)));
        for (_, rx) in sp.iter_mut().skip(1) {
            wait_routes(rx, T, "the new prefix", |r| r.contains_key(&extra)).await;
        }
        add.push(t.elapsed());
        let t = Instant::now();
        sp[0].0.set_exports(pod_cidrs(1), Some(node_v4(1)), Some(node_v6(1)));
        for (_, rx) in sp.iter_mut().skip(1) {
            wait_routes(rx, T, "the prefix withdrawn", |r| !r.contains_key(&extra)).await;
        }
        del.push(t.elapsed());
    }
    eprintln!(
        "full mesh: a prefix change on an established session reaches both peers' watch: \
         announce median {:?} max {:?}, withdraw median {:?} max {:?}",
        median(add.clone()),
        add.iter().max().unwrap(),
        median(del.clone()),
        del.iter().max().unwrap()
    );

    // Node 3 leaves node 1's peer list: the session closes (Cease), both sides drop the
    // other's routes, and node 3's reconnection attempts are refused.
    sp[0].0.set_peers(vec![node_peer(2)]);
    wait_routes(&mut sp[0].1, T, "node 1 without node 3", |r| {
        mesh_complete(r, 1, &[1, 2])
    })
    .await;
    wait_routes(&mut sp[2].1, T, "node 3 without node 1", |r| {
        mesh_complete(r, 3, &[2, 3])
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sp[0].0.established(), [node_v4(2)]);
    assert_eq!(sp[2].0.established(), [node_v4(2)]);
    // And back.
    sp[0].0.set_peers(others(1));
    for (n, (_, rx)) in sp.iter_mut().enumerate() {
        wait_routes(rx, T, "the mesh again", |r| mesh_complete(r, n + 1, &[1, 2, 3])).await;
    }

    // A node goes away for good (its speaker dropped, no graceful restart on the way: its
    // routes stay stale for the restart time): the others keep its routes, marked stale.
    drop(sp.pop());
    for (_, rx) in sp.iter_mut() {
        wait_routes(rx, T, "node 3's routes stale", |r| {
            r.values().filter(|x| x.peer == node_v4(3)).all(|x| x.stale)
                && r.values().filter(|x| x.peer == node_v4(3)).count() == 2
        })
        .await;
    }
    // Removed from the peer lists (the node's lease expired): its routes go at once.
    sp[0].0.set_peers(vec![node_peer(2)]);
    sp[1].0.set_peers(vec![node_peer(1)]);
    for (n, (_, rx)) in sp.iter_mut().enumerate() {
        wait_routes(rx, T, "two nodes left", |r| mesh_complete(r, n + 1, &[1, 2])).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_ipv6() {
    let lab = Lab::new(2);
    let mut sp = Vec::new();
    for (i, other) in [(1, 2), (2, 1)] {
        let mut cfg = lab.config(i);
        cfg.listen = "[::]:179".parse().unwrap();
        let peer = PeerConfig {
            addr: node_v6(other),
            asn: ASN,
            rr_client: false,
        };
        sp.push(lab.speaker_with(cfg, i, vec![peer]).await);
    }
    for (n, (s, rx)) in sp.iter_mut().enumerate() {
        wait_routes(rx, T, "the other's CIDRs over IPv6", |r| {
            mesh_complete(r, n + 1, &[1, 2])
        })
        .await;
        assert_eq!(s.established(), [node_v6(2 - n)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_prefixes_between_speakers() {
    let lab = Lab::new(2);
    let (s1, _rx1) = lab.speaker(1, vec![node_peer(2)]).await;
    let mut cfg = lab.config(2);
    cfg.import_within = vec!["10.0.0.0/8".parse().unwrap()];
    let (_s2, mut rx2) = lab.speaker_with(cfg, 2, vec![node_peer(1)]).await;
    wait_routes(&mut rx2, T, "node 1's CIDR", |r| {
        has(r, "10.244.1.0/24", "192.168.77.11")
    })
    .await;
    let many: Vec<ipnetwork::IpNetwork> = (0..10_000u32)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256).parse().unwrap())
        .collect();
    let t = Instant::now();
    s1.set_exports(many.clone(), Some(node_v4(1)), None);
    wait_routes(&mut rx2, T, "10,000 prefixes", |r| r.len() == 10_000).await;
    let announce = t.elapsed();
    let t = Instant::now();
    s1.set_exports(pod_cidrs(1), Some(node_v4(1)), Some(node_v6(1)));
    // Node 2 learns IPv4 only here: node 1's IPv4 CIDR is what is left.
    wait_routes(&mut rx2, T, "10,000 prefixes withdrawn", |r| r.len() == 1).await;
    eprintln!(
        "10,000 prefixes on an established session, speaker to speaker: announced in {announce:?}, \
         withdrawn in {:?}",
        t.elapsed()
    );
    assert_eq!(s1.established(), [node_v4(2)]);
}
