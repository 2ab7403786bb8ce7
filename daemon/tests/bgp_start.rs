//! The BGP speaker's start inside the real `trellisd`: what a failed start leaves behind.

use std::path::Path;
use std::time::{Duration, Instant};
use trellis_tests::cluster::Cluster;

const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "ASNumber": 64512, "HoldTime": 9}}"#;

/// The CNI config tells the kubelet that the node is ready for pods, so it is written last. A
/// daemon whose BGP speaker cannot start (here its port is taken in the node's namespace) exits
/// without one: a node that crash-loops must not look ready.
#[test]
fn failed_bgp_start_leaves_no_cni_config() {
    let trellisd = Path::new(env!("CARGO_BIN_EXE_trellisd"));
    let mut c = Cluster::new(1, NET_CONF, trellisd, &["--lease-ttl", "10"]);
    // It started once (it wrote its CNI config); now it starts as on a fresh node, but another
    // process holds the BGP port.
    c.stop_daemon(0);
    let conf = c.nodes[0].dir.join("10-trellis.conflist");
    std::fs::remove_file(&conf).expect("the first start's CNI config");
    let _taken = trellis_net::netns::run_in(c.nodes[0].ns.path(), || std::net::TcpListener::bind("0.0.0.0:179"))
        .expect("enter the node's namespace")
        .expect("hold port 179");
    let first_run = c.log(0).len();
    c.start_daemon(0);
    let t = Instant::now();
    let status = loop {
        let child = &mut c.nodes[0].daemon.as_mut().expect("started").child;
        if let Some(status) = child.try_wait().expect("wait for trellisd") {
            break status;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "trellisd still runs without its BGP port; log:\n{}",
            c.log(0)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = c.log(0)[first_run..].to_string();
    assert!(!status.success(), "{log}");
    assert!(log.contains("BGP: "), "the BGP start failed: {log}");
    assert!(
        !conf.exists(),
        "a CNI config written by a daemon whose BGP speaker did not start:\n{log}"
    );
}
