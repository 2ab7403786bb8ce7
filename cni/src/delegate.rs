//! Running another plugin found on `CNI_PATH`, as the main plugin runs its IPAM plugin.
//!
//! **A delegate never outlives us.** A runtime that gives up on an ADD SIGKILLs the plugin it
//! started (Go's `exec.CommandContext` kills that one process, not its children) and runs DEL.
//! An IPAM child left running (say, waiting for its store's lock) would then reserve an address
//! *after* that DEL: a leak until GC or a reboot (host-local has this hole). So each delegate is
//! started with `PR_SET_PDEATHSIG(SIGKILL)`: the kernel queues the SIGKILL while it tears the
//! dead plugin down, before the runtime can reap it, so the child runs no instruction of its own
//! once the runtime can know the plugin is dead (a syscall in flight finishes; a reservation it
//! completes is made under the store's lock, which DEL then waits for, and finds). The race of
//! the plugin dying between `fork` and `prctl` is closed by checking, after `prctl`, that the
//! parent is still the process that forked (`getppid`); if not, the child never `exec`s.
//!
//! Why this and not a lock protocol between plugin and IPAM: it needs nothing from the delegate
//! (it protects host-local as well as trellis-ipam), costs one syscall, and cannot be defeated
//! by a delegate that is slow rather than blocked. Its one caveat, that the signal follows the
//! *thread* that forked, does not apply: [`exec`] waits for the child on the thread that
//! started it. trellis-ipam adds its own check for parents that do not do this (see its
//! `plugin` module).

use crate::env::{Command, Env};
use crate::error::{code, CniError};
use crate::result::CniResult;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Finds the executable `plugin` in the `CNI_PATH` directories.
pub fn find(plugin: &str, path: &[PathBuf]) -> Result<PathBuf, CniError> {
    if plugin.is_empty() || plugin.contains('/') || plugin == "." || plugin == ".." {
        return Err(CniError::invalid_config(format!("invalid plugin type {plugin:?}"))
            .with_details("a plugin type is a file name on CNI_PATH, without '/'"));
    }
    path.iter()
        .map(|dir| dir.join(plugin))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            CniError::new(code::DELEGATE, format!("plugin {plugin:?} not found on CNI_PATH"))
                .with_details(format!("looked in {:?}; install it there or fix CNI_PATH", path))
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Makes the child die with this process (see the module notes).
fn die_with_us(cmd: &mut std::process::Command) -> &mut std::process::Command {
    // SAFETY: getpid has no preconditions.
    let us = unsafe { libc::getpid() };
    let tie = move || {
        // SAFETY: runs in the forked child before exec; prctl and getppid are
        // async-signal-safe and touch no memory of ours.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != us {
                // We died before prctl: nobody will read this error, and nothing is run.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe calls (see above).
    unsafe { cmd.pre_exec(tie) }
}

/// Runs `plugin` with `command`, the caller's environment (with `CNI_COMMAND` replaced) and `conf`
/// on stdin. Returns what it printed on success, or the CNI error it printed. The child is
/// killed if this process dies first, and waited for on the calling thread.
pub fn exec(plugin: &str, command: Command, conf: &[u8], env: &Env) -> Result<Vec<u8>, CniError> {
    let exe = find(plugin, &env.path)?;
    let mut child = die_with_us(&mut std::process::Command::new(&exe))
        .envs(env.to_vars(command))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(code::DELEGATE, format!("cannot run {}", exe.display())).with_details(e.to_string())
        })?;
    // A plugin may exit without reading stdin; a broken pipe here is not our error.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(conf);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(code::DELEGATE, format!("waiting for {}", exe.display())).with_details(e.to_string())
    })?;
    if !out.stderr.is_empty() {
        let _ = std::io::stderr().write_all(&out.stderr);
    }
    if out.status.success() {
        return Ok(out.stdout);
    }
    match serde_json::from_slice::<CniError>(&out.stdout) {
        Ok(e) => Err(e),
        Err(_) => Err(CniError::new(
            code::DELEGATE,
            format!(
                "{plugin} {} failed ({}) without a CNI error",
                command.as_str(),
                out.status
            ),
        )
        .with_details(format!(
            "stdout: {:?} stderr: {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))),
    }
}

/// ADD through `plugin`, returning its result in our shape whatever version it printed.
pub fn add(plugin: &str, conf: &[u8], env: &Env) -> Result<CniResult, CniError> {
    let out = exec(plugin, Command::Add, conf, env)?;
    CniResult::from_slice(&out).map_err(|e| {
        CniError::new(code::DELEGATE, format!("{plugin} printed a result we cannot read"))
            .with_details(format!("{}: {}", e.msg, e.details))
    })
}

/// DEL, CHECK, STATUS or GC through `plugin`.
pub fn call(plugin: &str, command: Command, conf: &[u8], env: &Env) -> Result<(), CniError> {
    exec(plugin, command, conf, env).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_names_with_a_path() {
        for bad in ["", "../x", "/bin/sh", "a/b", ".."] {
            assert_eq!(
                find(bad, &[PathBuf::from("/bin")]).unwrap_err().code,
                code::INVALID_NETWORK_CONFIG
            );
        }
    }

    #[test]
    fn missing_plugin_is_a_delegate_error() {
        let e = find("no-such-plugin-xyz", &[PathBuf::from("/nonexistent")]).unwrap_err();
        assert_eq!(e.code, code::DELEGATE);
        assert!(e.msg.contains("no-such-plugin-xyz"));
    }

    #[test]
    fn finds_an_executable() {
        assert_eq!(
            find("sh", &[PathBuf::from("/nonexistent"), PathBuf::from("/bin")]).unwrap(),
            PathBuf::from("/bin/sh")
        );
    }
}
