//! OS shells: the only code in podnet that talks to the kernel.
//!
//! Each module is a thin adapter over one kernel interface: [`tun`] (the TUN device, optionally
//! with virtio-net offload headers), [`udp`] (the VXLAN sockets with `recvmmsg`/`sendmmsg`, UDP GSO
//! and GRO), [`raw`] (the IP-in-IP raw sockets), [`netlink`] (host setup over rtnetlink, and its
//! change notifications), [`sysctl`], [`caps`] and [`lock`] (one agent per network namespace). The
//! data path thread reads its descriptors without blocking (`try_read`, `try_recv_batch`) and waits
//! on all of them at once in one epoll instance ([`Watch`], in `wait.rs`), with caller-owned
//! buffers; nothing here allocates per packet. The shared [`Stop`] signal is part of every wait, so
//! shutdown releases it at once.
//!
//! Unsafe code is allowed in this module tree only, and every unsafe block says why it is sound.

pub mod caps;
pub mod lock;
mod mmsg;
pub mod netlink;
pub mod netns;
pub mod nflog;
pub mod raw;
mod sockopt;
pub mod sysctl;
pub mod tun;
pub mod udp;
mod wait;

#[cfg(test)]
pub(crate) mod testns;

pub use mmsg::{
    BatchSent, RecvMeta, Transmit, MAX_BATCH, MAX_GSO_SEGMENTS, MAX_SEGMENTS, MAX_UDP_PAYLOAD,
};
pub use wait::{Readiness, Stop, Watch, WATCH_MAX};
