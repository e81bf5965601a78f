//! The HTTP/JSON control API around the [`Registry`](crate::state::Registry) (routes in DESIGN.md
//! "Control plane").
//!
//! One async mutex serializes changes so the store sees them in order; a change is applied to a
//! copy of the registry, written to the store, and only then committed, announced to watchers
//! and acknowledged. Watch streams are NDJSON, resumable from a revision while the history
//! still holds it (410 Gone otherwise, so the client lists again).
//!
//! The parts: `config` (settings and start-up errors), `shared` (the state every request and
//! task shares, and the `Backend` interface of the stores), `file` and `replica` (the two
//! backends), `handlers`, `policy` (network policy's records), `watch`, `auth` and `layers` (the HTTP side), `answer` (the answers
//! they share), `guard` (connection limits below HTTP), `metrics`, and `service`, which puts
//! them together.

mod answer;
mod auth;
mod config;
mod file;
mod guard;
mod handlers;
mod layers;
mod metrics;
mod policy;
mod replica;
mod service;
mod shared;
mod watch;

pub use config::{ServerConfig, ServerError, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_WATCHERS};
pub use handlers::parse_register;
pub use service::Server;
