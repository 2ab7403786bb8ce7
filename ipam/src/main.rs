fn main() {
    trellis_cni::skel::run(trellis_ipam::IpamPlugin::new())
}
