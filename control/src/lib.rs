//! The podnet control service and its client library.
//!
//! The service hands every node a pod CIDR carved from the cluster CIDR (`ipam`), tracks
//! membership with leases (`state`), persists it (`store`, one process; or `etcd` and
//! `replica`, any number of replicas over an etcd cluster) and serves the HTTP/JSON API with
//! resumable NDJSON watches (`server`). Agents use `client` to register, renew and follow the
//! node table. The wire types live in `podnet_proto::api`.

pub mod client;
pub mod etcd;
pub mod ipam;
pub mod metrics;
mod replica;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;

pub use client::{Backoff, Client, ClientError, ClientStats, EventStream};
pub use etcd::{Etcd, EtcdError};
pub use podnet_proto::api;
pub use server::{Server, ServerConfig, ServerError};
pub use store::{FileStore, MemoryStore, Store, StoreError};
