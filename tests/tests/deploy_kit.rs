//! The operations kit: systemd units (systemd/), example configuration and
//! integration files, and the installer (deploy/).
//!
//! These tests use the real tools: `systemd-analyze` (Debian package
//! `systemd`; `/bin/kill` of the units' ExecReload= comes from `procps`),
//! `sh` and, where installed, `shellcheck`; and the freshly built `outboxd`
//! and `outbox`. They do not use the harness library on purpose: they only
//! need the binaries' paths.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root (this crate is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `target/debug` of this workspace, honouring `$CARGO_TARGET_DIR`.
fn bin_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => root().join(dir),
        None => root().join("target"),
    };
    target.join("debug")
}

/// Builds `outboxd` and `outbox` once per test run, and returns the directory
/// they are in.
fn binaries() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(&cargo)
            .args(["build", "-p", "outbox-daemon", "--bins"])
            .current_dir(root())
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
        assert!(
            status.success(),
            "cargo build -p outbox-daemon --bins failed"
        );
        let dir = bin_dir();
        for bin in ["outboxd", "outbox"] {
            assert!(
                dir.join(bin).is_file(),
                "{} missing after the build",
                dir.join(bin).display()
            );
        }
        dir
    })
}

/// The relay binary once it exists; until then `None`.
fn relay_binary() -> Option<PathBuf> {
    let path = binaries().join("outbox-relay");
    path.is_file().then_some(path)
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: impl AsRef<Path>, text: &str) {
    let path = path.as_ref();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `text` with `from` replaced by `to`; `from` must occur, so a change of
/// the example files that breaks a rewrite fails here, not silently.
fn rewrite(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "expected {from:?} in the file being rewritten:\n{text}"
    );
    text.replace(from, to)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn show(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A command with no `OUTBOX_*` variables of the caller's environment, so
/// that nothing but the test's own overrides reaches the daemon's config.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let is_ours = key.to_str().is_some_and(|k| k.starts_with("OUTBOX_"));
        if is_ours || key == "CREDENTIALS_DIRECTORY" {
            cmd.env_remove(key);
        }
    }
    cmd
}

// --- systemd units -------------------------------------------------------

/// `systemd-analyze`, or a failure that says how to install it: these checks
/// must not pass by being skipped.
fn systemd_analyze() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join("systemd-analyze"))
        .find(|p| p.is_file());
    match found {
        Some(path) => path,
        None => panic!(
            "systemd-analyze is not installed: it checks the unit files in systemd/. \
             Install it with `apt-get install -y systemd` (Debian package `systemd`)."
        ),
    }
}

/// A unit from systemd/, with its binaries pointed at the freshly built
/// ones, written into `dir` under its own name (verify resolves ExecStart=
/// and ExecReload= and refuses a command that does not exist).
fn unit_for_verify(dir: &Path, name: &str) -> PathBuf {
    let text = read(root().join("systemd").join(name));
    let outboxd = binaries().join("outboxd");
    let text = text.replace("/usr/bin/outboxd", outboxd.to_str().unwrap());
    // Until the relay exists, any executable will do for verify: outboxd.
    let relay = relay_binary().unwrap_or(outboxd);
    let text = text.replace("/usr/bin/outbox-relay", relay.to_str().unwrap());
    let path = dir.join(name);
    write(&path, &text);
    path
}

const UNITS: [&str; 2] = ["outboxd.service", "outbox-relay.service"];

#[test]
fn units_pass_systemd_analyze_verify() {
    let analyze = systemd_analyze();
    assert!(
        Path::new("/bin/kill").is_file(),
        "/bin/kill (ExecReload= of outboxd.service) is missing: apt-get install -y procps"
    );
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let unit = unit_for_verify(dir.path(), name);
        let out = Command::new(&analyze)
            .arg("verify")
            .arg(&unit)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "systemd-analyze verify {name} failed:\n{}",
            show(&out)
        );
        // verify exits 0 on unknown keys and bad values, with a warning
        // ("outboxd.service:24: Unknown key ...") on stderr.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let about_unit: Vec<&str> = text.lines().filter(|l| l.contains(name)).collect();
        assert!(
            about_unit.is_empty(),
            "systemd-analyze verify warns about {name}:\n{}",
            about_unit.join("\n")
        );
    }
}

#[test]
fn units_are_rated_ok_by_systemd_analyze_security() {
    let analyze = systemd_analyze();
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let unit = unit_for_verify(dir.path(), name);
        // --offline (systemd >= 250) rates a unit file without a running systemd.
        let out = Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let marker = format!("Overall exposure level for {name}: ");
        let level: f64 = stdout
            .lines()
            .find_map(|l| l.split_once(&marker).map(|(_, rest)| rest))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no exposure level for {name} (systemd-analyze security --offline needs \
                     systemd >= 250):\n{}",
                    show(&out)
                )
            });
        // 0 is a fully locked box, 10 an unconfined service; below 2 is "OK".
        assert!(
            level < 2.0,
            "{name} is rated {level}: some hardening was lost\n{stdout}"
        );
    }
}

/// The `Key=value` lines of a unit, comments dropped.
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn assert_has(unit: &str, d: &[(String, String)], key: &str, value: &str) {
    assert!(
        d.iter().any(|(k, v)| k == key && v == value),
        "{unit}: missing {key}={value}"
    );
}

/// The IDs of the unit's `LoadCredential=ID:PATH` lines.
fn credentials(d: &[(String, String)]) -> BTreeSet<String> {
    d.iter()
        .filter(|(k, _)| k == "LoadCredential")
        .map(|(_, v)| {
            v.split_once(':')
                .expect("LoadCredential=ID:PATH")
                .0
                .to_string()
        })
        .collect()
}

#[test]
fn units_carry_the_required_settings() {
    let hardening = [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallFilter", "~@privileged @resources"),
        ("SystemCallArchitectures", "native"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("UMask", "0077"),
        ("Restart", "on-failure"),
        ("RestartSec", "2s"),
        ("TimeoutStopSec", "45s"),
        ("KillSignal", "SIGTERM"),
        ("WantedBy", "multi-user.target"),
    ];
    for name in UNITS {
        let d = directives(&read(root().join("systemd").join(name)));
        for (key, value) in hardening {
            assert_has(name, &d, key, value);
        }
    }

    let d = directives(&read(root().join("systemd/outboxd.service")));
    let unit = "outboxd.service";
    assert_has(
        unit,
        &d,
        "ExecStart",
        "/usr/bin/outboxd --config /etc/outbox/outboxd.toml",
    );
    assert_has(unit, &d, "ExecReload", "/bin/kill -HUP $MAINPID");
    assert_has(unit, &d, "WatchdogSec", "30s");
    assert_has(unit, &d, "StateDirectory", "outbox");
    assert_has(
        unit,
        &d,
        "LoadCredential",
        "api-token:/etc/outbox/api-token",
    );
    assert_has(
        unit,
        &d,
        "LoadCredential",
        "mid-dc1-token:/etc/outbox/mid-dc1-token",
    );

    let d = directives(&read(root().join("systemd/outbox-relay.service")));
    let unit = "outbox-relay.service";
    assert_has(
        unit,
        &d,
        "ExecStart",
        "/usr/bin/outbox-relay --config /etc/outbox-relay/relay.toml",
    );
    assert_has(
        unit,
        &d,
        "LoadCredential",
        "relay-token:/etc/outbox-relay/relay-token",
    );
    assert!(
        !d.iter()
            .any(|(k, _)| k == "ExecReload" || k == "StateDirectory"),
        "{unit}: the relay has nothing to reload and no state"
    );
}

/// Every `{ file = "NAME" }` with a relative NAME in a TOML value, and every
/// `/run/credentials/UNIT/NAME` path: what the unit must load as credentials.
fn credential_refs(value: &toml::Value, unit: &str, out: &mut BTreeSet<String>) {
    let prefix = format!("/run/credentials/{unit}/");
    match value {
        toml::Value::Table(t) => {
            if let (1, Some(toml::Value::String(file))) = (t.len(), t.get("file")) {
                if Path::new(file).is_relative() {
                    out.insert(file.clone());
                }
            }
            t.values().for_each(|v| credential_refs(v, unit, out));
        }
        toml::Value::Array(a) => a.iter().for_each(|v| credential_refs(v, unit, out)),
        toml::Value::String(s) => {
            if let Some(name) = s.strip_prefix(&prefix) {
                out.insert(name.to_string());
            }
        }
        _ => {}
    }
}

#[test]
fn configs_name_only_credentials_their_unit_loads() {
    for (config, unit) in [
        ("deploy/outboxd.toml", "outboxd.service"),
        ("deploy/relay.toml", "outbox-relay.service"),
    ] {
        let value: toml::Value = toml::from_str(&read(root().join(config))).unwrap();
        let mut used = BTreeSet::new();
        credential_refs(&value, unit, &mut used);
        let loaded = credentials(&directives(&read(root().join("systemd").join(unit))));
        let missing: Vec<_> = used.difference(&loaded).collect();
        // relay.toml's client key is an optional drop-in credential.
        let missing: Vec<_> = missing.into_iter().filter(|n| *n != "acme.key").collect();
        assert!(
            missing.is_empty(),
            "{config} refers to credentials {missing:?} that {unit} does not load ({loaded:?})"
        );
    }
    // The daemon's stop timeout leaves room for the grace period.
    let config: toml::Value = toml::from_str(&read(root().join("deploy/outboxd.toml"))).unwrap();
    assert_eq!(config["shutdown_grace"].as_str(), Some("30s"));
}

// --- outboxd.toml and integration files ------------------------------------

/// The env variables the integration files name as `{ env = "NAME" }`.
fn env_secrets(dir: &Path) -> BTreeSet<String> {
    fn walk(v: &toml::Value, out: &mut BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                if let (1, Some(toml::Value::String(name))) = (t.len(), t.get("env")) {
                    out.insert(name.clone());
                }
                t.values().for_each(|v| walk(v, out));
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for file in integration_files(dir) {
        let value: toml::Value =
            toml::from_str(&read(&file)).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        walk(&value, &mut out);
    }
    out
}

fn integration_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// deploy/outboxd.toml made runnable in `tmp`: the apply glob points at
/// `integrations`, the data dir, tunnel certificate and key into `tmp`, and
/// the credentials (relative `{ file = .. }` secrets) in `tmp/credentials`.
/// Returns the config path and the `CREDENTIALS_DIRECTORY`.
fn staged_config(tmp: &Path, integrations: &Path) -> (PathBuf, PathBuf) {
    let creds = tmp.join("credentials");
    write(creds.join("api-token"), "test-api-token\n");
    write(creds.join("mid-dc1-token"), "test-mid-token\n");
    // The tunnel's certificate and key must be a real pair: the config
    // check loads them.
    let tunnel = outbox_tests::Pki::new().server().clone();
    write(creds.join("tunnel-key"), &tunnel.key_pem);
    write(tmp.join("pki/daemon.crt"), &tunnel.cert_pem);
    let text = read(root().join("deploy/outboxd.toml"));
    let text = rewrite(
        &text,
        "\"/etc/outbox/integrations.d/*.toml\"",
        &format!("{:?}", format!("{}/*.toml", integrations.display())),
    );
    let text = rewrite(
        &text,
        "\"/var/lib/outbox\"",
        &format!("{:?}", tmp.join("data")),
    );
    let text = rewrite(
        &text,
        "\"/etc/outbox/pki/daemon.crt\"",
        &format!("{:?}", tmp.join("pki/daemon.crt")),
    );
    let text = rewrite(
        &text,
        "\"/run/credentials/outboxd.service/tunnel-key\"",
        &format!("{:?}", creds.join("tunnel-key")),
    );
    let config = tmp.join("outboxd.toml");
    write(&config, &text);
    (config, creds)
}

fn check_config(config: &Path, creds: &Path, integrations: &Path) -> Output {
    let mut cmd = clean_command(binaries().join("outboxd"));
    cmd.arg("--check-config")
        .arg("--config")
        .arg(config)
        .env("CREDENTIALS_DIRECTORY", creds);
    for name in env_secrets(integrations) {
        cmd.env(name, "test-secret");
    }
    cmd.output().unwrap()
}

#[test]
fn deploy_config_and_integration_files_pass_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let integrations = root().join("deploy/integrations.d");
    let count = integration_files(&integrations).len();
    assert!(count >= 2, "deploy/integrations.d has {count} files");
    let (config, creds) = staged_config(tmp.path(), &integrations);
    let out = check_config(&config, &creds, &integrations);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("({count} integration file(s))")),
        "every file of deploy/integrations.d should be checked:\n{}",
        show(&out)
    );
    // --check-config only reads.
    assert!(!tmp.path().join("data").exists());
}

#[test]
fn every_spec_section_is_in_the_deploy_config() {
    let value: toml::Value = toml::from_str(&read(root().join("deploy/outboxd.toml"))).unwrap();
    for key in ["data_dir", "retention", "apply"] {
        assert!(value.get(key).is_some(), "outboxd.toml lacks {key}");
    }
    // [inbound] is documented there but commented out: this version does
    // not serve it.
    assert!(read(root().join("deploy/outboxd.toml")).contains("# [inbound]"));
    for section in ["api", "tunnel", "mid_servers", "log"] {
        assert!(
            value.get(section).is_some_and(toml::Value::is_table),
            "outboxd.toml lacks [{section}]"
        );
    }
    assert_eq!(value["data_dir"].as_str(), Some("/var/lib/outbox"));
    assert_eq!(
        value["apply"].as_array().map(Vec::as_slice),
        Some(&[toml::Value::from("/etc/outbox/integrations.d/*.toml")][..])
    );
    assert_eq!(
        value["api"]["token"]
            .get("file")
            .and_then(toml::Value::as_str),
        Some("api-token"),
        "the API token comes from the api-token credential"
    );
}

#[test]
fn a_typo_in_an_integration_file_is_refused_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let integrations = tmp.path().join("integrations.d");
    for file in integration_files(&root().join("deploy/integrations.d")) {
        let mut text = read(&file);
        if file.file_name().unwrap() == "acme-incidents.toml" {
            text = rewrite(
                &text,
                "environment = \"production\"",
                "environment = \"prodd\"",
            );
        }
        write(integrations.join(file.file_name().unwrap()), &text);
    }
    let (config, creds) = staged_config(tmp.path(), &integrations);
    let out = check_config(&config, &creds, &integrations);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("integration[acme-incidents].connection[prod].environment")
            && stderr.contains("prodd"),
        "the problem should be named by its path:\n{}",
        show(&out)
    );
}

#[test]
fn relay_toml_has_the_spec_keys() {
    let value: toml::Value = toml::from_str(&read(root().join("deploy/relay.toml"))).unwrap();
    let t = value.as_table().unwrap();
    let known: BTreeSet<&str> = [
        "name",
        "token",
        "daemons",
        "server_ca",
        "allow",
        "concurrency",
        "max_body",
        "protocol_profile",
    ]
    .into();
    for key in t.keys() {
        assert!(
            known.contains(key.as_str()),
            "relay.toml: unknown key {key}"
        );
    }
    assert_eq!(t["name"].as_str(), Some("dc1"));
    assert_eq!(
        t["token"].get("file").and_then(toml::Value::as_str),
        Some("relay-token"),
        "the relay token comes from the relay-token credential"
    );
    let daemons = t["daemons"].as_array().expect("daemons is an array");
    assert!(!daemons.is_empty());
    for d in daemons {
        let d = d.as_str().expect("a daemon is \"host:port\"");
        let (host, port) = d.rsplit_once(':').expect("a daemon is \"host:port\"");
        assert!(!host.is_empty() && port.parse::<u16>().is_ok(), "{d}");
    }
    assert!(t["server_ca"].as_str().is_some_and(|p| p.starts_with('/')));
    assert!(t["allow"]
        .as_array()
        .is_some_and(|a| a.iter().all(toml::Value::is_str)));
    assert!(t["concurrency"].as_integer().is_some_and(|n| n > 0));
    assert!(t["max_body"].as_str().is_some());
    let profiles = t["protocol_profile"]
        .as_array()
        .expect("[[protocol_profile]]");
    for p in profiles {
        for key in ["name", "client_cert", "client_key"] {
            assert!(p.get(key).is_some_and(toml::Value::is_str), "{key}");
        }
    }
    // The relay's MID server name is one the daemon config knows.
    let daemon: toml::Value = toml::from_str(&read(root().join("deploy/outboxd.toml"))).unwrap();
    assert!(daemon["mid_servers"].get("dc1").is_some());
}

// --- install.sh ------------------------------------------------------------

fn install(args: &[&str]) -> Output {
    clean_command("sh")
        .arg(root().join("deploy/install.sh"))
        .args(args)
        .env_remove("DESTDIR")
        .output()
        .unwrap()
}

#[test]
fn install_script_passes_sh_n_and_shellcheck() {
    let script = root().join("deploy/install.sh");
    let out = Command::new("sh").arg("-n").arg(&script).output().unwrap();
    assert!(out.status.success(), "sh -n:\n{}", show(&out));
    match Command::new("shellcheck").arg(&script).output() {
        Ok(out) => assert!(out.status.success(), "shellcheck:\n{}", show(&out)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("shellcheck is not installed (apt-get install shellcheck); only sh -n ran");
        }
        Err(e) => panic!("shellcheck: {e}"),
    }
}

#[test]
fn install_script_installs_into_a_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    let dest_s = dest.to_str().unwrap();
    let bins = binaries().to_str().unwrap();
    let out = install(&[
        "--root",
        dest_s,
        "--binaries",
        bins,
        "--host",
        "outbox.test",
    ]);
    assert!(out.status.success(), "install.sh:\n{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("systemctl enable --now outboxd"),
        "install.sh prints the next steps:\n{}",
        show(&out)
    );

    let expect = [
        ("usr/bin/outboxd", 0o755),
        ("usr/bin/outbox", 0o755),
        ("etc/systemd/system/outboxd.service", 0o644),
        ("etc/outbox", 0o755),
        ("etc/outbox/integrations.d", 0o755),
        ("etc/outbox/outboxd.toml", 0o644),
        ("etc/outbox/api-token", 0o600),
        ("etc/outbox/mid-dc1-token", 0o600),
        ("etc/outbox/pki/ca.crt", 0o644),
        ("etc/outbox/pki/ca.key", 0o600),
        ("etc/outbox/pki/daemon.crt", 0o644),
        ("etc/outbox/pki/daemon.key", 0o600),
        ("usr/share/doc/outbox/README.md", 0o644),
        ("usr/share/doc/outbox/examples/outboxd.toml", 0o644),
        ("usr/share/doc/outbox/examples/relay.toml", 0o644),
        (
            "usr/share/doc/outbox/examples/integrations.d/acme-incidents.toml",
            0o644,
        ),
    ];
    for (path, want) in expect {
        let got = mode(&dest.join(path));
        assert_eq!(got, want, "{path}: mode {got:o}, want {want:o}");
    }
    assert_eq!(
        read(dest.join("etc/systemd/system/outboxd.service")),
        read(root().join("systemd/outboxd.service"))
    );
    assert_eq!(
        read(dest.join("etc/outbox/outboxd.toml")),
        read(root().join("deploy/outboxd.toml"))
    );
    for token in ["api-token", "mid-dc1-token"] {
        let text = read(dest.join("etc/outbox").join(token));
        let t = text.trim_end();
        assert!(
            t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()),
            "{token}: {text:?} is not 256 random bits in hex"
        );
    }
    assert_ne!(
        read(dest.join("etc/outbox/api-token")),
        read(dest.join("etc/outbox/mid-dc1-token"))
    );
    // Integration examples are documentation: nothing is applied by default.
    assert_eq!(
        integration_files(&dest.join("etc/outbox/integrations.d")).len(),
        0
    );
    // The leftovers of pki init are gone: one token, one config.
    for gone in ["pki/relay-token", "pki/outboxd.toml", "pki/relay.toml"] {
        assert!(!dest.join("etc/outbox").join(gone).exists(), "{gone}");
    }

    // The installed tree holds together: the installed config with the
    // installed secrets and PKI, applying the example integration files.
    // (The apply glob is rewritten in a copy rather than overridden with
    // OUTBOX_APPLY: outboxd does not yet parse that variable as a list.)
    let etc = dest.join("etc/outbox");
    let examples = dest.join("usr/share/doc/outbox/examples/integrations.d");
    let config = tmp.path().join("installed-outboxd.toml");
    write(
        &config,
        &rewrite(
            &read(etc.join("outboxd.toml")),
            "\"/etc/outbox/integrations.d/*.toml\"",
            &format!("{:?}", format!("{}/*.toml", examples.display())),
        ),
    );
    let mut cmd = clean_command(dest.join("usr/bin/outboxd"));
    cmd.args(["--check-config", "--config"])
        .arg(&config)
        .env("CREDENTIALS_DIRECTORY", &etc)
        .env("OUTBOX_DATA_DIR", tmp.path().join("data"))
        .env("OUTBOX_TUNNEL__CERT", etc.join("pki/daemon.crt"))
        .env("OUTBOX_TUNNEL__KEY", etc.join("pki/daemon.key"));
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "installed config:\n{}",
        show(&out)
    );

    // Again, as an upgrade: configs and secrets are kept, units replaced.
    let edited = format!(
        "{}\n# edited by the operator\n",
        read(etc.join("outboxd.toml"))
    );
    write(etc.join("outboxd.toml"), &edited);
    let token = read(etc.join("api-token"));
    let key = read(etc.join("pki/daemon.key"));
    write(dest.join("etc/systemd/system/outboxd.service"), "stale\n");
    let out = install(&["--root", dest_s, "--binaries", bins]);
    assert!(out.status.success(), "install.sh again:\n{}", show(&out));
    assert_eq!(read(etc.join("outboxd.toml")), edited);
    assert_eq!(read(etc.join("api-token")), token);
    assert_eq!(read(etc.join("pki/daemon.key")), key);
    assert_eq!(
        read(dest.join("etc/systemd/system/outboxd.service")),
        read(root().join("systemd/outboxd.service"))
    );

    // The relay side needs its binary; until it is built, the installer
    // says so and installs nothing of it.
    let out = install(&["--root", dest_s, "--binaries", bins, "--role", "relay"]);
    match relay_binary() {
        Some(_) => {
            assert!(
                out.status.success(),
                "install.sh --role relay:\n{}",
                show(&out)
            );
            for (path, want) in [
                ("usr/bin/outbox-relay", 0o755),
                ("etc/systemd/system/outbox-relay.service", 0o644),
                ("etc/outbox-relay/relay.toml", 0o644),
            ] {
                let got = mode(&dest.join(path));
                assert_eq!(got, want, "{path}: mode {got:o}, want {want:o}");
            }
        }
        None => {
            assert!(!out.status.success(), "{}", show(&out));
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("outbox-relay"),
                "{}",
                show(&out)
            );
            assert!(!dest.join("etc/outbox-relay").exists());
        }
    }
}

#[test]
fn install_script_refuses_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("root");
    let bins = binaries().to_str().unwrap();
    let out = install(&[
        "--root",
        dest.to_str().unwrap(),
        "--binaries",
        bins,
        "--role",
        "both",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role"));
    let out = install(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(!dest.join("usr").exists());
}
