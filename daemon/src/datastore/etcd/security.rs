//! How this node proves itself to etcd and checks etcd: TLS (a CA to trust, a client
//! certificate and key) and etcd's own authentication (a user and a password read from a file,
//! so that a Kubernetes Secret can be mounted), as flannel's and Calico's etcd options.
//!
//! The files are read once, at start: a missing or malformed file is a configuration mistake
//! that no retry fixes, so the daemon exits naming the file. What only etcd can judge (a CA
//! that did not sign etcd's certificate, a client certificate etcd does not trust, a wrong
//! password) shows at the first call, and is retried with backoff and logged once per cause
//! (`retry::FailureLog`).

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use std::path::{Path, PathBuf};

/// The files and user given on the command line.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// PEM CA certificate(s) that signed etcd's serving certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for an etcd that requires client certificates.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user, and the file holding its password (trailing newline ignored).
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// [`Security`] read from its files, ready for each new client.
#[derive(Clone, Default)]
pub(super) struct Credentials {
    tls: Option<TlsOptions>,
    /// The client certificate's file, for errors.
    cert_file: Option<PathBuf>,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Credentials")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

fn read(what: &str, path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading the etcd {what} {}: {e}", path.display()))
}

impl Security {
    /// Reads the files; an error names the file and what is wrong with the options.
    pub(super) fn load(&self, endpoints: &[String]) -> Result<Credentials, String> {
        let mut tls = None;
        if let Some(ca) = &self.ca_file {
            let pem = read("CA file", ca)?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!("the etcd CA file {} holds no PEM certificate", ca.display()));
            }
            tls = Some(TlsOptions::new().ca_certificate(Certificate::from_pem(pem)));
        }
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let identity = Identity::from_pem(read("client certificate", cert)?, read("client key", key)?);
                tls = Some(tls.unwrap_or_default().identity(identity));
            }
            (None, None) => {}
            _ => return Err("--etcd-certfile and --etcd-keyfile go together".into()),
        }
        if tls.is_some() {
            if let Some(plain) = endpoints.iter().find(|e| !e.starts_with("https://")) {
                return Err(format!("etcd endpoint {plain} is not https:// but TLS files are given"));
            }
        }
        let user = match (&self.username, &self.password_file) {
            (Some(user), Some(file)) => {
                let password = read("password file", file)?;
                Some((user.clone(), password.trim_end_matches(['\r', '\n']).to_string()))
            }
            (None, None) => None,
            _ => return Err("--etcd-username and --etcd-password-file go together".into()),
        };
        Ok(Credentials {
            tls,
            cert_file: self.cert_file.clone(),
            user,
        })
    }
}

impl Credentials {
    /// `options` with this node's TLS settings and user.
    pub(super) fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        options
    }

    pub(super) fn tls(&self) -> bool {
        self.tls.is_some()
    }

    pub(super) fn client_certificate(&self) -> Option<&Path> {
        self.cert_file.as_deref()
    }

    /// Whether connecting authenticates at once (a call to etcd, which may fail and is retried).
    pub(super) fn authenticates(&self) -> bool {
        self.user.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_given_options_and_bad_files_are_refused_with_the_file_named() {
        let eps = vec!["https://127.0.0.1:2379".to_string()];
        let only_cert = Security {
            cert_file: Some("/nonexistent/c.pem".into()),
            ..Default::default()
        };
        assert!(only_cert.load(&eps).unwrap_err().contains("go together"));
        let missing = Security {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(missing.load(&eps).unwrap_err().contains("/nonexistent/ca.pem"));
        let dir = std::env::temp_dir().join(format!("trellisd-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("ca.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let bad = Security {
            ca_file: Some(junk),
            ..Default::default()
        };
        assert!(bad.load(&eps).unwrap_err().contains("no PEM certificate"));
        let pw = dir.join("password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let user = Security {
            username: Some("trellis".into()),
            password_file: Some(pw),
            ..Default::default()
        };
        let c = user.load(&["http://127.0.0.1:2379".to_string()]).unwrap();
        assert_eq!(c.user, Some(("trellis".into(), "s3cret".into())));
        assert!(!format!("{c:?}").contains("s3cret"), "the password never shows");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
