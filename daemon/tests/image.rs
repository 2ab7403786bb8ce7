//! The image, end to end: `scripts/build-image` builds the static binaries and the FROM-scratch
//! image with podman; trellisd runs from it; the DaemonSet's init container, run from the image
//! exactly as `manifests/trellis.yaml` gives it (command and host-path mount), copies the
//! plugins into a host folder; and there the plugins run on the host (CNI `VERSION`) and are
//! static (no program interpreter), so they run whatever libc the node has.
//!
//! Skips (passes, with a reason on stderr) where podman is not installed. The static release
//! build is a full build of its own: minutes from a cold cache, no time limit here.

use k8s_openapi::api::apps::v1::DaemonSet;
use serde::Deserialize;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use trellis_tests::{require_root, unique_name, TempDir};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Removes the test's image tag when the test ends, pass or fail. The build may reuse the
/// layers of an image the user built (same binaries, same image ID): removing our tag then
/// only untags, and the user's image stays.
struct ImageGuard(String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "--force", &self.0]).output();
    }
}

fn check(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `podman run --rm --network none`, and what makes it run in restricted places:
/// - `--ulimit`: as root podman sets the container's limits to 1048576 open files and 32768
///   processes; where CAP_SYS_RESOURCE is dropped (some VMs and CI sandboxes, the development
///   VM) the runtime fails with "setrlimit: Operation not permitted". Limits of 1024 are set
///   there without complaint, and these one-shot commands need few files and no processes.
/// - `--runtime runc` when runc is installed: Debian 12's crun (1.8) refuses hosts whose cgroups
///   are "hybrid" (v1 controllers plus one on the v2 mount: "cgroups in hybrid mode not
///   supported"), which some VMs are (the development VM); runc runs there.
fn podman_run() -> Command {
    let mut c = Command::new("podman");
    if Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        c.args(["--runtime", "runc"]);
    }
    c.args([
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ]);
    c
}

/// The init container that installs the plugins, from the manifest.
fn install_cni_container() -> k8s_openapi::api::core::v1::Container {
    let text = std::fs::read_to_string(repo_root().join("manifests/trellis.yaml")).unwrap();
    let ds: DaemonSet = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .find(|d| d["kind"].as_str() == Some("DaemonSet"))
        .map(|d| serde_yaml::from_value(d).unwrap())
        .expect("a DaemonSet in manifests/trellis.yaml");
    ds.spec
        .template
        .spec
        .unwrap()
        .init_containers
        .unwrap()
        .into_iter()
        .find(|c| c.name == "install-cni")
        .expect("an install-cni init container")
}

/// Whether an ELF executable names a program interpreter (PT_INTERP): a dynamically linked one
/// does (ld-linux, which a musl or foreign-glibc host may not have); a static one, static-pie
/// included, does not.
fn has_interpreter(elf: &[u8]) -> bool {
    assert!(elf.len() > 64 && &elf[..4] == b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    assert_eq!(elf[5], 1, "not little-endian");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// Runs a plugin as a runtime asks for its versions: only CNI_COMMAND, the config on stdin.
fn cni_version(plugin: &Path) -> Value {
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", plugin.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"cniVersion":"1.0.0"}"#)
        .unwrap();
    let out = check(
        &format!("{} VERSION", plugin.display()),
        &child.wait_with_output().unwrap(),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}: {e}: {out}", plugin.display()))
}

#[test]
fn the_image_runs_trellisd_and_installs_static_plugins() {
    if Command::new("podman").arg("--version").output().is_err() {
        eprintln!("skipped: podman is not installed (apt-get install podman); the image is not built");
        return;
    }
    require_root();
    let root = repo_root();

    // A tag of our own, so that the user's trellis image is never replaced or removed.
    let image = format!("localhost/trellis-test:{}", unique_name("t"));
    let _image = ImageGuard(image.clone());
    let out = Command::new(root.join("scripts/build-image"))
        .arg(&image)
        .output()
        .unwrap();
    let printed = check("scripts/build-image", &out);
    assert!(printed.contains(&image), "{printed}");

    let version = check(
        "trellisd --version",
        &podman_run().arg(&image).arg("--version").output().unwrap(),
    );
    assert_eq!(version.trim(), format!("trellisd {}", env!("CARGO_PKG_VERSION")));

    // The init container as the DaemonSet runs it: its command, its host-path mount.
    let init = install_cni_container();
    let argv = init.command.unwrap();
    let mount = init
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == "cni-bin")
        .expect("the cni-bin mount")
        .mount_path;
    let host = TempDir::new("image");
    let out = podman_run()
        .arg("-v")
        .arg(format!("{}:{mount}", host.path().display()))
        .arg("--entrypoint")
        .arg(&argv[0])
        .arg(&image)
        .args(&argv[1..])
        .output()
        .unwrap();
    check(&format!("install-cni ({argv:?})"), &out);

    let built = root.join("target/x86_64-unknown-linux-gnu/release");
    for name in trellisd::install::PLUGINS {
        let plugin = host.path().join(name);
        let bytes = std::fs::read(&plugin).unwrap_or_else(|e| panic!("{}: {e}", plugin.display()));
        assert_eq!(
            bytes,
            std::fs::read(built.join(name)).unwrap(),
            "{name} in the image is not what scripts/build-static built"
        );
        assert!(!has_interpreter(&bytes), "{name} is dynamically linked");
        let v = cni_version(&plugin);
        assert_eq!(v["cniVersion"], "1.0.0", "{name}: {v}");
        let supported = v["supportedVersions"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: {v}"));
        assert!(supported.iter().any(|s| s == "1.0.0"), "{name}: {v}");
    }
}

#[test]
fn the_interpreter_check_tells_dynamic_from_static() {
    // This test binary itself is dynamically linked (cargo test builds without crt-static).
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert!(has_interpreter(&me));
}
