//! `outbox_tests`: the end-to-end harness of Outbox — the real `outboxd` and `outbox` binaries on free loopback ports, and real local servers playing the remote systems.
//!
//! One module per role:
//!
//! - [`bins`] finds the workspace's binaries and builds them once per test
//!   process, so a test never runs a stale `outboxd`;
//! - [`daemon`] starts `outboxd` on a temporary data dir ([`Daemon`]) and
//!   talks to it over its API and through the `outbox` CLI;
//! - [`pki`] makes CAs and certificates with rcgen ([`Pki`]);
//! - [`sink`] is the remote system: an HTTP(S) server that checks client
//!   certificates and credentials, answers a script of statuses and records
//!   every request ([`Sink`]);
//! - [`oauth`] is an OAuth 2.0 client-credentials token endpoint
//!   ([`OAuthServer`]);
//! - [`client`] is an HTTPS client trusting a [`Pki`], to test the servers
//!   themselves;
//! - [`relay`] runs `outbox-relay` ([`Relay`]);
//! - [`wait`] holds [`eventually`], the bounded poll tests use instead of
//!   sleeping, and [`free_port`].
//!
//! Every server binds `127.0.0.1:0` and stops when dropped; every child
//! process is killed when its handle is dropped. This is test support: a
//! broken precondition panics with a message saying what went wrong.
//!
//! The binary `outbox-bench` (the load generator) lives in `src/bin`; of
//! this library it uses only [`process`] (signals and log tails).

pub mod bins;
pub mod client;
pub mod daemon;
pub mod oauth;
pub mod pki;
pub mod process;
mod random;
pub mod relay;
mod server;
pub mod sink;
pub mod wait;

pub use daemon::{ApiClient, ApiReply, Daemon, DaemonBuilder};
pub use oauth::{OAuthServer, OAuthServerBuilder};
pub use pki::{Identity, Pki, PkiFiles};
pub use relay::{free_udp_port, Relay};
pub use sink::{Received, Reply, Sink, SinkBuilder};
pub use wait::{eventually, eventually_msg, free_port};

/// Installs rustls' ring provider as the process default, once. Everything
/// in this crate passes the provider explicitly; this is for code that asks
/// rustls for the default (a `ClientConfig::builder()` in a test).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another provider is already installed: keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
