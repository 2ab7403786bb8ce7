//! `trellisd install-cni`: the init container's job. Copies the plugin binaries into the host's
//! CNI bin folder so that a kubelet running a plugin never sees half a binary: each is written
//! under a temporary name in the destination folder, synced, made executable, then renamed over
//! the old one (atomic on one filesystem). A binary that is already identical is left alone, so
//! running it again (every pod restart, every upgrade) is cheap and changes nothing.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// What `install-cni` installs by default.
pub const PLUGINS: &[&str] = &["trellis", "trellis-ipam"];

/// Copies each of `names` from `from` to `to`; returns the names it wrote (not those already
/// identical).
pub fn install(from: &Path, to: &Path, names: &[&str]) -> std::io::Result<Vec<String>> {
    fs::create_dir_all(to)?;
    let mut written = Vec::new();
    for name in names {
        let src = from.join(name);
        let bytes = fs::read(&src).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        let dst = to.join(name);
        let same = fs::read(&dst).is_ok_and(|old| old == bytes)
            && fs::metadata(&dst).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
        if same {
            continue;
        }
        let tmp = to.join(format!(".{name}.trellis-tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &dst).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        written.push(name.to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_atomically_and_only_what_changed() {
        let base = std::env::temp_dir().join(format!("trellisd-install-{}", std::process::id()));
        let (from, to) = (base.join("from"), base.join("to"));
        fs::create_dir_all(&from).unwrap();
        fs::write(from.join("trellis"), b"v1-plugin").unwrap();
        fs::write(from.join("trellis-ipam"), b"v1-ipam").unwrap();
        assert_eq!(install(&from, &to, PLUGINS).unwrap(), ["trellis", "trellis-ipam"]);
        assert_eq!(
            fs::metadata(to.join("trellis")).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // Again: nothing to do.
        assert!(install(&from, &to, PLUGINS).unwrap().is_empty());
        // An upgrade of one binary rewrites that one only, and leaves no temporary file.
        fs::write(from.join("trellis"), b"v2-plugin").unwrap();
        assert_eq!(install(&from, &to, PLUGINS).unwrap(), ["trellis"]);
        assert_eq!(fs::read(to.join("trellis")).unwrap(), b"v2-plugin");
        let names: Vec<_> = fs::read_dir(&to).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A missing source is an error naming the file.
        let e = install(&from, &to, &["nope"]).unwrap_err();
        assert!(e.to_string().contains("nope"));
        fs::remove_dir_all(base).unwrap();
    }
}
