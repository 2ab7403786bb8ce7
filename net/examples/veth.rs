//! A pod's veth, the way the `trellis` plugin wires it (run as root):
//! `cargo run -p trellis-net --example veth`
//!
//! Makes a "host" and a "pod" namespace (deleted at exit), creates a veth whose peer is born in
//! the pod as `eth0`, gives the pod an address and a default route through the host end, and
//! turns on proxy ARP on the host end, then prints both sides.

use trellis_net::netns::{run_in, NetnsGuard, NetnsRef};
use trellis_net::route::RT_TABLE_MAIN;
use trellis_net::{sysctl, AddressOptions, NetError, Netlink, Route, RouteFilter, VethConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), NetError> {
    let host_ns = NetnsGuard::create("example-host")?;
    let pod_ns = NetnsGuard::create("example-pod")?;
    let host = Netlink::connect_in(host_ns.path())?;
    let pod = Netlink::connect_in(pod_ns.path())?;

    // One message: the peer never exists on the host, so its name cannot clash there.
    let cfg = VethConfig::new("veth-pod1", "eth0")
        .peer_netns(NetnsRef::Path(pod_ns.path()))
        .mtu(1450);
    let host_end = host.create_veth(&cfg).await?;
    host.set_link_up(host_end.index).await?;
    let name = host_end.name.clone();
    run_in(host_ns.path(), || sysctl::set_proxy_arp(&name, true))??;

    // Inside the pod: look eth0 up again by name, address it, route everything via 169.254.1.1.
    let eth0 = pod.link_by_name("eth0").await?.expect("eth0 was created in the pod");
    pod.add_address(eth0.index, "10.244.0.5/32".parse().unwrap()).await?;
    let nodad = AddressOptions {
        nodad: true,
        ..Default::default()
    };
    pod.add_address_with(eth0.index, "fd00:244::5/128".parse().unwrap(), nodad)
        .await?;
    pod.set_link_up(eth0.index).await?;
    let gateway = "169.254.1.1".parse().unwrap();
    pod.add_route(&Route::new("169.254.1.1/32".parse().unwrap()).dev(eth0.index))
        .await?;
    pod.add_route(&Route::new("0.0.0.0/0".parse().unwrap()).via(gateway).dev(eth0.index))
        .await?;
    // and a /32 route to the pod on the host side
    host.add_route(&Route::new("10.244.0.5/32".parse().unwrap()).dev(host_end.index))
        .await?;

    println!("host: {host_end:?}");
    println!("pod:  {eth0:?}");
    for a in pod.addresses(eth0.index).await? {
        println!("pod address {} (tentative: {})", a.address, a.is_tentative());
    }
    let main_table = RouteFilter {
        table: Some(RT_TABLE_MAIN),
        ..Default::default()
    };
    for r in pod.routes(&main_table).await? {
        println!(
            "pod route {} via {:?} dev {:?} table {}",
            r.destination, r.gateway, r.oif, r.table
        );
    }
    Ok(())
}
