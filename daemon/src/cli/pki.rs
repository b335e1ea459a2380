//! `outbox pki init DIR`: everything a tunnel needs, in one command.
//!
//! Writes a CA, a daemon certificate signed by it for the given host names,
//! a random relay token, and ready-to-edit `outboxd.toml` and `relay.toml`
//! snippets that point at those files. Keys and the token are mode 0600.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::{CliError, CliResult};

/// Certificates are valid for ten years from today.
const VALID_YEARS: i32 = 10;

pub fn init(dir: &Path, hosts: &[String], mid_server: &str) -> CliResult {
    if !crate::model::valid_name(mid_server) {
        return Err(CliError::Usage(format!(
            "--mid-server {mid_server:?}: letters, digits, '.', '_' and '-' only"
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Refused(format!("{}: {e}", dir.display())))?;
    // Every file it writes is checked first, so a refusal leaves nothing
    // half written.
    let files = [
        "ca.crt",
        "ca.key",
        "daemon.crt",
        "daemon.key",
        "relay-token",
        "outboxd.toml",
        "relay.toml",
    ];
    for f in files {
        // A dangling link counts: writing through it would fail half way.
        if dir.join(f).symlink_metadata().is_ok() {
            return Err(CliError::Refused(format!(
                "{} already exists; pki init never overwrites files (use an empty directory)",
                dir.join(f).display()
            )));
        }
    }
    let fail = |e: rcgen::Error| CliError::Refused(format!("certificate generation failed: {e}"));
    let year = 1970 + (crate::queue::now_ms() / 1000 / 31_556_952) as i32;
    let until = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);

    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Outbox tunnel CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;

    let key = KeyPair::generate().map_err(fail)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(fail)?;
    params.distinguished_name.push(
        DnType::CommonName,
        hosts.first().cloned().unwrap_or_default(),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_after = until;
    let cert = params.signed_by(&key, &ca_cert, &ca_key).map_err(fail)?;
    let token = crate::app::random_token();

    write(dir, "ca.crt", &ca_cert.pem(), 0o644)?;
    write(dir, "ca.key", &ca_key.serialize_pem(), 0o600)?;
    write(dir, "daemon.crt", &cert.pem(), 0o644)?;
    write(dir, "daemon.key", &key.serialize_pem(), 0o600)?;
    write(dir, "relay-token", &format!("{token}\n"), 0o600)?;

    let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let d = abs.display();
    let host = hosts.first().map(String::as_str).unwrap_or("localhost");
    let daemon_toml = format!(
        "# Add to outboxd.toml on the daemon host.\n\
         [tunnel]\n\
         listen = \"0.0.0.0:4433\"\n\
         cert = \"{d}/daemon.crt\"\n\
         key = \"{d}/daemon.key\"\n\n\
         [mid_servers.{mid_server}]\n\
         token = {{ file = \"{d}/relay-token\" }}\n"
    );
    let relay_toml = format!(
        "# relay.toml on the relay host: copy ca.crt and relay-token there.\n\
         name = \"{mid_server}\"\n\
         token = {{ file = \"/etc/outbox-relay/relay-token\" }}\n\
         daemons = [\"{host}:4433\"]\n\
         server_ca = \"/etc/outbox-relay/ca.crt\"\n\
         allow = []        # targets this relay may reach, e.g. \"jira.internal:443\", \"10.20.0.0/16\"\n\
         concurrency = 64\n\
         max_body = \"16MiB\"\n"
    );
    write(dir, "outboxd.toml", &daemon_toml, 0o644)?;
    write(dir, "relay.toml", &relay_toml, 0o644)?;
    outln!("wrote {d}: {}", files.join(", "));
    outln!("daemon certificate names: {}", hosts.join(", "));
    outln!("next: merge outboxd.toml into the daemon's config; copy ca.crt, relay-token and relay.toml to the relay host");
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> CliResult {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| CliError::Refused(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| CliError::Refused(format!("{}: {e}", path.display())))
}
