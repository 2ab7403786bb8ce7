//! `trellisd`, the node daemon. Not built yet: see README's status table (issue 4).
fn main() {
    eprintln!("trellisd is not implemented yet; see README.md");
    std::process::exit(1);
}
