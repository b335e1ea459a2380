//! The daemon-relay wire protocol of Outbox.
