//! The stand-in's certificates: a CA generated per server (so no client trusts it by accident)
//! and a serving certificate it signs, valid for the listen address, loopback and the names
//! in-cluster clients use (`kubernetes.default.svc`…); and the files clients read to trust it.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::PrivatePkcs8KeyDer;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

pub struct Pki {
    pub ca_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

pub(crate) fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("self-sign the CA")
}

/// A CA no stand-in uses, for a test that gives a client the wrong one. Its name differs from
/// the servers' CAs, so a client reports an unknown issuer (two CAs of the same name, as two
/// kubeadm clusters' `kubernetes` CAs are, give a bad signature instead).
pub fn unrelated_ca_pem() -> String {
    new_ca("trellis stand-in unrelated CA (trusted by no server)").pem()
}

/// A fresh CA and a serving certificate for `ip`; the server offers HTTP/1.1 by ALPN (what
/// kube's client asks for). The crypto provider is ring, named here, never a process default.
pub fn generate(ip: IpAddr) -> Pki {
    let ca = new_ca("trellis stand-in kube-apiserver CA (not a cluster)");
    let mut names: Vec<String> = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "localhost",
    ]
    .map(String::from)
    .to_vec();
    for addr in [ip, IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        if !names.contains(&addr.to_string()) {
            names.push(addr.to_string());
        }
    }
    let mut params = CertificateParams::new(names).expect("serving certificate parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, "trellis stand-in kube-apiserver");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("serving key");
    let cert = params.signed_by(&key, &ca).expect("sign the serving certificate");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("serving certificate and key match");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Pki {
        ca_pem: ca.pem(),
        server_config: Arc::new(config),
    }
}

/// A kubeconfig for `url` trusting `ca_pem`, authenticating with the bearer `token`.
pub fn kubeconfig(url: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "# A stand-in Kubernetes API server for Trellis's tests, not a cluster.
apiVersion: v1
kind: Config
clusters:
- name: trellis-standin
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: trellis-standin
  user:
    token: {token}
contexts:
- name: trellis-standin
  context:
    cluster: trellis-standin
    user: trellis-standin
current-context: trellis-standin
"
    )
}
