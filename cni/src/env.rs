//! The `CNI_*` environment, validated as the spec requires, and `CNI_ARGS`.

use crate::error::{code, CniError};
use std::path::PathBuf;

/// The verb in `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }

    /// Whether the verb acts on one attachment (needs a container ID and an interface name).
    fn is_per_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }

    /// Whether the verb needs `CNI_NETNS` (DEL must work when the namespace is already gone).
    fn needs_netns(self) -> bool {
        matches!(self, Command::Add | Command::Check)
    }
}

/// The validated environment of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    /// Empty for STATUS, GC and VERSION.
    pub container_id: String,
    pub netns: Option<PathBuf>,
    /// Empty for STATUS, GC and VERSION.
    pub ifname: String,
    pub args: CniArgs,
    /// `CNI_PATH`, split on `:`.
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Result<Env, CniError> {
        Env::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the environment through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = parse_command(var("CNI_COMMAND"))?;
        let mut env = Env {
            command,
            container_id: String::new(),
            netns: var("CNI_NETNS").map(PathBuf::from),
            ifname: String::new(),
            args: CniArgs::default(),
            path: var("CNI_PATH")
                .map(|p| p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
                .unwrap_or_default(),
        };
        if command == Command::Version {
            return Ok(env);
        }
        if command.is_per_attachment() {
            env.container_id = var("CNI_CONTAINERID").ok_or_else(|| missing("CNI_CONTAINERID"))?;
            validate_container_id(&env.container_id)?;
            env.ifname = var("CNI_IFNAME").ok_or_else(|| missing("CNI_IFNAME"))?;
            validate_ifname(&env.ifname)?;
            if command.needs_netns() && env.netns.is_none() {
                return Err(missing("CNI_NETNS"));
            }
            if env.path.is_empty() {
                return Err(missing("CNI_PATH"));
            }
        }
        env.args = CniArgs::parse(var("CNI_ARGS").as_deref().unwrap_or(""))?;
        Ok(env)
    }

    /// The variables to hand to a delegated plugin for `command`.
    pub fn to_vars(&self, command: Command) -> Vec<(&'static str, String)> {
        let path = self
            .path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        vec![
            ("CNI_COMMAND", command.as_str().to_string()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            (
                "CNI_NETNS",
                self.netns
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_ARGS", self.args.raw.clone()),
            ("CNI_PATH", path),
        ]
    }
}

fn parse_command(v: Option<String>) -> Result<Command, CniError> {
    let v = v.ok_or_else(|| missing("CNI_COMMAND"))?;
    Command::parse(&v).ok_or_else(|| {
        CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {v:?}"))
            .with_details("expected one of ADD, DEL, CHECK, VERSION, STATUS, GC")
    })
}

fn missing(var: &str) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("required environment variable {var} is missing"),
    )
    .with_details("the container runtime must set it for this CNI_COMMAND")
}

/// The spec: at least one character, alphanumerics plus `_`, `.` and `-`, not starting with one of
/// the three.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(
            CniError::new(code::INVALID_ENV, "invalid characters in CNI_CONTAINERID").with_details(format!(
                "{id:?}: only letters, digits, '_', '.' and '-' are allowed, starting with a letter or digit"
            )),
        )
    }
}

/// A container ID made to fit in `max` bytes, for names that the kernel or the file system limit
/// (a link's label, a file name), since the spec does not limit the ID: the ID itself when it
/// fits, else as much of its start as fits, `~` and 16 hex digits of a hash of the whole ID.
/// `~` cannot occur in an ID, so a shortened ID never equals a real one; the hash is stable
/// across processes, versions and machines. `max` below 17 still gets the 17-byte hash form.
pub fn bounded_container_id(id: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if id.len() <= max {
        return id.into();
    }
    let hash = format!("~{:016x}", fnv1a64([id]));
    // IDs are ASCII (validate_container_id), so any byte offset is a character boundary.
    let keep = max.saturating_sub(hash.len()).min(id.len());
    format!("{}{hash}", &id[..keep]).into()
}

/// FNV-1a (64 bits) over `parts`, each followed by a NUL that none of them holds: a hash that
/// never changes, for names derived from an attachment.
pub fn fnv1a64<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Maximum interface name length (IFNAMSIZ less the NUL).
pub const MAX_IFNAME_LEN: usize = 15;

/// The spec: not empty, at most 15 bytes, not `.` or `..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let why = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "it is {} bytes long, the kernel allows {MAX_IFNAME_LEN}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not interface names".to_string())
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        Some("it contains '/', ':' or whitespace".to_string())
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(CniError::new(code::INVALID_ENV, format!("invalid CNI_IFNAME {name:?}")).with_details(why)),
    }
}

/// `CNI_ARGS`: `K=V;K=V`. Unknown keys are refused unless `IgnoreUnknown` is true, as the
/// reference plugins do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub raw: String,
    pub pairs: Vec<(String, String)>,
}

/// Keys any Trellis plugin understands.
pub const KNOWN_ARGS: &[&str] = &[
    "IgnoreUnknown",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_INFRA_CONTAINER_ID",
    "K8S_POD_UID",
    "IP",
];

impl CniArgs {
    pub fn parse(raw: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for item in raw.split(';').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                CniError::new(code::INVALID_ENV, format!("invalid CNI_ARGS pair {item:?}"))
                    .with_details("CNI_ARGS is a list of KEY=VALUE separated by ';'")
            })?;
            pairs.push((k.to_string(), v.to_string()));
        }
        let args = CniArgs {
            raw: raw.to_string(),
            pairs,
        };
        if !args.ignore_unknown() {
            if let Some((k, _)) = args.pairs.iter().find(|(k, _)| !KNOWN_ARGS.contains(&k.as_str())) {
                return Err(
                    CniError::new(code::INVALID_ENV, format!("unknown CNI_ARGS key {k:?}")).with_details(format!(
                        "known keys: {}; add IgnoreUnknown=1 to pass others",
                        KNOWN_ARGS.join(", ")
                    )),
                );
            }
        }
        Ok(args)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn ignore_unknown(&self) -> bool {
        matches!(self.get("IgnoreUnknown"), Some(v) if v == "1" || v.eq_ignore_ascii_case("true"))
    }

    pub fn pod_namespace(&self) -> Option<&str> {
        self.get("K8S_POD_NAMESPACE")
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.get("K8S_POD_NAME")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc-123_x.y"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;FOO=bar",
        ),
    ];

    fn with(over: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = ADD
            .iter()
            .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
            .copied()
            .collect();
        v.extend(over.iter().filter(|(_, v)| !v.is_empty()));
        v
    }

    #[test]
    fn a_full_add_environment_parses() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path.len(), 2);
        assert_eq!(e.args.pod_name(), Some("web-0"));
        assert_eq!(e.args.pod_namespace(), Some("default"));
    }

    #[test]
    fn missing_and_invalid_variables_are_code_4() {
        for over in [
            [("CNI_COMMAND", "")],
            [("CNI_COMMAND", "EXPLODE")],
            [("CNI_CONTAINERID", "")],
            [("CNI_CONTAINERID", "-starts-with-dash")],
            [("CNI_CONTAINERID", "has space")],
            [("CNI_CONTAINERID", "../../etc")],
            [("CNI_IFNAME", "")],
            [("CNI_IFNAME", "sixteen-chars-xx")],
            [("CNI_IFNAME", "..")],
            [("CNI_IFNAME", "a/b")],
            [("CNI_IFNAME", "a:b")],
            [("CNI_IFNAME", "a b")],
            [("CNI_NETNS", "")],
            [("CNI_PATH", "")],
            [("CNI_ARGS", "K8S_POD_NAME=x;FOO=bar")],
            [("CNI_ARGS", "novalue")],
        ] {
            let err = env(&with(&over)).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV, "{over:?}: {err}");
        }
    }

    #[test]
    fn del_does_not_need_a_namespace_and_status_needs_no_attachment() {
        let e = env(&with(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", "")])).unwrap();
        assert_eq!(e.netns, None);
        let e = env(&[("CNI_COMMAND", "STATUS")]).unwrap();
        assert_eq!(e.command, Command::Status);
        let e = env(&[("CNI_COMMAND", "VERSION")]).unwrap();
        assert_eq!(e.command, Command::Version);
    }

    #[test]
    fn long_container_ids_are_bounded_uniquely_and_short_ones_kept() {
        assert_eq!(bounded_container_id("abc", 10), "abc");
        let a: String = "x".repeat(300) + "a";
        let b: String = "x".repeat(300) + "b";
        let (ba, bb) = (bounded_container_id(&a, 100), bounded_container_id(&b, 100));
        assert_eq!(ba.len(), 100);
        assert!(ba.starts_with("xxxx") && ba.contains('~'));
        assert_ne!(ba, bb);
        assert_eq!(ba, bounded_container_id(&a, 100));
        assert_eq!(bounded_container_id(&a, 3).len(), 17);
        // The hash never changes: names derived from it must survive an upgrade.
        assert_eq!(fnv1a64(["net", "abc", "eth0"]), 0xf4a7_b981_54ef_e0cb);
    }

    #[test]
    fn fifteen_byte_ifname_is_fine() {
        assert!(validate_ifname("fifteen-chars-x").is_ok());
    }
}
