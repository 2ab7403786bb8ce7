//! `trellisd`, the node daemon. Being written (issue 4): see README's status table.
fn main() {
    eprintln!("trellisd is not implemented yet; see README.md");
    std::process::exit(1);
}
