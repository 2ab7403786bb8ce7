//! The BGP speaker against BIRD 2: iBGP, route reflection, eBGP to a top-of-rack router,
//! BIRD restarting, and our graceful restart. BIRD and the speakers run in namespaces made by
//! each test (see `common/bird.rs`).

#[path = "common/bird.rs"]
mod bird;

use bird::*;
use std::time::{Duration, Instant};
use trellisd::bgp::PeerConfig;

const T: Duration = Duration::from_secs(20);

/// BIRD with its own prefixes: one inside the cluster CIDRs per family, and two it must not
/// get us to accept (a default route, a prefix outside the cluster).
fn bird_with_statics(asn: u32) -> BirdConf {
    let mut c = BirdConf::new(asn);
    c.statics = vec![
        "10.244.100.0/24".into(),
        "0.0.0.0/0".into(),
        "172.16.5.0/24".into(),
        "fd00:244:0:100::/64".into(),
        "::/0".into(),
    ];
    c
}

/// [`bird_with_statics`] in our AS, peered with node 1, `graceful restart on`.
fn graceful_bird_for_node_1() -> BirdConf {
    let mut conf = bird_with_statics(ASN).neighbor(node_v4(1), ASN, false);
    conf.graceful_restart = true;
    conf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ibgp_with_bird_both_ways_and_only_cluster_prefixes_learned() {
    let mut lab = Lab::new(1);
    lab.start_bird(&bird_with_statics(ASN).neighbor(node_v4(1), ASN, false));
    let started = Instant::now();
    let (s, mut rx) = lab.speaker(1, vec![bird_peer()]).await;
    wait_established(&s, &[BIRD_V4.parse().unwrap()], T).await;
    let routes = wait_routes(&mut rx, T, "BIRD's cluster prefixes", |r| {
        has(r, "10.244.100.0/24", BIRD_V4) && has(r, "fd00:244:0:100::/64", BIRD_V6)
    })
    .await;
    eprintln!("speaker start to BIRD's routes learned: {:?}", started.elapsed());
    // The default routes and the prefix outside the cluster CIDRs were dropped.
    assert_eq!(routes.len(), 2, "{routes:#?}");

    lab.bird()
        .wait_routes(T, "our pod CIDRs via our underlay addresses", |r| {
            bird_has(r, "10.244.1.0/24", "192.168.77.11") && bird_has(r, "fd00:244:0:1::/64", "fd00:77::11")
        })
        .await;
    let r = lab.bird().routes();
    let ours = &r["10.244.1.0/24"];
    assert!(ours.contains("BGP.origin: IGP"), "{ours}");
    assert!(ours.contains("BGP.local_pref: 100"), "{ours}");

    // ROUTE-REFRESH (`birdc reload in`): we send our routes again.
    let received = || -> u64 {
        lab.bird()
            .birdc(&["show", "protocols", "all", "n0"])
            .lines()
            .filter(|l| l.trim_start().starts_with("Import updates:"))
            .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
            .sum()
    };
    let before = received();
    lab.bird().birdc(&["reload", "in", "n0"]);
    let t = Instant::now();
    while received() < before + 2 {
        assert!(
            t.elapsed() < T,
            "no UPDATEs after ROUTE-REFRESH ({} then {})",
            before,
            received()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A new export reaches BIRD, a removed one is withdrawn.
    s.set_exports(vec!["10.244.7.0/24".parse().unwrap()], Some(node_v4(1)), None);
    lab.bird()
        .wait_routes(T, "the new export only", |r| {
            bird_has(r, "10.244.7.0/24", "192.168.77.11") && !r.contains_key("10.244.1.0/24")
        })
        .await;
    // Nothing of ours is left in BIRD's table from the IPv6 side either.
    assert!(!lab.bird().routes().contains_key("fd00:244:0:1::/64"));
}

/// Issue 13, item 7: an IPv6 peer that connects to us. Our own connections go to a port BIRD
/// does not listen on, so only BIRD's connection to our port 179 over IPv6 makes the session
/// (with an IPv4-only listener, the kernel refuses it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_peer_connecting_in_establishes() {
    let mut lab = Lab::new(1);
    lab.start_bird(&bird_with_statics(ASN).neighbor(node_v6(1), ASN, false));
    let mut cfg = lab.config(1);
    cfg.peer_port = 1;
    let bird_v6 = BIRD_V6.parse().unwrap();
    let (s, mut rx) = lab
        .speaker_with(
            cfg,
            1,
            vec![PeerConfig {
                addr: bird_v6,
                asn: ASN,
                rr_client: false,
            }],
        )
        .await;
    wait_established(&s, &[bird_v6], T).await;
    wait_routes(&mut rx, T, "BIRD's IPv6 cluster prefix over the IPv6 session", |r| {
        has(r, "fd00:244:0:100::/64", BIRD_V6)
    })
    .await;
    lab.bird()
        .wait_routes(T, "our IPv6 pod CIDR via our IPv6 underlay address", |r| {
            bird_has(r, "fd00:244:0:1::/64", "fd00:77::11")
        })
        .await;
}

/// Issue 13, TCP MD5: BIRD with `password` on both sessions. Node 1 has the same password and
/// establishes (its routes reach BIRD); node 2's differs, so the kernels drop its segments and
/// the session stays down (its peer task warns that MD5 is configured).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_md5_right_password_establishes_wrong_one_does_not() {
    let mut lab = Lab::new(2);
    let mut conf = bird_with_statics(ASN)
        .neighbor(node_v4(1), ASN, false)
        .neighbor(node_v4(2), ASN, false);
    conf.password = Some("s3cret-Trellis".into());
    lab.start_bird(&conf);
    let mut right = lab.config(1);
    right.md5_password = Some(b"s3cret-Trellis".to_vec());
    let mut wrong = lab.config(2);
    wrong.md5_password = Some(b"not-the-secret".to_vec());
    let (s1, mut rx1) = lab.speaker_with(right, 1, vec![bird_peer()]).await;
    let (s2, rx2) = lab.speaker_with(wrong, 2, vec![bird_peer()]).await;
    wait_established(&s1, &[BIRD_V4.parse().unwrap()], T).await;
    wait_routes(&mut rx1, T, "BIRD's routes over the signed session", |r| {
        has(r, "10.244.100.0/24", BIRD_V4)
    })
    .await;
    lab.bird()
        .wait_routes(T, "node 1's routes", |r| bird_has(r, "10.244.1.0/24", "192.168.77.11"))
        .await;
    // Several connection attempts each way (BIRD retries every 2 s, we every second or so).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(s2.established(), Vec::<std::net::IpAddr>::new());
    assert!(rx2.borrow().is_empty());
    assert!(!lab.bird().routes().contains_key("10.244.2.0/24"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bird_as_route_reflector_for_three_speakers() {
    let mut lab = Lab::new(3);
    let mut conf = BirdConf::new(ASN);
    for i in 1..=3 {
        conf = conf.neighbor(node_v4(i), ASN, true);
    }
    lab.start_bird(&conf);
    let started = Instant::now();
    let mut speakers = Vec::new();
    for i in 1..=3 {
        speakers.push(lab.speaker(i, vec![bird_peer()]).await);
    }
    for (n, (_, rx)) in speakers.iter_mut().enumerate() {
        let i = n + 1;
        wait_routes(rx, T, &format!("node {i} learns the others' CIDRs"), |r| {
            (1..=3).filter(|j| *j != i).all(|j| {
                has(r, &format!("10.244.{j}.0/24"), &node_v4(j).to_string())
                    && has(r, &format!("fd00:244:0:{j}::/64"), &node_v6(j).to_string())
            }) && r.len() == 4
        })
        .await;
    }
    eprintln!(
        "route reflector: start of 3 speakers to all routes learned by all: {:?}",
        started.elapsed()
    );
    if std::env::var_os("TRELLIS_BIRD_DEBUG").is_some() {
        eprintln!("{}", lab.bird().log_text());
    }

    // A change on one speaker reaches the others through the reflector.
    let t = Instant::now();
    speakers[0].0.set_exports(
        vec!["10.244.1.0/24".parse().unwrap(), "10.244.11.0/24".parse().unwrap()],
        Some(node_v4(1)),
        Some(node_v6(1)),
    );
    for (_, rx) in speakers.iter_mut().skip(1) {
        wait_routes(rx, T, "the new prefix", |r| has(r, "10.244.11.0/24", "192.168.77.11")).await;
    }
    eprintln!(
        "route reflector: a new prefix reaches both other speakers in {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebgp_top_of_rack_learns_every_node() {
    let mut lab = Lab::new(3);
    let tor_asn = 65001;
    let mut conf = bird_with_statics(tor_asn);
    for i in 1..=3 {
        conf = conf.neighbor(node_v4(i), ASN, false);
    }
    lab.start_bird(&conf);
    let tor = PeerConfig {
        addr: BIRD_V4.parse().unwrap(),
        asn: tor_asn,
        rr_client: false,
    };
    let mut speakers = Vec::new();
    for i in 1..=3 {
        speakers.push(lab.speaker(i, vec![tor.clone()]).await);
    }
    lab.bird()
        .wait_routes(T, "every node's pod CIDRs", |r| {
            (1..=3).all(|i| {
                bird_has(r, &format!("10.244.{i}.0/24"), &node_v4(i).to_string())
                    && bird_has(r, &format!("fd00:244:0:{i}::/64"), &node_v6(i).to_string())
            })
        })
        .await;
    let r = lab.bird().routes();
    assert!(
        r["10.244.2.0/24"].contains("BGP.as_path: 64512"),
        "{}",
        r["10.244.2.0/24"]
    );
    // The ToR's own cluster prefix is learned; the other nodes' prefixes come back from the
    // ToR with our AS in the path and are dropped as loops.
    for (s, rx) in &mut speakers {
        let routes = wait_routes(rx, T, "the ToR's prefixes", |r| {
            has(r, "10.244.100.0/24", BIRD_V4) && has(r, "fd00:244:0:100::/64", BIRD_V6)
        })
        .await;
        assert_eq!(
            routes.keys().map(|p| p.to_string()).collect::<Vec<_>>(),
            ["10.244.100.0/24", "fd00:244:0:100::/64"],
            "{routes:#?}"
        );
        assert_eq!(s.established(), [BIRD_V4.parse::<std::net::IpAddr>().unwrap()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bird_restarts_sessions_come_back() {
    let mut lab = Lab::new(1);
    lab.start_bird(&graceful_bird_for_node_1());
    let (s, mut rx) = lab.speaker(1, vec![bird_peer()]).await;
    let bird_ip = BIRD_V4.parse().unwrap();
    wait_established(&s, &[bird_ip], T).await;
    wait_routes(&mut rx, T, "BIRD's prefix", |r| has(r, "10.244.100.0/24", BIRD_V4)).await;

    // SIGTERM: BIRD says Cease, so its routes go at once.
    lab.bird.as_mut().unwrap().stop(false);
    wait_routes(&mut rx, T, "BIRD's routes gone", |r| r.is_empty()).await;
    let t = Instant::now();
    lab.bird.as_mut().unwrap().spawn(false);
    wait_routes(&mut rx, T, "BIRD's prefix again", |r| {
        has(r, "10.244.100.0/24", BIRD_V4)
    })
    .await;
    eprintln!("BIRD restarted (SIGTERM): routes back after {:?}", t.elapsed());
    lab.bird()
        .wait_routes(T, "our prefix again", |r| bird_has(r, "10.244.1.0/24", "192.168.77.11"))
        .await;

    // SIGKILL: no NOTIFICATION; BIRD negotiated graceful restart, so its routes stay, stale.
    lab.bird.as_mut().unwrap().stop(true);
    let stale = wait_routes(&mut rx, T, "BIRD's routes marked stale", |r| {
        r.values().all(|x| x.stale) && r.len() == 2
    })
    .await;
    assert!(stale.contains_key(&"10.244.100.0/24".parse().unwrap()));
    assert!(s.established().is_empty());
    lab.bird.as_mut().unwrap().spawn(false);
    wait_routes(&mut rx, T, "BIRD's routes fresh again", |r| {
        r.len() == 2 && has(r, "10.244.100.0/24", BIRD_V4)
    })
    .await;
    wait_established(&s, &[bird_ip], T).await;
}

/// After our own restart (the kernel kept its routes) the initial sync, which lets the daemon
/// remove kept routes that no peer announces, waits for the peers' End-of-RIB for the restart
/// wait (default 240 s, BIRD's `graceful restart wait`), not 5 s: a peer unreachable a little
/// longer must not cost routes that still carry traffic. Here BIRD comes back after 7 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_speaker_waits_for_a_peer_back_after_more_than_5_s() {
    let mut lab = Lab::new(1);
    let mut cfg = lab.config(1);
    cfg.restarted = true;
    let started = Instant::now();
    let (s, rx) = lab.speaker_with(cfg, 1, vec![bird_peer()]).await;
    let mut synced = s.synced();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(
        !*synced.borrow(),
        "synced without its peer, {:?} after the start",
        started.elapsed()
    );

    lab.start_bird(&graceful_bird_for_node_1());
    tokio::time::timeout(T, synced.wait_for(|done| *done))
        .await
        .expect("synced once the peer is back")
        .unwrap();
    assert!(
        has(&rx.borrow(), "10.244.100.0/24", BIRD_V4),
        "synced on the peer's End-of-RIB, with its routes: {:#?}",
        *rx.borrow()
    );
}

/// RFC 4724 §4.2 with two routers announcing one prefix: while the one in use (BIRD A, the
/// lower address) restarts gracefully, its path stays in use, stale, instead of moving to router
/// B's fresh path and back once A has re-announced it (every route would move twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_stay_on_a_router_that_restarts_gracefully() {
    let mut lab = Lab::new(2);
    lab.start_bird(&graceful_bird_for_node_1());
    // Router B in node 2's namespace, with the same prefixes.
    let mut b = graceful_bird_for_node_1();
    b.router_id = "192.168.77.12".parse().unwrap();
    (b.local_v4, b.local_v6) = (node_v4(2), node_v6(2));
    let _router_b = Bird::start(lab.node(2), lab.dir.path(), "router_b", &b.render());
    let router_a: std::net::IpAddr = BIRD_V4.parse().unwrap();
    let (s, mut rx) = lab.speaker(1, vec![bird_peer(), node_peer(2)]).await;
    wait_established(&s, &[router_a, node_v4(2)], T).await;
    let p: ipnetwork::IpNetwork = "10.244.100.0/24".parse().unwrap();
    wait_routes(&mut rx, T, "A's path in use", |r| has(r, "10.244.100.0/24", BIRD_V4)).await;

    // Every best route to the prefix from now on.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let (seen, mut routes) = (seen.clone(), s.routes());
        tokio::spawn(async move {
            loop {
                let best = routes.borrow_and_update().get(&p).cloned();
                seen.lock().unwrap().push(best);
                if routes.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    // A restarts gracefully: killed (no NOTIFICATION), back in recovery (R and F bits).
    lab.bird.as_mut().unwrap().stop(true);
    let during = wait_routes(&mut rx, T, "A's session down", |r| {
        r.get(&p).is_some_and(|x| x.stale || x.peer != router_a)
    })
    .await;
    assert_eq!((during[&p].peer, during[&p].stale), (router_a, true), "{during:#?}");
    lab.bird.as_mut().unwrap().spawn(true);
    wait_routes(&mut rx, T, "A's path fresh again", |r| {
        has(r, "10.244.100.0/24", BIRD_V4)
    })
    .await;
    wait_established(&s, &[router_a, node_v4(2)], T).await;
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|r| r.as_ref().is_some_and(|r| r.peer == router_a)),
        "the route moved during A's restart: {seen:#?}"
    );
    eprintln!("best route changes during A's graceful restart: {}", seen.len() - 1);
}

/// What the import policy drops is counted by reason (`trellisd_bgp_routes_dropped_total`):
/// from a top-of-rack router in another AS, node 1 gets a default route per family and a prefix
/// outside the cluster (policy), and node 2's pod CIDRs back with our AS in the path (a loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_policy_drops_are_counted_by_reason() {
    use trellisd::bgp::policy::Rejected;
    let mut lab = Lab::new(2);
    let tor_asn = 65001;
    let conf = bird_with_statics(tor_asn)
        .neighbor(node_v4(1), ASN, false)
        .neighbor(node_v4(2), ASN, false);
    lab.start_bird(&conf);
    let tor = PeerConfig {
        addr: BIRD_V4.parse().unwrap(),
        asn: tor_asn,
        rr_client: false,
    };
    let (_s1, mut rx1) = lab.speaker(1, vec![tor.clone()]).await;
    let (_s2, _rx2) = lab.speaker(2, vec![tor]).await;
    wait_routes(&mut rx1, T, "the ToR's cluster prefixes", |r| {
        has(r, "10.244.100.0/24", BIRD_V4) && has(r, "fd00:244:0:100::/64", BIRD_V6)
    })
    .await;
    let m = lab.metrics(1);
    let count = |r: Rejected| m.bgp_routes_dropped(r).get();
    let want = [
        (Rejected::DefaultRoute, 2),
        (Rejected::OutsideClusterCidrs, 1),
        (Rejected::AsLoop, 2),
    ];
    let t = Instant::now();
    while want.iter().any(|(r, n)| count(*r) < *n) {
        assert!(t.elapsed() < T, "drops by reason: {}", m.render());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for r in [
        Rejected::NextHopIsThisNode,
        Rejected::NextHopUnusable,
        Rejected::OriginatorIsUs,
    ] {
        assert_eq!(count(r), 0, "{r:?}");
    }
    let text = m.render();
    for r in Rejected::ALL {
        let line = format!("trellisd_bgp_routes_dropped_total{{reason=\"{}\"}}", r.label());
        assert!(text.contains(&line), "{line} in\n{text}");
    }
    // Nothing dropped was learned.
    assert_eq!(rx1.borrow().len(), 2, "{:#?}", *rx1.borrow());
}

/// Node 1 and BIRD with `graceful restart on`, peered (iBGP).
fn lab_with_graceful_restart_bird() -> Lab {
    let mut lab = Lab::new(1);
    let mut conf = BirdConf::new(ASN).neighbor(node_v4(1), ASN, false);
    conf.graceful_restart = true;
    lab.start_bird(&conf);
    lab
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_graceful_restart_bird_keeps_our_routes() {
    let mut lab = lab_with_graceful_restart_bird();
    let (s, _rx) = lab.speaker(1, vec![bird_peer()]).await;
    wait_established(&s, &[BIRD_V4.parse().unwrap()], T).await;
    let bird = lab.bird.take().unwrap();
    bird.wait_routes(T, "our prefix", |r| bird_has(r, "10.244.1.0/24", "192.168.77.11"))
        .await;

    // The daemon goes away (as on SIGTERM or a crash): the sessions close without a
    // NOTIFICATION.
    // Waited for, not slept on: how soon BIRD reads the closed connection depends on the load.
    drop(s);
    let t = Instant::now();
    loop {
        let protocol = bird.birdc(&["show", "protocols", "all", "n0"]);
        if protocol.contains("Neighbor graceful restart active") {
            break;
        }
        assert!(
            t.elapsed() < T,
            "BIRD did not see our restart: {protocol}\n{}",
            bird.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = bird.routes();
    assert!(
        bird_has(&during, "10.244.1.0/24", "192.168.77.11"),
        "BIRD dropped our routes during the restart: {during:#?}\n{}",
        bird.log_text()
    );
    let protocol = bird.birdc(&["show", "protocols", "all", "n0"]);
    assert!(!protocol.contains("Established"), "{protocol}");
    assert!(protocol.contains("Neighbor graceful restart active"), "{protocol}");
    eprintln!(
        "during our restart, BIRD holds: {}\n{protocol}",
        during["10.244.1.0/24"]
    );

    // Back, as a restart: R and F bits, End-of-RIB after our routes.
    // This time without the IPv6 CIDR: it goes at our End-of-RIB, the other is refreshed.
    let mut cfg = lab.config(1);
    cfg.restarted = true;
    let exports = vec!["10.244.1.0/24".parse().unwrap()];
    let (s, _rx) = lab.speaker_exporting(cfg, exports, 1, vec![bird_peer()]).await;
    wait_established(&s, &[BIRD_V4.parse().unwrap()], T).await;
    bird.wait_routes(T, "only the refreshed prefix", |r| {
        bird_has(r, "10.244.1.0/24", "192.168.77.11") && !r.contains_key("fd00:244:0:1::/64")
    })
    .await;
    let after = bird.routes();
    assert!(!after["10.244.1.0/24"].contains("stale"), "{after:#?}");
    drop(s);
    drop(bird);
}

/// RFC 4724 §3: the Restart State bit of the graceful-restart capability says "this speaker has
/// restarted". It is in the OPENs of our restart, until the initial sync is done; a session that
/// comes up later (here BIRD restarts the protocol) is no restart of ours and goes without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_state_bit_only_in_the_opens_of_our_restart() {
    let lab = lab_with_graceful_restart_bird();
    let mut cfg = lab.config(1);
    cfg.restarted = true;
    let (s, _rx) = lab.speaker_with(cfg, 1, vec![bird_peer()]).await;
    wait_established(&s, &[BIRD_V4.parse().unwrap()], T).await;
    let protocol = lab.bird().birdc(&["show", "protocols", "all", "n0"]);
    assert!(
        protocol.contains("Restart recovery"),
        "R bit in our restart's OPEN: {protocol}"
    );
    tokio::time::timeout(T, s.synced().wait_for(|done| *done))
        .await
        .expect("initial sync")
        .unwrap();

    lab.bird().birdc(&["restart", "n0"]);
    let t = Instant::now();
    loop {
        let protocol = lab.bird().birdc(&["show", "protocols", "all", "n0"]);
        if protocol.contains("Established") && !protocol.contains("Restart recovery") {
            break;
        }
        assert!(
            t.elapsed() < T,
            "the session after our restart: established without the R bit: {protocol}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_prefixes_from_bird() {
    let mut lab = Lab::new(1);
    let mut conf = BirdConf::new(ASN).neighbor(node_v4(1), ASN, false);
    conf.statics = (0..10_000u32)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        .collect();
    lab.start_bird(&conf);
    // Wait until BIRD has them all in its table.
    let t = Instant::now();
    while lab.bird().count() < 10_000 {
        assert!(t.elapsed() < T, "BIRD holds {} routes", lab.bird().count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cfg = lab.config(1);
    cfg.import_within = vec!["10.0.0.0/8".parse().unwrap()];
    let started = Instant::now();
    let (s, mut rx) = lab.speaker_with(cfg, 1, vec![bird_peer()]).await;
    wait_established(&s, &[BIRD_V4.parse().unwrap()], T).await;
    let established = started.elapsed();
    wait_routes(&mut rx, T, "10,000 prefixes", |r| r.len() == 10_000).await;
    eprintln!(
        "10,000 prefixes from BIRD: session up {established:?} after start, all learned {:?} after start",
        started.elapsed()
    );
    if std::env::var_os("TRELLIS_BIRD_DEBUG").is_some() {
        eprintln!("{}", lab.bird().log_text());
    }
}

/// Issue 13, per-peer metrics: BIRD announces three prefixes, one outside the cluster CIDRs; we
/// advertise one. Then BIRD is killed (a flap), and the peer is removed (its series go).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_peer_metrics_follow_the_session() {
    let mut lab = Lab::new(1);
    let mut conf = BirdConf::new(ASN).neighbor(node_v4(1), ASN, false);
    conf.statics = vec![
        "10.244.100.0/24".into(),
        "10.244.101.0/24".into(),
        "172.16.5.0/24".into(),
    ];
    lab.start_bird(&conf);
    let exports = vec!["10.244.1.0/24".parse().unwrap()];
    let (s, mut rx) = lab
        .speaker_exporting(lab.config(1), exports, 1, vec![bird_peer()])
        .await;
    wait_established(&s, &[BIRD_V4.parse().unwrap()], T).await;
    wait_routes(&mut rx, T, "BIRD's two cluster prefixes", |r| {
        has(r, "10.244.100.0/24", BIRD_V4) && has(r, "10.244.101.0/24", BIRD_V4)
    })
    .await;
    let m = lab.metrics(1).clone();
    wait_peer_metrics(&m, BIRD_V4, T, "the established session's figures", |get| {
        get("state") == Some(6.0)
            && get("established") == Some(1.0)
            && get("prefixes_received") == Some(3.0)
            && get("prefixes_accepted") == Some(2.0)
            && get("prefixes_advertised") == Some(1.0)
            && get("updates_received_total").is_some_and(|n| n >= 1.0)
            && get("updates_sent_total").is_some_and(|n| n >= 1.0)
            && get("flaps_total") == Some(0.0)
    })
    .await;
    let text = m.render();
    let line = format!("trellisd_bgp_peer_state{{peer=\"{BIRD_V4}\",asn=\"{ASN}\"}} 6");
    assert!(text.contains(&line), "{line} in\n{text}");

    // BIRD killed: the session goes down from Established, once.
    lab.bird.as_mut().unwrap().stop(true);
    wait_peer_metrics(&m, BIRD_V4, T, "the session down", |get| {
        get("established") == Some(0.0)
            && get("state").is_some_and(|s| s < 6.0)
            && get("flaps_total") == Some(1.0)
            && get("prefixes_received") == Some(0.0)
            && get("prefixes_accepted") == Some(0.0)
            && get("prefixes_advertised") == Some(0.0)
    })
    .await;

    // De-configured: its series go.
    s.set_peers(vec![]);
    let t = Instant::now();
    while m.render().contains(&format!("peer=\"{BIRD_V4}\"")) {
        assert!(t.elapsed() < T, "the removed peer's series stay:\n{}", m.render());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 13, per-peer TCP MD5 passwords (Calico's BGPPeer `password.secretKeyRef`): BIRD has a
/// password per session. Node 1 uses its peer's password and establishes; node 2 first has a
/// wrong one (no session), then the right one (re-keyed, it establishes), then both sides
/// rotate to a new one and the session comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_peer_passwords_wrong_one_refused_rotation_reconnects() {
    let mut lab = Lab::new(2);
    let mut conf = bird_with_statics(ASN)
        .neighbor(node_v4(1), ASN, false)
        .neighbor(node_v4(2), ASN, false);
    conf.neighbor_passwords.insert(node_v4(1), "alpha-X".into());
    conf.neighbor_passwords.insert(node_v4(2), "bravo-Y".into());
    lab.start_bird(&conf);
    let bird_ip: std::net::IpAddr = BIRD_V4.parse().unwrap();
    let password = |p: &str| std::collections::HashMap::from([(bird_ip, p.as_bytes().to_vec())]);

    // Passwords before peers: the first connection is already signed.
    let (s1, mut rx1) = lab.speaker_with(lab.config(1), 1, vec![]).await;
    s1.set_passwords(password("alpha-X"));
    s1.set_peers(vec![bird_peer()]);
    let (s2, mut rx2) = lab.speaker_with(lab.config(2), 2, vec![]).await;
    s2.set_passwords(password("not-bravo"));
    s2.set_peers(vec![bird_peer()]);
    wait_established(&s1, &[bird_ip], T).await;
    wait_routes(&mut rx1, T, "BIRD's routes over node 1's session", |r| {
        has(r, "10.244.100.0/24", BIRD_V4)
    })
    .await;
    // Several connection attempts each way (BIRD retries every 2 s, we every second or so).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(s2.established().is_empty());
    assert!(rx2.borrow().is_empty());
    assert_eq!(peer_metric(lab.metrics(2), "established", BIRD_V4), Some(0.0));
    assert!(!lab.bird().routes().contains_key("10.244.2.0/24"));

    // The right password: the listening socket is re-keyed and the peer reconnects.
    s2.set_passwords(password("bravo-Y"));
    wait_established(&s2, &[bird_ip], T).await;
    wait_routes(&mut rx2, T, "BIRD's routes over node 2's session", |r| {
        has(r, "10.244.100.0/24", BIRD_V4)
    })
    .await;
    lab.bird()
        .wait_routes(T, "both nodes' routes", |r| {
            bird_has(r, "10.244.1.0/24", "192.168.77.11") && bird_has(r, "10.244.2.0/24", "192.168.77.12")
        })
        .await;

    // Rotation: BIRD's side first (it restarts its session to node 2, which stays down: the
    // passwords differ), then ours.
    let flaps = peer_metric(lab.metrics(2), "flaps_total", BIRD_V4).unwrap();
    conf.neighbor_passwords.insert(node_v4(2), "charlie-Z".into());
    lab.bird().reconfigure(&conf.render());
    wait_peer_metrics(lab.metrics(2), BIRD_V4, T, "node 2's session down", |get| {
        get("established") == Some(0.0) && get("flaps_total") == Some(flaps + 1.0)
    })
    .await;
    s2.set_passwords(password("charlie-Z"));
    wait_peer_metrics(lab.metrics(2), BIRD_V4, T, "node 2 back with the new password", |get| {
        get("established") == Some(1.0)
    })
    .await;
    wait_routes(&mut rx2, T, "BIRD's routes again", |r| {
        has(r, "10.244.100.0/24", BIRD_V4)
    })
    .await;
    // Node 1's session was never touched.
    assert_eq!(peer_metric(lab.metrics(1), "flaps_total", BIRD_V4), Some(0.0));
    assert_eq!(s1.established(), [bird_ip]);
}
