//! WireGuard's sizes and port as the rest of podnet needs them (the MTU, the socket, the
//! buffers). The protocol itself (handshakes, cookies, timers, transport) is boringtun's.

use crate::ipv4;

/// The UDP port WireGuard nodes receive on (the protocol's customary port, DESIGN.md).
pub const PORT: u16 = 51820;

/// Bytes a transport message adds to its inner packet: the 16-byte header (type, receiver
/// index, counter) and the 16-byte authentication tag. boringtun does not pad.
pub const DATA_OVERHEAD: usize = 16 + 16;

/// What WireGuard adds on an IPv4 underlay: outer IPv4 and UDP headers and
/// [`DATA_OVERHEAD`].
pub const OVERHEAD: usize = ipv4::HEADER_LEN + 8 + DATA_OVERHEAD;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_message_on_ipv4_adds_60_bytes() {
        assert_eq!(DATA_OVERHEAD, 32);
        assert_eq!(OVERHEAD, 60);
    }
}
