//! The skeleton: reads `CNI_*` and stdin, checks versions, dispatches to a [`Plugin`] and prints
//! the result or the error. A plugin's `main` is `trellis_cni::skel::run(MyPlugin)`.

use crate::config::{check_version, peek_version, NetConf};
use crate::env::{Command, Env};
use crate::error::{code, CniError};
use crate::result::CniResult;
use crate::version::Version;
use serde::de::DeserializeOwned;
use std::io::{Read, Write};

/// Everything one invocation knows: the environment, the config (common fields plus the plugin's
/// own `C`), the version it asked for, and the raw bytes to hand on to a delegate.
pub struct Context<C> {
    pub env: Env,
    pub version: Version,
    pub conf: NetConf<C>,
    pub raw: Vec<u8>,
}

/// A CNI plugin: one method per verb. VERSION is answered by the skeleton.
pub trait Plugin {
    /// The plugin's own config fields, flattened into the network config.
    type Config: DeserializeOwned;

    fn add(&self, ctx: &Context<Self::Config>) -> Result<CniResult, CniError>;
    fn del(&self, ctx: &Context<Self::Config>) -> Result<(), CniError>;
    fn check(&self, ctx: &Context<Self::Config>) -> Result<(), CniError>;
    fn status(&self, ctx: &Context<Self::Config>) -> Result<(), CniError>;
    fn gc(&self, ctx: &Context<Self::Config>) -> Result<(), CniError>;
}

/// What an invocation prints and how it exits.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs `plugin` against the process's environment and stdin, prints, and exits.
pub fn run<P: Plugin>(plugin: P) -> ! {
    let mut stdin = Vec::new();
    let out = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => dispatch(&plugin, |k| std::env::var(k).ok(), &stdin),
        Err(e) => error_output(
            &CniError::io("reading the network config from stdin", &e),
            Version::LATEST,
        ),
    };
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(out.stdout.as_bytes());
    let _ = so.flush();
    std::process::exit(out.exit_code)
}

/// One invocation, without touching the process's stdin, stdout or environment (tests call it).
pub fn dispatch<P: Plugin>(plugin: &P, get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Output {
    let peeked = peek_version(stdin);
    // Errors are printed in the config's version when it is one we speak.
    let print_as = peeked
        .as_ref()
        .ok()
        .and_then(|v| v.as_deref())
        .and_then(Version::parse)
        .unwrap_or(Version::LATEST);
    match dispatch_inner(plugin, get_env, stdin, peeked) {
        Ok(Some(result)) => Output {
            stdout: to_line(&result),
            exit_code: 0,
        },
        Ok(None) => Output {
            stdout: String::new(),
            exit_code: 0,
        },
        Err(e) => error_output(&e, print_as),
    }
}

fn dispatch_inner<P: Plugin>(
    plugin: &P,
    get_env: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
    peeked: Result<Option<String>, CniError>,
) -> Result<Option<serde_json::Value>, CniError> {
    let env = Env::from_lookup(get_env)?;
    if env.command == Command::Version {
        let asked = peeked
            .ok()
            .flatten()
            .and_then(|v| Version::parse(&v))
            .unwrap_or(Version::LATEST);
        return Ok(Some(serde_json::json!({
            "cniVersion": asked.as_str(),
            "supportedVersions": Version::supported_strings(),
        })));
    }
    let requested = peeked?.ok_or_else(|| {
        CniError::invalid_config("the network config has no cniVersion")
            .with_details("add \"cniVersion\": \"1.1.0\" to the config")
    })?;
    let version = check_version(&requested)?;
    let allowed = match env.command {
        Command::Check => version.has_check(),
        Command::Status | Command::Gc => version.has_status_and_gc(),
        _ => true,
    };
    if !allowed {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version {version} does not allow {}", env.command.as_str()),
        )
        .with_details(match env.command {
            Command::Check => "CHECK needs cniVersion 0.4.0 or later",
            _ => "STATUS and GC need cniVersion 1.1.0 or later",
        }));
    }
    let conf = NetConf::<P::Config>::parse(stdin)?;
    let ctx = Context {
        env,
        version,
        conf,
        raw: stdin.to_vec(),
    };
    match ctx.env.command {
        Command::Add => plugin.add(&ctx).map(|r| Some(r.to_json(version))),
        Command::Del => plugin.del(&ctx).map(|_| None),
        Command::Check => plugin.check(&ctx).map(|_| None),
        Command::Status => plugin.status(&ctx).map(|_| None),
        Command::Gc => plugin.gc(&ctx).map(|_| None),
        Command::Version => unreachable!("answered above"),
    }
}

fn error_output(e: &CniError, v: Version) -> Output {
    Output {
        stdout: to_line(&e.to_json(v)),
        exit_code: 1,
    }
}

fn to_line(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string(v).expect("JSON serialises");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::cell::RefCell;

    #[derive(Deserialize)]
    struct Conf {
        #[serde(default)]
        fail: bool,
    }

    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<&'static str>>,
    }

    impl Plugin for Recorder {
        type Config = Conf;
        fn add(&self, ctx: &Context<Conf>) -> Result<CniResult, CniError> {
            self.calls.borrow_mut().push("add");
            if ctx.conf.plugin.fail {
                return Err(CniError::new(code::IO, "boom").with_details("d"));
            }
            Ok(CniResult::default())
        }
        fn del(&self, _: &Context<Conf>) -> Result<(), CniError> {
            self.calls.borrow_mut().push("del");
            Ok(())
        }
        fn check(&self, _: &Context<Conf>) -> Result<(), CniError> {
            self.calls.borrow_mut().push("check");
            Ok(())
        }
        fn status(&self, _: &Context<Conf>) -> Result<(), CniError> {
            self.calls.borrow_mut().push("status");
            Ok(())
        }
        fn gc(&self, _: &Context<Conf>) -> Result<(), CniError> {
            self.calls.borrow_mut().push("gc");
            Ok(())
        }
    }

    fn call(cmd: &str, conf: &str) -> (Output, Vec<&'static str>) {
        let p = Recorder::default();
        let out = dispatch(
            &p,
            |k| match k {
                "CNI_COMMAND" => Some(cmd.to_string()),
                "CNI_CONTAINERID" => Some("c1".into()),
                "CNI_NETNS" => Some("/run/netns/x".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                "CNI_PATH" => Some("/opt/cni/bin".into()),
                _ => None,
            },
            conf.as_bytes(),
        );
        let calls = p.calls.borrow().clone();
        (out, calls)
    }

    fn json(o: &Output) -> serde_json::Value {
        serde_json::from_str(&o.stdout).unwrap()
    }

    #[test]
    fn version_lists_what_we_speak() {
        let (o, _) = call("VERSION", r#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(o.exit_code, 0);
        assert_eq!(json(&o)["cniVersion"], "0.4.0");
        assert_eq!(json(&o)["supportedVersions"].as_array().unwrap().len(), 5);
        let (o, _) = call("VERSION", "");
        assert_eq!(json(&o)["cniVersion"], "1.1.0");
    }

    #[test]
    fn add_prints_the_result_in_the_config_version() {
        let (o, calls) = call("ADD", r#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#);
        assert_eq!((o.exit_code, calls), (0, vec!["add"]));
        assert_eq!(json(&o)["cniVersion"], "0.3.1");
    }

    #[test]
    fn errors_are_printed_with_code_and_nonzero_exit() {
        let (o, _) = call("ADD", r#"{"cniVersion":"1.0.0","name":"n","type":"t","fail":true}"#);
        assert_eq!(o.exit_code, 1);
        assert_eq!(
            json(&o),
            serde_json::json!({"cniVersion":"1.0.0","code":5,"msg":"boom","details":"d"})
        );
    }

    #[test]
    fn versions_gate_the_verbs() {
        for (cmd, v, ok) in [
            ("CHECK", "0.3.1", false),
            ("CHECK", "0.4.0", true),
            ("STATUS", "1.0.0", false),
            ("STATUS", "1.1.0", true),
            ("GC", "0.4.0", false),
            ("GC", "1.1.0", true),
            ("ADD", "0.2.0", false),
            ("DEL", "9.9.9", false),
        ] {
            let (o, calls) = call(cmd, &format!(r#"{{"cniVersion":"{v}","name":"n","type":"t"}}"#));
            assert_eq!(o.exit_code == 0, ok, "{cmd} {v}: {}", o.stdout);
            if !ok {
                assert_eq!(json(&o)["code"], code::INCOMPATIBLE_VERSION);
                assert!(calls.is_empty());
            }
        }
    }

    #[test]
    fn bad_config_never_reaches_the_plugin() {
        let (o, calls) = call("ADD", "{");
        assert_eq!(json(&o)["code"], code::DECODE);
        assert!(calls.is_empty());
        let (o, _) = call("ADD", r#"{"name":"n","type":"t"}"#);
        assert_eq!(json(&o)["code"], code::INVALID_NETWORK_CONFIG);
    }
}
