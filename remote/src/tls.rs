//! TLS toward remote systems:
//!
//! - [`client_config`]: rustls client settings from a protocol profile's
//!   files — the webpki and system roots plus the profile's `ca`, and its
//!   `client_cert` and `client_key` for mutual TLS. An error names the key
//!   its file was given under.
//! - [`is_vague`] and [`alert`]: over HTTP/2 with TLS 1.3, a server's alert
//!   sent after the handshake (a refused client certificate) reaches only
//!   hyper's connection task, and the request sees the connection close
//!   ("broken pipe"). A caller that got such an error opens one TLS
//!   connection with the same settings and reads from it with [`alert`]:
//!   the alert, if the server sends one, is the reason.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The system CA bundle on Debian and most distributions.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The process-wide crypto provider: ring, for the whole workspace.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files a connection's TLS settings are built from: a CA to trust
/// besides the system's, and a client certificate and key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Files<'a> {
    pub ca: Option<&'a Path>,
    /// `client_cert` and `client_key`.
    pub client: Option<(&'a Path, &'a Path)>,
}

/// A file that gives no TLS settings, named by the key it was given under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// `ca`, `client_cert` or `client_key`; empty when no one file is at
    /// fault.
    pub key: &'static str,
    /// What is wrong, naming the file.
    pub problem: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key {
            "" => f.write_str(&self.problem),
            key => write!(f, "{key}: {}", self.problem),
        }
    }
}

impl std::error::Error for FileError {}

fn fault(key: &'static str, problem: impl Into<String>) -> FileError {
    FileError {
        key,
        problem: problem.into(),
    }
}

/// The webpki roots and the system's, read once per process.
static BASE_ROOTS: std::sync::LazyLock<RootCertStore> = std::sync::LazyLock::new(|| {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Ok(iter) = CertificateDer::pem_file_iter(SYSTEM_BUNDLE) {
        for cert in iter.flatten() {
            let _ = roots.add(cert);
        }
    }
    roots
});

/// rustls client settings: the webpki and system roots plus `files.ca`,
/// and the client certificate when there is one.
pub fn client_config(files: &Files<'_>) -> Result<ClientConfig, FileError> {
    let mut roots = BASE_ROOTS.clone();
    if let Some(ca) = files.ca {
        add_certs(&mut roots, ca).map_err(|e| fault("ca", e))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| fault("", e.to_string()))?
        .with_root_certificates(roots);
    match files.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let certs = read_certs(cert).map_err(|e| fault("client_cert", e))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| fault("client_key", format!("{}: {e}", key.display())))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                fault(
                    "client_cert",
                    format!("{} and client_key: {e}", cert.display()),
                )
            })
        }
    }
}

/// The certificates of `path` as trusted roots, alone: what the relay
/// trusts the daemon's certificate with (`server_ca`).
pub fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    add_certs(&mut roots, path)?;
    Ok(roots)
}

fn add_certs(roots: &mut RootCertStore, path: &Path) -> Result<(), String> {
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The PEM certificates in `path`; none is an error.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Words of a request error that say the connection went away without
/// saying why.
const VAGUE: [&str; 4] = [
    "operation was canceled",
    "channel closed",
    "connection closed",
    "broken pipe",
];

/// True when a request's error says the connection went away without
/// saying why: worth a probe with [`alert`].
pub(crate) fn is_vague(error: &str) -> bool {
    VAGUE.iter().any(|w| error.contains(w))
}

/// Reads the server's answer on a TLS connection just made: an HTTP/2
/// preface makes a healthy server answer at once, and one that refuses the
/// connection sends its alert, which is returned as "TLS: ...".
pub(crate) async fn alert<S>(mut tls: S) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match tls.read(&mut buf).await {
        Err(e) => Some(format!("TLS: {e}")),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("client.crt");
        let key_path = dir.path().join("client.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();

        let e = client_config(&Files {
            ca: Some(&empty),
            client: None,
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("ca: {} holds no PEM certificate", empty.display())
        );
        let e = client_config(&Files {
            ca: None,
            client: Some((&cert_path, &empty)),
        })
        .unwrap_err();
        assert_eq!(e.key, "client_key");
        assert!(e.problem.starts_with(&empty.display().to_string()), "{e}");
        let e = client_config(&Files {
            ca: None,
            client: Some((&empty, &key_path)),
        })
        .unwrap_err();
        assert_eq!(e.key, "client_cert");
        // A CA and a client identity that load.
        client_config(&Files {
            ca: Some(&cert_path),
            client: Some((&cert_path, &key_path)),
        })
        .unwrap();
    }

    #[test]
    fn only_a_connection_gone_without_a_reason_is_vague() {
        assert!(is_vague(
            "connection error: stream closed because of a broken pipe"
        ));
        assert!(is_vague("operation was canceled: connection was not ready"));
        assert!(!is_vague(
            "connection error: received fatal alert: CertificateRequired"
        ));
    }
}
