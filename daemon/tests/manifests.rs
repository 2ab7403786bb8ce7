//! `manifests/trellis.yaml`: every object parses into the typed Kubernetes API structs with no
//! field left over, the RBAC grants exactly what the daemon calls, and the daemon accepts the
//! configuration and flags the manifest gives it.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;

fn documents() -> Vec<Value> {
    let path = format!("{}/../manifests/trellis.yaml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `doc` as `T` and checks that nothing was dropped: serde ignores unknown fields, so a
/// misspelt or misplaced field shows up as a difference after the round trip.
fn typed<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone()).unwrap_or_err(doc);
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &back, doc,
        "fields not understood by the typed struct (unknown or misplaced)"
    );
    t
}

trait UnwrapOrErr<T> {
    fn unwrap_or_err(self, doc: &Value) -> T;
}

impl<T> UnwrapOrErr<T> for Result<T, serde_json::Error> {
    fn unwrap_or_err(self, doc: &Value) -> T {
        self.unwrap_or_else(|e| panic!("{e} in {}", doc["kind"]))
    }
}

fn find<T: DeserializeOwned + serde::Serialize>(docs: &[Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the manifest"));
    typed(doc)
}

#[test]
fn every_object_parses_with_no_unknown_field() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    let _: ServiceAccount = find(&docs, "ServiceAccount");
    let _: ClusterRoleBinding = find(&docs, "ClusterRoleBinding");
    let _: ConfigMap = find(&docs, "ConfigMap");
    let ds: DaemonSet = find(&docs, "DaemonSet");
    let spec = ds.spec;
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(pod
        .tolerations
        .unwrap()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
    let c = &pod.containers[0];
    let caps: BTreeSet<String> = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap()
        .add
        .clone()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(caps, BTreeSet::from(["NET_ADMIN".to_string(), "NET_RAW".to_string()]));
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(false));
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some() && c.resources.is_some());
    let host_paths: BTreeSet<String> = pod
        .volumes
        .unwrap()
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    for p in ["/opt/cni/bin", "/etc/cni/net.d", "/var/lib/cni", "/run/trellis"] {
        assert!(host_paths.contains(p), "missing hostPath {p}");
    }
    let init = &pod.init_containers.unwrap()[0];
    assert!(init.command.as_ref().unwrap().contains(&"install-cni".to_string()));
    let ru = spec.update_strategy.unwrap().rolling_update.unwrap();
    assert_eq!(serde_json::to_value(ru.max_unavailable).unwrap(), 1);
}

#[test]
fn rbac_grants_exactly_what_the_daemon_calls() {
    let role: ClusterRole = find(&documents(), "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        for g in rule.api_groups.unwrap_or_default() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    let called: BTreeSet<(String, String, String)> = trellisd::datastore::kube::API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(granted, called);
}

#[test]
fn the_daemon_accepts_the_manifests_config_and_flags() {
    let docs = documents();
    let cm: ConfigMap = find(&docs, "ConfigMap");
    let conf = &cm.data.unwrap()["net-conf.json"];
    trellisd::config::NetConf::parse(conf).unwrap();
    let ds: DaemonSet = find(&docs, "DaemonSet");
    let pod = ds.spec.template.spec.unwrap();
    for c in pod.init_containers.unwrap().iter().chain(pod.containers.iter()) {
        let argv = c.command.clone().unwrap();
        assert_eq!(argv[0], "/opt/trellis/bin/trellisd");
        // The flags parse: clap refuses unknown ones before printing help.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellisd"))
            .args(&argv[1..])
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
