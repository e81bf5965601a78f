//! `--encap wireguard`: one WireGuard tunnel per peer, under the node's key pair (`keys.rs`, with
//! its file in the state dir).
//!
//! The protocol (handshakes, cookies, timers, transport) is boringtun's `noise` module; this
//! module only keeps its state: one [`Tunn`] per peer, keyed by the peer's underlay address
//! (the known-peer check, as for VXLAN and IP-in-IP), rebuilt when the peer's key changes, and
//! one [`RateLimiter`] for the node, so a handshake flood from any mix of peers is answered
//! with cookie replies once it passes [`HANDSHAKES_PER_SECOND`].
//!
//! The data path calls [`Tunnel::seal`] and [`Tunnel::open`] with buffers it owns; the timer
//! thread calls [`Wireguard::tick`]. A peer's pod CIDR is its allowed IPs: the forwarder checks
//! each decrypted packet's source against the sending peer's CIDR (`spoofed`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;
use podnet_proto::api::WgKey;

use crate::core::drops::DropReason;
use crate::core::table::RouteTable;

mod keys;

pub use keys::{KeyError, Keys, KEY_FILE};
pub use podnet_proto::wireguard::{DATA_OVERHEAD, PORT};

/// Handshake messages per second the node answers before it asks for cookies (the whole node,
/// all peers together). A real peer handshakes every two minutes; a restart of every node of a
/// thousand-node cluster at once stays below it.
pub const HANDSHAKES_PER_SECOND: u64 = 100;

/// How often the timer thread runs each tunnel's timers (retransmits, keepalives, rekeys).
pub const TICK: Duration = Duration::from_millis(100);

/// Room any output buffer of [`Sealer::seal`] needs at least: a handshake initiation goes
/// out instead of the packet while there is no session.
pub const HANDSHAKE_ROOM: usize = 148;

/// Message types (the first byte of every WireGuard message; the other three are zero).
const HANDSHAKE_INIT: u8 = 1;
const HANDSHAKE_RESPONSE: u8 = 2;
const COOKIE_REPLY: u8 = 3;

/// What sealing one packet produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Sealed {
    /// A transport message of this many bytes is in the output buffer.
    Data(usize),
    /// No session yet: the packet is queued in the tunnel, and a handshake initiation of this
    /// many bytes is in the output buffer (0: one is already under way).
    Handshake(usize),
}

/// What opening one datagram produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// An inner packet, at this range of the output buffer.
    Packet(std::ops::Range<usize>),
    /// A handshake message, a keepalive or a cookie: nothing for the TUN. `reply` bytes
    /// (a handshake response, a keepalive, a cookie reply; 0: none) are in the output buffer
    /// for the sender; `completed` when this message completed a handshake.
    Control { reply: usize, completed: bool },
    /// A handshake refused because the node is under load: a cookie reply of this many bytes
    /// is in the output buffer for the sender (the message counts as `wg_cookie`).
    Cookie(usize),
    /// Dropped for this reason.
    Drop(DropReason),
}

/// One peer's WireGuard state.
pub struct Tunnel {
    pub key: WgKey,
    pub underlay_ip: Ipv4Addr,
    tunn: Mutex<Tunn>,
    /// Handshakes completed with this peer.
    pub handshakes: AtomicU64,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tunnel {{ key: {}, peer: {} }}",
            self.key, self.underlay_ip
        )
    }
}

/// A tunnel's figures for `status`, `why` and `/metrics`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TunnelStats {
    /// Seconds since the last completed handshake (`None`: none yet).
    pub last_handshake_s: Option<f64>,
    /// Inner bytes sent and received in this tunnel (boringtun's count: data messages only).
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub handshakes: u64,
}

/// Where a peer receives WireGuard.
pub fn endpoint(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, PORT)
}

impl Tunnel {
    fn lock(&self) -> MutexGuard<'_, Tunn> {
        // A panic inside boringtun while another worker held the lock leaves the tunnel as
        // it was; keep using it.
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encrypts inner `packet` into `out` (at least `packet.len() +` [`DATA_OVERHEAD`] and
    /// [`HANDSHAKE_ROOM`] bytes).
    pub fn seal(&self, packet: &[u8], out: &mut [u8]) -> Sealed {
        self.sealer().seal(packet, out)
    }

    /// The tunnel, held for a run of packets (the segments of a super-packet): one lock for
    /// all of them.
    pub fn sealer(&self) -> Sealer<'_> {
        Sealer(self.lock())
    }

    /// Decrypts or handles `datagram` from `src` into `out` (at least as long as `datagram`,
    /// and 148 bytes).
    pub fn open(&self, src: Ipv4Addr, datagram: &[u8], out: &mut [u8]) -> Opened {
        let Some(&first) = datagram.first() else {
            // boringtun reads an empty datagram as "hand out what you queued": from the
            // network it is only an empty, malformed message.
            return Opened::Drop(DropReason::Malformed);
        };
        let kind = Some(first);
        let mut tunn = self.lock();
        let opened = match tunn.decapsulate(Some(IpAddr::V4(src)), datagram, out) {
            TunnResult::WriteToTunnelV4(packet, _) => {
                let len = packet.len();
                Opened::Packet(0..len)
            }
            TunnResult::WriteToTunnelV6(..) => Opened::Drop(DropReason::NotIpv4),
            TunnResult::Done => Opened::Control {
                reply: 0,
                completed: kind == Some(HANDSHAKE_RESPONSE),
            },
            TunnResult::WriteToNetwork(reply) => match reply.first() {
                // Under load: a cookie instead of an answer.
                Some(&COOKIE_REPLY) => return Opened::Cookie(reply.len()),
                _ => Opened::Control {
                    reply: reply.len(),
                    completed: matches!(kind, Some(HANDSHAKE_INIT | HANDSHAKE_RESPONSE)),
                },
            },
            TunnResult::Err(e) => Opened::Drop(reason_of(&e)),
        };
        if let Opened::Control {
            completed: true, ..
        } = opened
        {
            self.handshakes.fetch_add(1, Relaxed);
        }
        opened
    }

    /// Hands out what the tunnel queued while it had no session (packets read before the
    /// handshake completed), each sealed into `out` and given to `send`.
    pub fn flush_queued(&self, out: &mut [u8], mut send: impl FnMut(&[u8])) {
        let mut tunn = self.lock();
        // Bounded: boringtun queues at most 256 packets per peer.
        for _ in 0..1024 {
            match tunn.decapsulate(None, &[], out) {
                TunnResult::WriteToNetwork(b) => send(b),
                _ => break,
            }
        }
    }

    /// Runs the tunnel's timers: a handshake to retry or start, a keepalive to send.
    fn update_timers(&self, out: &mut [u8], mut send: impl FnMut(&[u8])) {
        if let TunnResult::WriteToNetwork(b) = self.lock().update_timers(out) {
            send(b);
        }
    }

    /// Its figures now.
    pub fn stats(&self) -> TunnelStats {
        let (since, tx, rx, _, _) = self.lock().stats();
        TunnelStats {
            last_handshake_s: since.map(|d| d.as_secs_f64()),
            tx_bytes: tx as u64,
            rx_bytes: rx as u64,
            handshakes: self.handshakes.load(Relaxed),
        }
    }
}

/// A tunnel held for sealing (see [`Tunnel::sealer`]).
pub struct Sealer<'a>(MutexGuard<'a, Tunn>);

impl Sealer<'_> {
    /// Encrypts inner `packet` into `out` (at least `packet.len() +` [`DATA_OVERHEAD`] and
    /// [`HANDSHAKE_ROOM`] bytes).
    pub fn seal(&mut self, packet: &[u8], out: &mut [u8]) -> Sealed {
        match self.0.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(b) if b.first() == Some(&HANDSHAKE_INIT) => {
                Sealed::Handshake(b.len())
            }
            TunnResult::WriteToNetwork(b) => Sealed::Data(b.len()),
            // Queued while a handshake is under way (or refused, which boringtun reports only
            // for a buffer too small: the data path sizes them).
            _ => Sealed::Handshake(0),
        }
    }
}

/// The drop reason of a message boringtun refused.
pub fn reason_of(e: &WireGuardError) -> DropReason {
    use WireGuardError as E;
    match e {
        E::InvalidMac | E::InvalidAeadTag => DropReason::WgBadMac,
        E::DuplicateCounter | E::InvalidCounter | E::WrongTai64nTimestamp => DropReason::WgReplay,
        E::WrongIndex | E::NoCurrentSession | E::UnexpectedPacket | E::ConnectionExpired => {
            DropReason::WgUnknownIndex
        }
        E::WrongKey => DropReason::WgWrongKey,
        E::UnderLoad => DropReason::WgCookie,
        E::DestinationBufferTooSmall
        | E::IncorrectPacketLength
        | E::WrongPacketType
        | E::InvalidTai64nTimestamp
        | E::InvalidPacket
        | E::LockFailed => DropReason::Malformed,
    }
}

/// The node's WireGuard state: its keys, and a tunnel per peer of the current table.
pub struct Wireguard {
    keys: Keys,
    limiter: Arc<RateLimiter>,
    tunnels: ArcSwap<HashMap<Ipv4Addr, Arc<Tunnel>>>,
    /// Tunnel indexes (boringtun puts them in the top 24 bits of each session index).
    next_index: AtomicU32,
    /// Serializes [`Wireguard::sync`] (the membership task; a static node syncs once).
    syncing: Mutex<()>,
}

impl std::fmt::Debug for Wireguard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wireguard {{ public: {} }}", self.keys.public)
    }
}

impl Wireguard {
    pub fn new(keys: Keys) -> Wireguard {
        let public = PublicKey::from(keys.public.0);
        Wireguard {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            keys,
            tunnels: ArcSwap::from_pointee(HashMap::new()),
            next_index: AtomicU32::new(1),
            syncing: Mutex::new(()),
        }
    }

    pub fn public(&self) -> WgKey {
        self.keys.public
    }

    /// The tunnel to the peer at underlay address `ip`.
    pub fn tunnel(&self, ip: Ipv4Addr) -> Option<Arc<Tunnel>> {
        self.tunnels.load().get(&ip).cloned()
    }

    /// Every tunnel (for `status` and `/metrics`).
    pub fn tunnels(&self) -> Vec<Arc<Tunnel>> {
        let mut all: Vec<_> = self.tunnels.load().values().cloned().collect();
        all.sort_by_key(|t| t.underlay_ip);
        all
    }

    /// Makes the tunnels follow `table`: a tunnel for each WireGuard peer, kept while its key
    /// stays, started afresh when the key changes (the old sessions are of no use with the
    /// new key), dropped with the peer.
    pub fn sync(&self, table: &RouteTable) {
        let _one = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.tunnels.load();
        let mut next = HashMap::new();
        for peer in table.peers() {
            let Some(key) = peer.encap.wireguard_key() else {
                continue;
            };
            let ip = peer.underlay_ip;
            let tunnel = match old.get(&ip) {
                Some(t) if t.key == *key => Arc::clone(t),
                _ => {
                    if old.contains_key(&ip) {
                        tracing::info!(peer = %peer.node, key = %key.short(),
                            "peer has a new WireGuard key; starting its tunnel afresh");
                    }
                    Arc::new(self.new_tunnel(*key, ip))
                }
            };
            next.insert(ip, tunnel);
        }
        self.tunnels.store(Arc::new(next));
    }

    fn new_tunnel(&self, key: WgKey, ip: Ipv4Addr) -> Tunnel {
        // 24 bits of tunnel index; wrapping after 16 M peer (re)keyings is harmless, as old
        // tunnels are long gone by then.
        let index = self.next_index.fetch_add(1, Relaxed) & 0x00ff_ffff;
        let tunn = Tunn::new(
            self.keys.secret.clone(),
            PublicKey::from(key.0),
            None,
            None,
            index,
            Some(Arc::clone(&self.limiter)),
        )
        .expect("boringtun accepts every X25519 key pair");
        Tunnel {
            key,
            underlay_ip: ip,
            tunn: Mutex::new(tunn),
            handshakes: AtomicU64::new(0),
        }
    }

    /// One turn of the timer thread: every tunnel's timers, and the handshake rate count
    /// restarted each second (boringtun's limiter resets itself at most once a second).
    pub fn tick(&self, out: &mut [u8], mut send: impl FnMut(SocketAddrV4, &[u8])) {
        self.limiter.reset_count();
        for t in self.tunnels.load().values() {
            t.update_timers(out, |b| send(endpoint(t.underlay_ip), b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::{Peer, PeerEncap};
    use podnet_proto::ethernet::MacAddr;

    fn table_with(ip: Ipv4Addr, key: WgKey) -> RouteTable {
        RouteTable::build(
            1,
            vec![Peer {
                node: "h2".into(),
                underlay_ip: ip,
                vtep_mac: MacAddr::vtep_for(ip),
                pod_cidr: "10.244.2.0/24".parse().unwrap(),
                encap: PeerEncap::Wireguard(key),
            }],
        )
        .unwrap()
    }

    /// A UDP packet 10.244.1.2 -> 10.244.2.2 with `payload`.
    fn inner(payload: &[u8]) -> Vec<u8> {
        let len = 28 + payload.len();
        let mut p = vec![
            0x45,
            0,
            (len >> 8) as u8,
            len as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            0,
            0,
        ];
        p.extend_from_slice(&[10, 244, 1, 2, 10, 244, 2, 2]);
        p.extend_from_slice(&[0x30, 0x39, 0, 53, 0, (8 + payload.len()) as u8, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    /// Two nodes that know each other's keys, with a completed handshake.
    fn pair() -> (Wireguard, Wireguard, Arc<Tunnel>, Arc<Tunnel>) {
        let (ip1, ip2) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        let a = Wireguard::new(Keys::from_private([1; 32]));
        let b = Wireguard::new(Keys::from_private([2; 32]));
        a.sync(&table_with(ip2, b.public()));
        b.sync(&table_with(ip1, a.public()));
        let (ta, tb) = (a.tunnel(ip2).unwrap(), b.tunnel(ip1).unwrap());
        let mut out = vec![0u8; 2048];
        let mut reply = vec![0u8; 2048];
        // a's first packet starts the handshake and waits in a's queue.
        let Sealed::Handshake(n) = ta.seal(&inner(b"first"), &mut out) else {
            panic!("no session yet")
        };
        let Opened::Control {
            reply: r,
            completed,
        } = tb.open(ip1, &out[..n], &mut reply)
        else {
            panic!("initiation refused")
        };
        assert!(completed && r > 0);
        let Opened::Control {
            reply: k,
            completed,
        } = ta.open(ip2, &reply[..r], &mut out)
        else {
            panic!("response refused")
        };
        assert!(completed && k > 0, "the initiator answers with a keepalive");
        (a, b, ta, tb)
    }

    #[test]
    fn a_handshake_then_packets_both_ways_and_the_queued_first_packet() {
        let (_a, _b, ta, tb) = pair();
        let (ip1, ip2) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        let mut queued = Vec::new();
        let mut out = vec![0u8; 2048];
        ta.flush_queued(&mut out, |b| queued.push(b.to_vec()));
        assert_eq!(queued.len(), 1);
        let mut plain = vec![0u8; 2048];
        let Opened::Packet(r) = tb.open(ip1, &queued[0], &mut plain) else {
            panic!("queued packet refused")
        };
        assert_eq!(&plain[r], &inner(b"first")[..]);
        let p = inner(b"back");
        let Sealed::Data(n) = tb.seal(&p, &mut out) else {
            panic!("session established")
        };
        assert_eq!(n, p.len() + 32, "no padding: 16 header + 16 tag");
        let Opened::Packet(r) = ta.open(ip2, &out[..n], &mut plain) else {
            panic!("refused")
        };
        assert_eq!(&plain[r], &p[..]);
        assert_eq!(ta.stats().handshakes, 1);
        assert_eq!(tb.stats().handshakes, 1);
    }

    #[test]
    fn hostile_messages_get_their_reasons() {
        let (_a, b, ta, tb) = pair();
        let ip1 = Ipv4Addr::new(198, 18, 0, 1);
        let mut out = vec![0u8; 2048];
        let mut plain = vec![0u8; 2048];
        ta.flush_queued(&mut out, |_| {});
        let Sealed::Data(n) = ta.seal(&inner(b"payload"), &mut out) else {
            panic!()
        };
        let good = out[..n].to_vec();
        assert!(matches!(tb.open(ip1, &good, &mut plain), Opened::Packet(_)));
        // Replayed.
        assert_eq!(
            tb.open(ip1, &good, &mut plain),
            Opened::Drop(DropReason::WgReplay)
        );
        // Tampered ciphertext.
        let Sealed::Data(n) = ta.seal(&inner(b"payload"), &mut out) else {
            panic!()
        };
        let mut bad = out[..n].to_vec();
        bad[20] ^= 1;
        assert_eq!(
            tb.open(ip1, &bad, &mut plain),
            Opened::Drop(DropReason::WgBadMac)
        );
        // Unknown receiver index.
        let mut stranger = good.clone();
        stranger[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        assert_eq!(
            tb.open(ip1, &stranger, &mut plain),
            Opened::Drop(DropReason::WgUnknownIndex)
        );
        // Empty, truncated, and a handshake initiation one byte too long.
        assert_eq!(
            tb.open(ip1, &[], &mut plain),
            Opened::Drop(DropReason::Malformed)
        );
        assert_eq!(
            tb.open(ip1, &good[..10], &mut plain),
            Opened::Drop(DropReason::Malformed)
        );
        let mut long = vec![0u8; 149];
        long[0] = HANDSHAKE_INIT;
        assert_eq!(
            tb.open(ip1, &long, &mut plain),
            Opened::Drop(DropReason::Malformed)
        );
        // An initiation from the peer's address made with another key.
        let impostor = Wireguard::new(Keys::from_private([9; 32]));
        impostor.sync(&table_with(ip1, b.public()));
        let ti = impostor.tunnel(ip1).unwrap();
        let Sealed::Handshake(n) = ti.seal(&inner(b"x"), &mut out) else {
            panic!()
        };
        assert_eq!(
            tb.open(ip1, &out[..n], &mut plain),
            Opened::Drop(DropReason::WgWrongKey)
        );
    }

    #[test]
    fn a_handshake_flood_is_answered_with_cookies() {
        let b = Wireguard::new(Keys::from_private([2; 32]));
        let ip1 = Ipv4Addr::new(198, 18, 0, 1);
        let a_key = Keys::from_private([1; 32]).public();
        b.sync(&table_with(ip1, a_key));
        let tb = b.tunnel(ip1).unwrap();
        let mut out = vec![0u8; 2048];
        let mut plain = vec![0u8; 2048];
        let mut reasons = HashMap::new();
        for i in 0..(HANDSHAKES_PER_SECOND + 50) {
            // A fresh initiator each time: every message is a new, valid-looking initiation.
            let a = Wireguard::new(Keys::from_private([i as u8 | 1; 32]));
            a.sync(&table_with(Ipv4Addr::new(198, 18, 0, 2), b.public()));
            let t = a.tunnel(Ipv4Addr::new(198, 18, 0, 2)).unwrap();
            let Sealed::Handshake(n) = t.seal(&inner(b"x"), &mut out) else {
                panic!()
            };
            let msg = out[..n].to_vec();
            let key = match tb.open(ip1, &msg, &mut plain) {
                Opened::Cookie(n) => {
                    assert_eq!((n, plain[0]), (64, COOKIE_REPLY));
                    "wg_cookie"
                }
                Opened::Drop(r) => r.name(),
                Opened::Control { .. } => "answered",
                Opened::Packet(_) => "packet",
            };
            *reasons.entry(key).or_insert(0u64) += 1;
        }
        assert!(
            reasons.get("wg_cookie").copied().unwrap_or(0) >= 40,
            "{reasons:?}"
        );
    }

    #[test]
    fn a_new_key_starts_the_tunnel_afresh_and_the_same_key_keeps_it() {
        let ip = Ipv4Addr::new(198, 18, 0, 2);
        let w = Wireguard::new(Keys::from_private([1; 32]));
        w.sync(&table_with(ip, WgKey([5; 32])));
        let first = w.tunnel(ip).unwrap();
        w.sync(&table_with(ip, WgKey([5; 32])));
        assert!(Arc::ptr_eq(&first, &w.tunnel(ip).unwrap()));
        w.sync(&table_with(ip, WgKey([6; 32])));
        assert_eq!(w.tunnel(ip).unwrap().key, WgKey([6; 32]));
        w.sync(&RouteTable::empty());
        assert!(w.tunnel(ip).is_none());
    }
}
