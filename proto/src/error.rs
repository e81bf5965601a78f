//! Errors for parsing untrusted packet bytes.
//!
//! Each error says what was wrong and at which layer, so the forwarder can count it under a
//! stable drop reason without formatting anything per packet.

use core::fmt;

/// The protocol layer an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// An IPv4 header that is not an encapsulation header (a pod packet, an inner packet).
    Ipv4,
    /// The outer (underlay) IPv4 header of an IP-in-IP packet.
    OuterIpv4,
    /// The fixed 40-byte IPv6 header.
    Ipv6,
    /// An IPv6 extension header (hop-by-hop, routing, fragment, destination options, AH).
    Ipv6Ext,
    /// The 8-byte VXLAN header.
    Vxlan,
    /// The inner Ethernet II header carried by VXLAN.
    Ethernet,
    /// An ICMP message.
    Icmp,
    /// A TCP header or segment.
    Tcp,
    /// A UDP header or datagram.
    Udp,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Ipv4 => "IPv4",
            Layer::OuterIpv4 => "outer IPv4",
            Layer::Ipv6 => "IPv6",
            Layer::Ipv6Ext => "IPv6 extension header",
            Layer::Vxlan => "VXLAN",
            Layer::Ethernet => "Ethernet",
            Layer::Icmp => "ICMP",
            Layer::Tcp => "TCP",
            Layer::Udp => "UDP",
        })
    }
}

/// Why a packet (or a value destined for one) was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ends before the layer does.
    #[error("{layer} truncated: need {required} bytes, have {len}")]
    Truncated {
        /// Layer being parsed.
        layer: Layer,
        /// Bytes the layer needs.
        required: usize,
        /// Bytes available.
        len: usize,
    },
    /// IPv4 version field is not 4 (the value found).
    #[error("IP version {0}, expected 4")]
    BadVersion(u8),
    /// An IPv6 header whose version field is not 6 (the value found).
    #[error("IP version {0}, expected 6")]
    NotIpv6(u8),
    /// A hop-by-hop options header anywhere but straight after the IPv6 header (RFC 8200
    /// section 4.1 allows it only there).
    #[error("IPv6 hop-by-hop options header after another extension header")]
    HopByHopNotFirst,
    /// An IPv6 extension header chain longer than the walk follows (the count walked).
    #[error("IPv6 extension header chain longer than {0} headers")]
    TooManyExtHeaders(usize),
    /// IPv4 IHL below 5 (the value found, in 32-bit words).
    #[error("IPv4 header length {0} words, minimum is 5")]
    BadHeaderLen(u8),
    /// IPv4 total length shorter than the header, or too long to represent.
    #[error("IPv4 total length {0} is inconsistent with the header")]
    BadTotalLen(u16),
    /// A checksum did not verify.
    #[error("{0} checksum mismatch")]
    BadChecksum(Layer),
    /// A fragment where only whole packets are accepted.
    #[error("fragmented packet")]
    Fragmented,
    /// The IPv4 protocol field is not the expected one (the value found).
    #[error("unexpected IP protocol {0}")]
    WrongProtocol(u8),
    /// VXLAN flags byte without the I flag (the byte found).
    #[error("VXLAN flags {0:#04x} lack the I flag (0x08)")]
    BadVxlanFlags(u8),
    /// Inner Ethernet type is not IPv4 (the value found).
    #[error("ethertype {0:#06x}, expected IPv4 (0x0800)")]
    BadEtherType(u16),
    /// A VNI that does not fit in 24 bits (the value given).
    #[error("VNI {0} does not fit in 24 bits")]
    BadVni(u32),
}

/// Returns `Err(Truncated)` unless `buf` holds at least `required` bytes.
pub(crate) fn need(layer: Layer, buf: &[u8], required: usize) -> Result<(), WireError> {
    if buf.len() < required {
        Err(WireError::Truncated {
            layer,
            required,
            len: buf.len(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_layer_and_sizes() {
        let e = WireError::Truncated {
            layer: Layer::OuterIpv4,
            required: 20,
            len: 7,
        };
        assert_eq!(e.to_string(), "outer IPv4 truncated: need 20 bytes, have 7");
        assert_eq!(
            WireError::BadVxlanFlags(0).to_string(),
            "VXLAN flags 0x00 lack the I flag (0x08)"
        );
        assert_eq!(
            WireError::BadEtherType(0x86dd).to_string(),
            "ethertype 0x86dd, expected IPv4 (0x0800)"
        );
    }

    #[test]
    fn need_checks_length() {
        assert!(need(Layer::Udp, &[0; 8], 8).is_ok());
        assert_eq!(
            need(Layer::Udp, &[0; 7], 8),
            Err(WireError::Truncated {
                layer: Layer::Udp,
                required: 8,
                len: 7
            })
        );
    }
}
