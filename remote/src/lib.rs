//! How the daemon (direct connections) and the relay (connections through
//! a MID server) reach remote systems, one way for both:
//!
//! - [`tls`]: rustls client settings from a protocol profile's files, and
//!   the probe that explains a request failed without a reason.
//! - [`pool`]: HTTP/1.1 and HTTP/2 connections kept for reuse, over any
//!   connector that gives hyper-rustls streams (the daemon's plain one, the
//!   relay's allow-list connector).

pub mod pool;
pub mod tls;
