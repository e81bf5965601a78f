//! The packet-moving loop of the agent, on its dedicated data-path threads.
//!
//! Outbound (`tx.rs`): tunl0 -> [`Forwarder`] -> underlay socket. With TUN offload a read may be
//! a 64 KiB TCP super-packet; it is routed once and [`segment_headers`] builds each wire-sized
//! segment's headers behind its encapsulation, sent with the payload left where the TUN read
//! put it (VXLAN as UDP GSO trains, IP-in-IP one packet per `sendmmsg` message). Small packets
//! (ACKs, pings, DNS) are gathered over a turn in a [`TxBatch`] and sent with one `sendmmsg`
//! per lane (VXLAN outer source port) in use.
//!
//! Inbound (`rx.rs`): underlay sockets (`recvmmsg`, UDP GRO; VXLAN a `SO_REUSEPORT` group served
//! in turn) -> [`Forwarder`] -> [`Coalescer`] -> tunl0, so the segments of one flow become one
//! GSO write; `rewrite.rs` holds the packets that cannot be written from where they arrived.
//!
//! [`run`] (`event_loop.rs`) serves both directions of a [`Worker`]'s flows on one thread, which
//! on a small machine moves the same bytes with fewer context switches (see its doc). What the
//! workers share is in `shared.rs`, the sockets per encapsulation in `underlay.rs`.
//!
//! The loop owns its buffers (allocated once at start), reads the current route table through
//! `ArcSwap` without locking, and stops when the shared [`Stop`] is raised.
//!
//! [`Forwarder`]: crate::core::forward::Forwarder
//! [`segment_headers`]: podnet_proto::gso::segment_headers
//! [`TxBatch`]: crate::core::batch::TxBatch
//! [`Coalescer`]: podnet_proto::gro::Coalescer
//! [`Stop`]: crate::sys::Stop

mod event_loop;
mod rewrite;
mod rx;
mod shared;
mod tx;
mod underlay;
mod worker;

pub use event_loop::{run, DEFAULT_BUSY_POLL, DEFAULT_TUN_QUEUES};
pub use shared::{IoErrors, Shared};
pub use tx::send_control;
pub use underlay::Underlay;
pub use worker::Worker;
