//! The network configuration a plugin reads on stdin.

use crate::error::{code, CniError};
use crate::result::{CniResult, Dns};
use crate::version::Version;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One attachment named in `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The common fields of a network config plus a plugin's own (`P`, flattened in).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetConf<P> {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(rename = "ipMasq", default)]
    pub ip_masq: bool,
    /// Left as JSON: the IPAM plugin named in `ipam.type` parses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(rename = "runtimeConfig", default, skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<Value>,
    #[serde(rename = "prevResult", default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<Value>,
    /// GC's list of attachments in use. `None` only when the key is missing; `null` is the
    /// empty list (see [`null_is_empty`]).
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        deserialize_with = "null_is_empty",
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(flatten)]
    pub plugin: P,
}

/// `"cni.dev/valid-attachments": null` is the empty list. Go runtimes (libcni) marshal a nil
/// slice as `null`, and that is what they send for a node with no pod left: refusing it, as a
/// missing key is refused, would keep GC from ever cleaning an emptied node. (Called only when
/// the key is present; a missing key stays `None` through `default`.)
fn null_is_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<Attachment>>, D::Error> {
    Option::<Vec<Attachment>>::deserialize(d).map(|list| Some(list.unwrap_or_default()))
}

impl<P: DeserializeOwned> NetConf<P> {
    /// Parses a config; JSON that does not parse is code 6, a field that is missing, of the wrong
    /// type or invalid is code 7.
    pub fn parse(bytes: &[u8]) -> Result<NetConf<P>, CniError> {
        let conf: NetConf<P> = decode(bytes, "network config")?;
        validate_network_name(&conf.name)?;
        Ok(conf)
    }
}

impl<P> NetConf<P> {
    /// `prevResult`, parsed whatever its version.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        match &self.prev_result {
            None | Some(Value::Null) => Ok(None),
            Some(v) => CniResult::from_value(v.clone()).map(Some),
        }
    }
}

/// Decodes `bytes` as `T`, mapping serde's errors onto CNI codes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, CniError> {
    serde_json::from_slice(bytes).map_err(|e| decode_error(&e, what))
}

/// A serde error as a CNI error: syntax is code 6 (decoding failure); a well-formed document with
/// a missing, mistyped or invalid field is code 7 (invalid network config).
pub fn decode_error(e: &serde_json::Error, what: &str) -> CniError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => {
            CniError::new(code::INVALID_NETWORK_CONFIG, format!("invalid {what}")).with_details(e.to_string())
        }
        _ => CniError::new(code::DECODE, format!("cannot decode {what}")).with_details(e.to_string()),
    }
}

/// The spec: a network name starts with a letter or digit and holds only letters, digits, `_`,
/// `.` and `-`. This also keeps it safe as a directory name.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(
            CniError::invalid_config(format!("invalid network name {name:?}")).with_details(
                "a network name starts with a letter or digit and holds only letters, digits, '_', '.' and '-'",
            ),
        )
    }
}

/// Just enough of a config to learn its version (read before anything else).
#[derive(Deserialize)]
struct VersionOnly {
    #[serde(rename = "cniVersion", default)]
    cni_version: Option<String>,
}

/// The version a config asks for. `Ok(None)` when the field is absent.
pub fn peek_version(bytes: &[u8]) -> Result<Option<String>, CniError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    let v: VersionOnly = decode(bytes, "network config")?;
    Ok(v.cni_version)
}

/// Checks the config's version against what we speak: code 1 otherwise.
pub fn check_version(requested: &str) -> Result<Version, CniError> {
    Version::parse(requested).ok_or_else(|| {
        CniError::new(code::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(format!(
            "config is {requested:?}, plugin supports {:?}",
            Version::supported_strings()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug, Default)]
    struct Mine {
        #[serde(default)]
        bridge: Option<String>,
    }

    #[test]
    fn parses_common_and_plugin_fields() {
        let c: NetConf<Mine> = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"net1","type":"x","bridge":"cni0","ipMasq":true,
                 "ipam":{"type":"trellis-ipam"},"runtimeConfig":{"a":1},
                 "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.plugin.bridge.as_deref(), Some("cni0"));
        assert!(c.ip_masq);
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "c1");
    }

    #[test]
    fn null_valid_attachments_are_none_in_use_and_a_missing_key_is_unknown() {
        let parse = |extra: &str| {
            NetConf::<Mine>::parse(format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"x"{extra}}}"#).as_bytes())
                .unwrap()
                .valid_attachments
        };
        assert_eq!(parse(r#","cni.dev/valid-attachments":null"#), Some(Vec::new()));
        assert_eq!(parse(r#","cni.dev/valid-attachments":[]"#), Some(Vec::new()));
        assert_eq!(parse(""), None);
    }

    #[test]
    fn maps_errors_onto_codes() {
        let e = NetConf::<Mine>::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let e = NetConf::<Mine>::parse(br#"{"cniVersion":"1.0.0","type":"x"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
        assert!(e.details.contains("name"), "{e}");
        let e = NetConf::<Mine>::parse(br#"{"cniVersion":"1.0.0","name":7,"type":"x"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
        let e = NetConf::<Mine>::parse(br#"{"cniVersion":"1.0.0","name":"../x","type":"x"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG);
        assert_eq!(check_version("0.2.0").unwrap_err().code, code::INCOMPATIBLE_VERSION);
    }
}
