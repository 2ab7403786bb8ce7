//! Running another plugin found on `CNI_PATH`, as the main plugin runs its IPAM plugin.

use crate::env::{Command, Env};
use crate::error::{code, CniError};
use crate::result::CniResult;
use std::io::Write;
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

/// Runs `plugin` with `command`, the caller's environment (with `CNI_COMMAND` replaced) and `conf`
/// on stdin. Returns what it printed on success, or the CNI error it printed.
pub fn exec(plugin: &str, command: Command, conf: &[u8], env: &Env) -> Result<Vec<u8>, CniError> {
    let exe = find(plugin, &env.path)?;
    let mut child = std::process::Command::new(&exe)
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
