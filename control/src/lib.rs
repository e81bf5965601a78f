//! The podnet control service.
//!
//! The service hands every node a pod CIDR carved from the cluster CIDR (`ipam`), tracks
//! membership with leases (`state`), persists it (`store`, one process; or `etcd` and
//! `replica`, any number of replicas over an etcd cluster, over TLS with `etcd_tls`) and serves the HTTP/JSON API with
//! resumable NDJSON watches (`server`). Network policy's records (pods, namespace labels,
//! policies) are kept beside the node table (`policy`). Agents use `client` to register, renew and follow the
//! node table; that library is the `podnet-control-client` crate, re-exported here. The wire
//! types live in `podnet_proto::api`.

pub mod clock;
pub mod copy;
pub mod documents;
pub mod etcd;
pub mod etcd_tls;
pub mod ipam;
pub mod policy;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;

pub use etcd::{Etcd, EtcdError};
pub use podnet_control_client::{
    client, metrics, Backoff, Client, ClientError, ClientStats, EventStream,
};
pub use podnet_proto::api;
pub use server::{Server, ServerConfig, ServerError};
pub use store::{Change, FileStore, MemoryStore, Store, StoreError};
