//! What the end-to-end suites share beyond the harness library
//! ([`outbox_tests`]): a daemon builder with the suites' defaults, and the
//! small TOML builders their integration documents are made of. The
//! daemon, the sink, `eventually` and the rest are the library's,
//! re-exported here.

#![allow(dead_code, unused_imports)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;

pub use outbox_tests::bins::bin;
pub use outbox_tests::daemon::DEFAULT_TOKEN as TOKEN;
pub use outbox_tests::{
    eventually_msg, free_port, process, ApiClient, ApiReply, Daemon, DaemonBuilder, Received,
    Reply, Sink,
};

/// A daemon with the suites' defaults: a 5 s shutdown grace (the daemon's
/// own 30 s would make every SIGTERM with a delivery in flight slow); a
/// later `.config_toml("shutdown_grace = ...")` overrides it.
pub fn suite_daemon() -> DaemonBuilder {
    Daemon::builder().config_toml("shutdown_grace = \"5s\"")
}

/// Writes `text` to a file in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    p
}

/// A one-integration file with the given connections (TOML snippets).
pub fn integration(name: &str, connections: &[&str]) -> String {
    let mut t = format!(
        "[[integration]]\nname = \"{name}\"\nmax_attempts = 5\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\ntimeout = \"5s\"\nconcurrency = 4\n\n  [[integration.message]]\n  name = \"Create\"\n  method = \"POST\"\n  path = \"/api/${{variables.table}}/${{message.id}}\"\n  headers = {{ \"Content-Type\" = \"application/json\" }}\n"
    );
    for c in connections {
        t.push_str("\n  [[integration.connection]]\n");
        t.push_str(c);
        t.push('\n');
    }
    t
}

/// A connection snippet.
pub fn connection(name: &str, environment: &str, url: &str, extra: &str) -> String {
    format!(
        "  name = \"{name}\"\n  environment = \"{environment}\"\n  endpoint_url = \"{url}\"\n  variables = {{ table = \"incident\" }}\n  {extra}"
    )
}
