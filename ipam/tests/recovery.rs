//! Crashes, stale locks and reboots.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant, SystemTime};
use trellis_tests::{require_root, TempDir};

#[test]
fn a_lock_held_by_a_killed_process_does_not_block_the_next_add() {
    require_root();
    let dir = TempDir::new("rec");
    let conf = config(
        "1.0.0",
        "lk",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.50.0.0/24"}),
    );
    call(&ipam_bin(), "ADD", &conf, "c0").ok();
    // A process takes the store's lock (as a plugin mid-ADD would) and is killed with SIGKILL.
    let lock = dir.path().join("lk/lock");
    // (One process: `flock FILE sleep` would leave the lock with its `sleep` child.)
    let mut holder = std::process::Command::new("python3")
        .args(["-c", "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(300)"])
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "held");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let t = Instant::now();
    call(&ipam_bin(), "ADD", &conf, "c1").ok();
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the next ADD waited on a dead process's lock"
    );
}

#[test]
fn a_reservation_left_by_a_crash_before_the_index_is_found_by_del() {
    require_root();
    let dir = TempDir::new("rec");
    let conf = config(
        "1.0.0",
        "crash",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.51.0.0/24"}),
    );
    call(&ipam_bin(), "ADD", &conf, "c0").ok();
    // What a plugin killed between the reservation and its bookkeeping leaves: a reservation
    // file with no index entry and no recorded state, plus a half-written temp file.
    std::fs::write(dir.path().join("crash/10.51.0.77"), "c1\r\neth0").unwrap();
    std::fs::write(dir.path().join("crash/.trellis/tmp-reservation"), "c9\r\neth0").unwrap();
    call(&ipam_bin(), "DEL", &conf, "c1").ok();
    assert!(!reserved(dir.path(), "crash").contains("10.51.0.77"));
    // An index entry pointing at an address someone else now holds never releases it.
    std::fs::write(dir.path().join("crash/.trellis/index/c5:eth0"), "10.51.0.2\n").unwrap();
    call(&ipam_bin(), "DEL", &conf, "c5").ok();
    assert!(reserved(dir.path(), "crash").contains("10.51.0.2"));
}

#[test]
fn reservations_from_before_a_reboot_are_released_simulated_by_an_old_boot_id() {
    // A real reboot cannot run in a test: this one plays what a reboot leaves on disk. The
    // store's state names another boot ID, and the reservation files are older than this boot.
    require_root();
    let dir = TempDir::new("rec");
    let conf = config(
        "1.0.0",
        "boot",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.52.0.0/24"}),
    );
    for i in 0..3 {
        call(&ipam_bin(), "ADD", &conf, &format!("old{i}")).ok();
    }
    let state = dir.path().join("boot/.trellis/state");
    let s = std::fs::read_to_string(&state).unwrap();
    let s = s
        .lines()
        .map(|l| {
            if l.starts_with("boot_id=") {
                "boot_id=00000000-previous-boot".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&state, s).unwrap();
    let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    for ip in reserved(dir.path(), "boot") {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.path().join("boot").join(ip))
            .unwrap();
        f.set_modified(long_ago).unwrap();
    }
    // One reservation made by host-local after this boot but before trellis ran must survive.
    std::fs::write(dir.path().join("boot/10.52.0.200"), "fresh\r\neth0").unwrap();
    let new = call(&ipam_bin(), "ADD", &conf, "new").ips();
    let left = reserved(dir.path(), "boot");
    assert!(
        left.contains("10.52.0.200"),
        "a reservation from this boot was released"
    );
    assert!(left.contains(&new[0]));
    assert_eq!(left.len(), 2, "pre-boot reservations leaked: {left:?}");
}

#[test]
fn plugins_killed_at_random_moments_leave_whole_reservations_that_del_removes() {
    require_root();
    let dir = TempDir::new("rec");
    let conf = config(
        "1.0.0",
        "kill",
        dir.path(),
        "trellis-ipam",
        json!({"ranges": [[{"subnet": "10.53.0.0/24"}], [{"subnet": "fd00:53::/64"}]]}),
    );
    // A cheap deterministic spread of kill delays from 0 to ~4 ms.
    for i in 0..60u64 {
        let mut child = trellis_tests::CniCall::new(ipam_bin(), "ADD", conf.clone())
            .container(&format!("k{i}"))
            .netns("/x")
            .spawn();
        std::thread::sleep(Duration::from_micros((i * 7919) % 4000));
        let _ = child.kill();
        let _ = child.wait();
    }
    for ip in reserved(dir.path(), "kill") {
        let content = std::fs::read_to_string(dir.path().join("kill").join(&ip)).unwrap();
        let (id, ifname) = content
            .split_once("\r\n")
            .unwrap_or_else(|| panic!("{ip}: torn reservation {content:?}"));
        assert!(id.starts_with('k') && ifname == "eth0", "{ip}: {content:?}");
    }
    for i in 0..60 {
        call(&ipam_bin(), "DEL", &conf, &format!("k{i}")).ok();
    }
    assert!(
        reserved(dir.path(), "kill").is_empty(),
        "DEL left {:?}",
        reserved(dir.path(), "kill")
    );
}

#[test]
fn an_add_whose_calling_plugin_was_killed_reserves_nothing() {
    // The calling plugin here is a shell, which (like a Go plugin) does nothing to take its
    // children down with it: trellis-ipam itself must notice, under the store's lock, that the
    // plugin it answers to is gone, and reserve nothing (its runtime has moved on to DEL).
    require_root();
    let dir = TempDir::new("rec");
    let conf = config(
        "1.0.0",
        "orphan",
        dir.path(),
        "trellis-ipam",
        json!({"ranges": [[{"subnet": "10.54.0.0/24"}], [{"subnet": "fd00:54::/64"}]]}),
    );
    call(&ipam_bin(), "ADD", &conf, "c0").ok();
    let before = tree(dir.path());
    let conf_file = dir.path().join("conf.json");
    std::fs::write(&conf_file, conf.to_string()).unwrap();
    let lock = dir.path().join("orphan/lock");
    for i in 0..10 {
        let held = trellis_tests::process::HeldLock::take(&lock);
        let mut plugin = std::process::Command::new("sh")
            .args(["-c", "\"$0\" < \"$1\" > /dev/null; exit $?"])
            .arg(ipam_bin())
            .arg(&conf_file)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("orphan{i}"))
            .env("CNI_NETNS", "/x")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/x")
            .spawn()
            .unwrap();
        let ipam = held.stall_child(plugin.id(), "trellis-ipam");
        plugin.kill().unwrap();
        plugin.wait().unwrap();
        call(&ipam_bin(), "DEL", &conf, &format!("orphan{i}")).ok();
        ipam.resume();
    }
    std::fs::remove_file(&conf_file).unwrap();
    assert_eq!(
        tree(dir.path()),
        before,
        "an ADD whose plugin was killed reserved after its DEL"
    );
}

#[test]
fn a_temp_reservation_left_by_a_killed_add_is_not_written_through() {
    // A plugin killed after hard-linking its temp file to a reservation, but before removing
    // the temp file, leaves the two as one inode: the next ADD must not rewrite the live
    // reservation's owner through it (DEL would then not recognise and never release it).
    require_root();
    let dir = TempDir::new("rec");
    let conf = config(
        "1.0.0",
        "tmp",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.54.0.0/24"}),
    );
    call(&ipam_bin(), "ADD", &conf, "first").ok();
    let held = reserved(dir.path(), "tmp");
    assert_eq!(held.len(), 1);
    let reservation = dir.path().join("tmp").join(held.iter().next().unwrap());
    std::fs::hard_link(&reservation, dir.path().join("tmp/.trellis/tmp-reservation")).unwrap();
    call(&ipam_bin(), "ADD", &conf, "second").ok();
    let owner = std::fs::read_to_string(&reservation).unwrap();
    assert!(owner.starts_with("first\r\n"), "rewritten: {owner:?}");
    for id in ["first", "second"] {
        call(&ipam_bin(), "DEL", &conf, id).ok();
    }
    assert!(
        reserved(dir.path(), "tmp").is_empty(),
        "DEL left {:?}",
        reserved(dir.path(), "tmp")
    );
}
