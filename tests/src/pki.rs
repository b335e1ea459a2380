//! Test PKI made with rcgen: a CA, a server certificate for `localhost` and 127.0.0.1, client certificates, as PEM strings and files, and the rustls configs that use them.
//!
//! A client certificate "from a different CA" is simply the client of
//! another [`Pki`]: `Pki::new().client()` is trusted by no sink built on the
//! first one.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// One day, for certificate lifetimes.
pub const DAY: Duration = Duration::from_secs(86_400);

/// How long certificates live unless a test asks otherwise: far from any
/// "expires soon" threshold.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

/// Certificates start an hour in the past, so a clock a little behind does
/// not see them as not yet valid.
const BACKDATE: Duration = Duration::from_secs(3600);

/// A CA with one server certificate (`localhost`, `127.0.0.1`) and one client
/// certificate it signed. More can be issued with [`Pki::issue_server`] and
/// [`Pki::issue_client`].
pub struct Pki {
    ca: Ca,
    ca_pem: String,
    server: Identity,
    client: Identity,
}

/// A certificate and its private key.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The certificate's common name.
    pub name: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER (what a server sees of a client certificate).
    pub cert_der: CertificateDer<'static>,
    /// When the certificate stops being valid.
    pub not_after: SystemTime,
    key_der: Vec<u8>,
}

/// Where [`Pki::write_to`] put the PEM files.
#[derive(Clone, Debug)]
pub struct PkiFiles {
    /// The CA certificate: the `ca` of a protocol profile.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The client certificate and key: a protocol profile's `client_cert`
    /// and `client_key`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// A fresh CA, with a server and a client certificate valid a year.
    pub fn new() -> Pki {
        Pki::with_server_validity(DEFAULT_VALIDITY)
    }

    /// A fresh CA whose server certificate expires `days` days from now, for
    /// the connection test's "TLS certificate days left".
    pub fn with_server_days(days: u32) -> Pki {
        Pki::with_server_validity(DAY * days)
    }

    /// A fresh CA whose server certificate expires `valid_for` from now.
    pub fn with_server_validity(valid_for: Duration) -> Pki {
        let ca_key = KeyPair::generate().expect("rcgen generates a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "Outbox test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&crate::random::bytes::<16>()));
        set_validity(&mut params, DEFAULT_VALIDITY * 2);
        let ca = Ca {
            cert: params
                .self_signed(&ca_key)
                .expect("rcgen self-signs the CA"),
            key: ca_key,
        };
        Pki {
            ca_pem: ca.cert.pem(),
            server: ca.issue(
                "localhost",
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
                valid_for,
            ),
            client: ca.issue(
                "outbox-client",
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
                DEFAULT_VALIDITY,
            ),
            ca,
        }
    }

    /// The CA certificate, PEM: what clients trust, and what a sink
    /// demanding client certificates accepts.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.cert.der().clone()
    }

    /// The server certificate, for `localhost` and `127.0.0.1`.
    pub fn server(&self) -> &Identity {
        &self.server
    }

    /// The client certificate (CN `outbox-client`).
    pub fn client(&self) -> &Identity {
        &self.client
    }

    /// A server certificate for `names` (DNS names or IP addresses) signed
    /// by this CA, valid for `valid_for` from now.
    pub fn issue_server(&self, names: &[&str], valid_for: Duration) -> Identity {
        self.ca.issue(
            names.first().copied().unwrap_or("server"),
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            valid_for,
        )
    }

    /// A client certificate with common name `name` signed by this CA.
    pub fn issue_client(&self, name: &str, valid_for: Duration) -> Identity {
        self.ca
            .issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth, valid_for)
    }

    /// Writes `ca.crt`, `server.crt`, `server.key`, `client.crt` and
    /// `client.key` into `dir` (keys mode 0600).
    pub fn write_to(&self, dir: &Path) -> PkiFiles {
        let ca = dir.join("ca.crt");
        write_file(&ca, &self.ca_pem, 0o644);
        let (server_cert, server_key) = self.server.write_to(dir, "server");
        let (client_cert, client_key) = self.client.write_to(dir, "client");
        PkiFiles {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// A rustls client config (ring provider) that trusts this CA only,
    /// presenting `identity` when a server asks for a client certificate.
    pub fn client_config(&self, identity: Option<&Identity>) -> ClientConfig {
        client_config(&self.ca_pem, identity)
    }
}

/// The signing half of a [`Pki`].
struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    fn issue(
        &self,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        valid_for: Duration,
    ) -> Identity {
        let key = KeyPair::generate().expect("rcgen generates a key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("certificate names {names:?}: {e}"));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.serial_number = Some(SerialNumber::from_slice(&crate::random::bytes::<16>()));
        let not_after = set_validity(&mut params, valid_for);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("rcgen signs the certificate");
        Identity {
            name: cn.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            not_after,
            key_der: key.serialize_der(),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Identity {
    /// The private key, DER, for rustls.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `<stem>.crt` and `<stem>.key` (mode 0600) into `dir` and
    /// returns their paths.
    pub fn write_to(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, &self.cert_pem, 0o644);
        write_file(&key, &self.key_pem, 0o600);
        (cert, key)
    }
}

/// A rustls server config (ring provider) presenting `identity`, offering
/// `alpn`; with `client_ca_pem`, the handshake fails unless the client shows
/// a certificate signed by one of the CAs in that PEM.
pub fn server_config(
    identity: &Identity,
    client_ca_pem: Option<&str>,
    alpn: &[&[u8]],
) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions");
    let builder = match client_ca_pem {
        Some(pem) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(pem)), provider)
                    .build()
                    .expect("client certificate verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(vec![identity.cert_der.clone()], identity.key_der())
        .expect("rustls accepts the server certificate and key");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A rustls client config (ring provider) trusting the CAs in `ca_pem`
/// only, presenting `identity` when asked for a client certificate.
pub fn client_config(ca_pem: &str, identity: Option<&Identity>) -> ClientConfig {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots(ca_pem));
    match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert_der.clone()], id.key_der())
            .expect("rustls accepts the client certificate and key"),
        None => builder.with_no_client_auth(),
    }
}

/// The certificates of a PEM bundle as a root store.
fn roots(pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.unwrap_or_else(|e| panic!("CA bundle is not PEM: {e}"));
        roots
            .add(cert)
            .unwrap_or_else(|e| panic!("CA certificate refused: {e}"));
    }
    assert!(!roots.is_empty(), "CA bundle holds no certificate");
    roots
}

/// Sets not-before an hour ago and not-after `valid_for` from now; returns
/// not-after.
fn set_validity(params: &mut CertificateParams, valid_for: Duration) -> SystemTime {
    // rcgen takes `time` dates; the epoch plus whole seconds keeps this
    // exact without naming the `time` crate.
    let at = |t: SystemTime| {
        rcgen::date_time_ymd(1970, 1, 1)
            + Duration::from_secs(
                t.duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_secs(),
            )
    };
    let now = SystemTime::now();
    let not_after = now + valid_for;
    params.not_before = at(now - BACKDATE);
    params.not_after = at(not_after);
    not_after
}

fn write_file(path: &Path, text: &str, mode: u32) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    f.write_all(text.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
