//! The `trellis` CNI plugin. Not built yet (issue 3): see README's status table.
fn main() {
    eprintln!("the trellis plugin is not implemented yet; see README.md");
    std::process::exit(1);
}
