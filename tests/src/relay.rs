//! A running `outbox-relay`: its config and log in a temporary directory,
//! killed when dropped, its log printed when the test is failing.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::bins::bin;
use crate::process;

pub struct Relay {
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
}

impl Relay {
    /// Writes `config` as `relay.toml` and starts the relay on it.
    pub fn start(config: &toml::Table) -> Relay {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, toml::to_string(config).expect("relay.toml"))
            .expect("write relay.toml");
        let mut r = Relay {
            dir,
            config: path,
            child: None,
        };
        r.spawn();
        r
    }

    /// Starts (or restarts) the process on the same config, appending to
    /// the same log.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(bin("outbox-relay"))
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .env("NO_COLOR", "1")
            .env_remove("CREDENTIALS_DIRECTORY")
            .spawn()
            .expect("outbox-relay starts");
        self.child = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("relay.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn assert_running(&mut self) {
        assert!(self.running(), "outbox-relay exited:\n{}", self.log());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill9(&mut c);
        }
    }

    pub async fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        process::terminate(&mut c, Duration::from_secs(20)).await
    }

    /// Sends SIGTERM and returns at once: the relay drains meanwhile.
    pub fn begin_stop(&mut self) {
        let c = self.child.as_mut().expect("running");
        process::signal_child(c, libc::SIGTERM).expect("SIGTERM to outbox-relay");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- outbox-relay log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        self.kill9();
    }
}

/// A UDP port free on 127.0.0.1 now, for a tunnel to listen on.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}
