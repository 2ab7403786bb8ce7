fn main() {
    trellis_cni::skel::run(trellis_plugin::TrellisPlugin)
}
