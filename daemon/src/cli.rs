//! trellisd's command line: the flags, and the one subcommand (`install-cni`). In the library
//! so that tests and tools parse it as the daemon does.

use clap::{Parser, ValueEnum};
use ipnetwork::IpNetwork;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::cniconf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DatastoreKind {
    Etcd,
    Kube,
    None,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Copy the CNI plugin binaries into the host's CNI bin folder, atomically (the init
    /// container's job), and exit.
    InstallCni {
        /// Where the image keeps the binaries.
        #[arg(long, default_value = "/opt/trellis/bin")]
        from: PathBuf,
        /// The host's CNI bin folder, as mounted in the container.
        #[arg(long, default_value = "/host/opt/cni/bin")]
        to: PathBuf,
    },
}

#[derive(Parser, Debug)]
#[command(name = "trellisd", version, about = "The Trellis node daemon")]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
    /// This node's name (its key in the datastore).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// flannel-style net-conf.json.
    #[arg(long, default_value = "/etc/trellis/net-conf.json")]
    pub net_conf: PathBuf,
    /// The interface other nodes reach this one by (default: the default route's).
    #[arg(long)]
    pub underlay_iface: Option<String>,
    /// The address other nodes reach this one by (default: the underlay interface's first).
    #[arg(long)]
    pub underlay_ip: Option<IpAddr>,
    #[arg(long, value_enum, default_value = "etcd")]
    pub datastore: DatastoreKind,
    /// etcd endpoints, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    #[arg(long, default_value = "/trellis/leases/")]
    pub etcd_prefix: String,
    /// PEM CA certificate that signed etcd's serving certificate (endpoints must be https://).
    #[arg(long, value_name = "PATH")]
    pub etcd_cafile: Option<PathBuf>,
    /// PEM client certificate for an etcd that requires one (with --etcd-keyfile).
    #[arg(long, value_name = "PATH")]
    pub etcd_certfile: Option<PathBuf>,
    /// The client certificate's PEM key.
    #[arg(long, value_name = "PATH")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user (with --etcd-password-file), for an etcd with authentication on.
    #[arg(long)]
    pub etcd_username: Option<String>,
    /// A file holding the etcd user's password (a mounted Secret's key; trailing newline ignored).
    #[arg(long, value_name = "PATH")]
    pub etcd_password_file: Option<PathBuf>,
    /// Seconds a lease outlives its node when the node stops renewing it.
    #[arg(long, default_value_t = 30)]
    pub lease_ttl: u64,
    /// A kubeconfig for `--datastore kube` (default: in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The node's pod CIDR(s) with `--datastore none`.
    #[arg(long)]
    pub pod_cidr: Vec<IpNetwork>,
    /// Where /healthz and /metrics are served.
    #[arg(long, default_value = "127.0.0.1:9909")]
    pub listen: SocketAddr,
    /// The CNI config to write.
    #[arg(long, default_value = cniconf::DEFAULT_PATH)]
    pub cni_conf: PathBuf,
    /// Where the daemon keeps what it must remember across its restarts (the pod CIDRs it held).
    #[arg(long, default_value = crate::state::DEFAULT_DIR)]
    pub state_dir: PathBuf,
    /// The trellis plugin's mode in the CNI config: bridge or routed.
    #[arg(long, default_value = "bridge")]
    pub cni_mode: trellis_plugin::config::Mode,
    /// trellis-ipam's dataDir in the CNI config (its default when not given).
    #[arg(long)]
    pub ipam_data_dir: Option<PathBuf>,
    /// Do not ask the runtime for pods' hostPorts (the `portMappings` capability) in the CNI
    /// config.
    #[arg(long, alias = "no-portmap")]
    pub no_hostport: bool,
    /// Turn the plugin's anti-spoofing off in the CNI config (`"antiSpoofing": false`): pods
    /// may then send with any source address and MAC. For clusters whose pods route other
    /// networks (see docs/security.md); on by default.
    #[arg(long)]
    pub no_anti_spoofing: bool,
    /// NetworkPolicy: log each new connection the policy drops, with its pod, peer, port and
    /// the policy side that refused it (rate-limited: one line per connection attempt and
    /// 10 s, at most 10 lines a second). Off by default: a scanner makes many.
    #[arg(long)]
    pub policy_log_drops: bool,
    /// BGP mode: after a restart of trellisd (the kernel kept its routes), the longest wait in
    /// seconds for the peers' End-of-RIB before the kept routes that no peer announced go; an
    /// unreachable peer holds them this long. BIRD's `graceful restart wait` (240).
    #[arg(long, default_value_t = 240)]
    pub bgp_restart_wait: u64,
    /// BGP mode: once a peer that restarted gracefully is back, the longest wait in seconds
    /// for its End-of-RIB before its stale routes (still in use) go.
    #[arg(long, default_value_t = 240)]
    pub bgp_stale_path_time: u64,
    /// BGP mode: a file holding the TCP MD5 (RFC 2385) password of every BGP session (the
    /// node mesh, route reflectors, external peers), e.g. a mounted Secret's key; one trailing
    /// newline ignored, 1 to 80 bytes. Every node and peer must have the same one.
    #[arg(long)]
    pub bgp_password_file: Option<PathBuf>,
    /// BGP mode: this node's BGP identifier (an IPv4 address, unique among the speakers of an
    /// AS). By default the node's IPv4 underlay address, else an IPv4 address on the underlay
    /// link, else (an IPv6-only underlay) the low 32 bits of its IPv6 underlay address: unique
    /// among nodes numbered within one /96, as static and EUI-64 plans are. Give it on a node
    /// whose IPv6-only address plan does not guarantee that.
    #[arg(long, env = "BGP_ROUTER_ID")]
    pub bgp_router_id: Option<std::net::Ipv4Addr>,
    /// BGP mode: this node's AS number instead of the net-conf's `ASNumber` (Calico's per-node
    /// `bgp.asNumber`: an AS per node or per rack behind eBGP top-of-rack routers). Published in
    /// the node's lease: the mesh peers it in this AS.
    #[arg(long, env = "BGP_AS_NUMBER")]
    pub bgp_as_number: Option<u32>,
    /// BGP mode: make this node a BGP route reflector (RFC 4456) with this cluster ID (an IPv4
    /// address, as Calico's `routeReflectorClusterID`). It is published in the node's lease;
    /// with `"Mesh": false` every other node peers with the reflectors (their clients), and
    /// the reflectors with every node (see the README's bgp backend). Reflectors should share
    /// one cluster ID.
    #[arg(long, env = "TRELLIS_BGP_ROUTE_REFLECTOR_CLUSTER_ID")]
    pub bgp_route_reflector_cluster_id: Option<std::net::Ipv4Addr>,
    /// Seconds between full resyncs with the kernel.
    #[arg(long, default_value_t = 30)]
    pub resync: u64,
    /// Program plain routes, each with its own gateway, even where the kernel has nexthop
    /// objects (Linux 5.3+; by default routes go by nexthop object, which the kernel inserts in
    /// flat time however many nodes there are). Nexthops left from an earlier run are removed.
    #[arg(long)]
    pub no_nexthop_objects: bool,
}

impl Args {
    /// The etcd TLS and authentication options.
    pub fn etcd_security(&self) -> crate::datastore::etcd::Security {
        crate::datastore::etcd::Security {
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password_file: self.etcd_password_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_as_given_and_a_bad_mode_is_refused() {
        let a = Args::try_parse_from(["trellisd", "--datastore=kube", "--cni-mode", "routed", "--no-portmap"]).unwrap();
        assert_eq!(a.cni_mode, trellis_plugin::config::Mode::Routed);
        assert!(a.no_hostport, "--no-portmap is the older name of --no-hostport");
        let a = Args::try_parse_from([
            "trellisd",
            "--etcd-cafile=/s/ca.pem",
            "--etcd-certfile=/s/cert.pem",
            "--etcd-keyfile=/s/key.pem",
            "--etcd-username=trellis",
            "--etcd-password-file=/s/password",
        ])
        .unwrap();
        let sec = a.etcd_security();
        assert_eq!(sec.ca_file.as_deref(), Some(std::path::Path::new("/s/ca.pem")));
        assert_eq!(sec.key_file.as_deref(), Some(std::path::Path::new("/s/key.pem")));
        assert_eq!(sec.username.as_deref(), Some("trellis"));
        let a = Args::try_parse_from(["trellisd", "--bgp-route-reflector-cluster-id", "1.0.0.1"]).unwrap();
        assert_eq!(a.bgp_route_reflector_cluster_id, Some("1.0.0.1".parse().unwrap()));
        assert!(Args::try_parse_from(["trellisd", "--bgp-route-reflector-cluster-id", "1.0.0"]).is_err());
        let e = Args::try_parse_from(["trellisd", "--cni-mode", "bogus"]).unwrap_err();
        assert!(e.to_string().contains("bridge or routed"), "{e}");
    }
}
