//! What an agent, the CNI plugin and an operator's tools need to talk to the control service,
//! and nothing of the service itself: the HTTP client with its watch and failover (`client`),
//! the retry delays (`backoff`), the client side of control-plane TLS (`tls`), the clock in
//! the API's unit (`clock`), the network policy calls (`policy`) and the Prometheus encoding
//! both sides serve (`metrics`).
//!
//! It is its own crate so that `podnet-agent` and `podnet-cni` link no etcd client, no
//! certificate generation and no control server. The wire types live in `podnet_proto::api`.

pub mod backoff;
pub mod client;
pub mod clock;
pub mod metrics;
pub mod policy;
pub mod tls;

pub use backoff::Backoff;
pub use client::{read_token_file, Client, ClientError, ClientStats, EventStream};
pub use podnet_proto::api;
