//! Configuration mistakes a new user makes, through the real binaries:
//! `outboxd` and `outbox-relay` refuse them with exit status 2 and the key
//! named, at `--check-config` and at start alike, before anything listens;
//! and the CLI whose reader goes away ends quietly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

/// `outbox pki init` into a new temporary directory: a CA, the daemon's
/// certificate and key, a relay token.
fn pki() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("pki");
    let out = Command::new(bin("outbox"))
        .args(["pki", "init"])
        .arg(&dir)
        .output()
        .expect("outbox runs");
    assert!(out.status.success(), "pki init: {out:?}");
    (tmp, dir)
}

fn tunnel(cert: &Path, key: &Path) -> String {
    format!(
        "[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// Runs `outboxd` on `extra` with `--check-config` and as a real start:
/// both must exit 2 with one line naming `key` and holding `needle`, and
/// nothing may listen on the API port.
fn outboxd_refuses(extra: &str, env: &[(&str, &str)], key: &str, needle: &str) {
    let mut builder = suite_daemon().config_toml(extra);
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    let d = builder.prepare();
    for args in [&["--check-config"][..], &[][..]] {
        let out = d.outboxd_command(args).output().expect("outboxd runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra} {args:?}: {err}");
        assert!(err.contains(&format!("{key}:")), "{extra}: {err}");
        assert!(err.contains(needle), "{extra}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", d.port())).is_err());
}

#[test]
fn a_tunnel_key_that_is_not_the_certificates_exits_2() {
    let (_tmp, dir) = pki();
    let cert = dir.join("daemon.crt");
    // The certificate given as the key, and the CA's key: both files exist
    // and are PEM, so only loading them finds the mistake.
    outboxd_refuses(
        &tunnel(&cert, &cert),
        &[],
        "tunnel.key",
        &format!("{} holds no PEM private key", cert.display()),
    );
    let ca_key = dir.join("ca.key");
    outboxd_refuses(
        &tunnel(&cert, &ca_key),
        &[],
        "tunnel.key",
        &format!(
            "{} is not the private key of the certificate in {}",
            ca_key.display(),
            cert.display()
        ),
    );
}

#[test]
fn mid_servers_without_a_tunnel_exit_2() {
    outboxd_refuses(
        "[mid_servers.dc1]\ntoken = \"t\"",
        &[],
        "tunnel",
        "the tunnel must be configured for MID servers to connect",
    );
}

#[test]
fn blank_mid_server_tokens_exit_2() {
    let (_tmp, dir) = pki();
    let tunnel = tunnel(&dir.join("daemon.crt"), &dir.join("daemon.key"));
    outboxd_refuses(
        &format!("{tunnel}[mid_servers.dc1]\ntoken = \"\""),
        &[],
        "mid_servers.dc1.token",
        "is empty",
    );
    outboxd_refuses(
        &format!("{tunnel}[mid_servers.dc1]\ntoken = {{ env = \"E2E_BLANK_TOKEN\" }}"),
        &[("E2E_BLANK_TOKEN", "")],
        "mid_servers.dc1.token",
        "environment variable E2E_BLANK_TOKEN is empty",
    );
}

/// `outbox-relay --check-config` on `text` with `env` set.
fn relay_check(dir: &Path, text: &str, env: &[(&str, &str)]) -> Output {
    let path = write(dir, "relay.toml", text);
    let mut cmd = Command::new(bin("outbox-relay"));
    cmd.arg("--config").arg(path).arg("--check-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("outbox-relay runs")
}

#[test]
fn the_relay_refuses_blank_tokens_and_places_toml_errors() {
    let (tmp, dir) = pki();
    let base = format!(
        "name = \"dc1\"\ntoken = \"t\"\ndaemons = [\"127.0.0.1:4433\"]\nserver_ca = {:?}\n",
        dir.join("ca.crt").display().to_string()
    );
    let out = relay_check(tmp.path(), &base, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Valid, but a relay that refuses everything: said at the check as at
    // the start (pki init's relay.toml starts with an empty allow list).
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "outbox-relay: warning: the allow list is empty: every request will be refused\n"
    );
    let path = tmp.path().join("relay.toml").display().to_string();
    let cases = [
        (
            base.replace("token = \"t\"", "token = \"\""),
            "token: is empty".to_string(),
        ),
        (
            base.replace("token = \"t\"", "token = { env = \"E2E_BLANK_TOKEN\" }"),
            "token: environment variable E2E_BLANK_TOKEN is empty".to_string(),
        ),
        (
            base.replace("ca.crt", "relay-token"),
            format!(
                "server_ca: {} holds no PEM certificate",
                dir.join("relay-token").display()
            ),
        ),
        (
            format!("{base}drain = \"forever\"\n"),
            "drain: \"forever\" is not a duration such as \"30s\" or \"2m\" (expected number at 0)"
                .to_string(),
        ),
        (
            format!(
                "{base}[[protocol_profile]]\nname = \"p\"\nca = {:?}\n",
                dir.join("relay-token").display().to_string()
            ),
            format!(
                "protocol_profile[p].ca: {} holds no PEM certificate",
                dir.join("relay-token").display()
            ),
        ),
        (
            // Built at the check, as at the start: a key file that holds
            // no key is the key's problem.
            format!(
                "{base}[[protocol_profile]]\nname = \"p\"\nclient_cert = {:?}\nclient_key = {:?}\n",
                dir.join("ca.crt").display().to_string(),
                dir.join("relay-token").display().to_string()
            ),
            format!(
                "protocol_profile[p].client_key: {}: no items found",
                dir.join("relay-token").display()
            ),
        ),
        (
            base.replace("name = \"dc1\"", "name = \"dc 1\""),
            "name: MID server name \"dc 1\" has ' ' at byte 2, expected only letters, digits, '.', '_' or '-'"
                .to_string(),
        ),
        (
            base.replace("token = \"t\"", "token = { env = \"T\", file = \"t\" }"),
            format!(
                "token: a secret takes one of `env` and `file`, not both ({path}, line 2, column 9)"
            ),
        ),
        (
            format!("{base}concurrency = \"64\"\n"),
            format!(
                "concurrency: invalid type: string \"64\", expected u32 ({path}, line 5, column 15)"
            ),
        ),
    ];
    for (text, expected) in cases {
        let out = relay_check(tmp.path(), &text, &[("E2E_BLANK_TOKEN", "")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert_eq!(
            err.trim(),
            format!("outbox-relay: invalid configuration: {expected}"),
            "{text}"
        );
    }
}

#[test]
fn the_cli_ends_quietly_when_its_reader_is_gone() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let (reader, writer) = std::io::pipe().expect("a pipe");
    // Nobody reads: the first line the CLI prints meets a closed pipe.
    drop(reader);
    let out = Command::new(bin("outbox"))
        .args(["pki", "init"])
        .arg(tmp.path().join("pki"))
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("outbox runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err, "", "no panic, no message");
    // The command still did its work.
    assert!(tmp.path().join("pki/daemon.key").exists());
}

/// `pki init` into a directory that already holds one of the files it
/// writes refuses before writing anything, so it can be run again once the
/// file is moved away.
#[test]
fn pki_init_refuses_before_writing_anything() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("pki");
    std::fs::create_dir(&dir).expect("the directory");
    std::fs::write(dir.join("relay.toml"), "# mine\n").expect("a relay.toml");
    let init = || {
        Command::new(bin("outbox"))
            .args(["pki", "init"])
            .arg(&dir)
            .output()
            .expect("outbox runs")
    };
    let out = init();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("relay.toml already exists"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("the directory")
        .map(|e| e.expect("an entry").file_name())
        .collect();
    assert_eq!(left, ["relay.toml"], "nothing else written");
    assert_eq!(
        std::fs::read_to_string(dir.join("relay.toml")).unwrap(),
        "# mine\n"
    );
    std::fs::remove_file(dir.join("relay.toml")).expect("moved away");
    let out = init();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(dir.join("relay.toml").exists() && dir.join("ca.key").exists());
}
