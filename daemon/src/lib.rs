//! The Outbox daemon library: everything `outboxd` and `outbox` run, so
//! tests reach it without going through the binaries.

pub mod api;
pub mod app;
pub mod apply;
pub mod bodylog;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod conntest;
pub mod daemon;
pub mod deliver;
pub mod dispatch;
pub mod docs;
pub mod headers;
pub mod model;
pub mod msglog;
pub mod oauth;
pub mod queue;
pub mod segfile;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod template;
pub mod tunnel;
pub mod units;
