//! The virtio-net header that a TUN device opened with `IFF_VNET_HDR` puts in front of every
//! packet it hands out and expects in front of every packet written to it.
//!
//! It is `struct virtio_net_hdr` (virtio 1.x, section 5.1.6; `include/uapi/linux/virtio_net.h`):
//! 10 bytes, the size the kernel uses until `TUNSETVNETHDRSZ` says otherwise (podnet never
//! changes it, so the 12-byte `num_buffers` variant does not appear). The 16-bit fields are
//! converted by the tun driver with `tun_is_little_endian()`: little-endian when `TUNSETVNETLE`
//! is set or when the host is little-endian (legacy virtio uses native order). podnet runs on
//! little-endian hosts (x86-64, aarch64) and always parses and emits little-endian; on a
//! big-endian host the TUN shell would have to issue `TUNSETVNETLE` first.

use crate::error::WireError;

/// Size of `struct virtio_net_hdr` in bytes.
pub const HEADER_LEN: usize = 10;

/// `flags`: the checksum from `csum_start` to the end of the packet still has to be computed
/// and stored at `csum_start + csum_offset`; that field already holds the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been verified (the kernel may skip verifying it).
pub const F_DATA_VALID: u8 = 2;

/// `gso_type`: a single packet, no segmentation.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 super-packet, to be cut into `gso_size` segments (TSO).
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload (UFO, obsolete).
pub const GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 super-packet.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO), one datagram per `gso_size`.
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP super-packet has CWR set; only the first segment may carry it.
pub const GSO_ECN: u8 = 0x80;

/// Offset of the TCP checksum field within the TCP header (the `csum_offset` for TCP).
pub const TCP_CSUM_OFFSET: u16 = 16;

/// Why an offloaded packet (virtio header plus IP packet) could not be handled.
///
/// Wraps [`WireError`] for the IP and TCP layers and adds what only offloads can get wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// The IP or TCP layer is malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Fewer than [`HEADER_LEN`] bytes before the packet (the count found).
    #[error("virtio-net header truncated: need {HEADER_LEN} bytes, have {0}")]
    HeaderTruncated(usize),
    /// A `gso_type` podnet does not segment (the value found; TUN only sends TCPv4 with our
    /// offload flags).
    #[error("GSO type {0:#04x} is not supported (TCPv4 or none expected)")]
    UnsupportedGso(u8),
    /// A GSO packet with `gso_size` 0.
    #[error("GSO size 0 in a GSO packet")]
    ZeroGsoSize,
    /// `csum_start + csum_offset` does not leave room for a 16-bit checksum in the packet.
    #[error("checksum offload start {start} + offset {offset} lies outside the {len}-byte packet")]
    BadCsumOffset {
        /// `csum_start` from the header.
        start: u16,
        /// `csum_offset` from the header.
        offset: u16,
        /// Packet length.
        len: usize,
    },
    /// TCP data offset below 5 words (the value found).
    #[error("TCP data offset {0} words, minimum is 5")]
    BadTcpHeaderLen(u8),
    /// The caller's output buffer cannot hold the result.
    #[error("output buffer too small: need {required} bytes, have {len}")]
    OutputTooSmall {
        /// Bytes the result needs.
        required: usize,
        /// Bytes the buffer has.
        len: usize,
    },
}

/// `struct virtio_net_hdr`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct VirtioNetHdr {
    /// [`F_NEEDS_CSUM`], [`F_DATA_VALID`].
    pub flags: u8,
    /// One of the `GSO_*` types, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers (Ethernet-less here: IP + TCP). A hint only: the kernel fills in
    /// the linear part of the skb, which can be longer, so never trust it for parsing.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where checksumming starts, counted from the start of the packet.
    pub csum_start: u16,
    /// Where the checksum goes, counted from `csum_start`.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// The all-zero header: one packet, checksum complete (what a plain write wants).
    pub const NONE: VirtioNetHdr = VirtioNetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Decodes the first [`HEADER_LEN`] bytes of `buf`; the packet follows them.
    pub fn parse(buf: &[u8]) -> Result<VirtioNetHdr, OffloadError> {
        let b: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(OffloadError::HeaderTruncated(buf.len()))?;
        Ok(VirtioNetHdr::from_bytes(b))
    }

    /// Decodes exactly one header.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> VirtioNetHdr {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), OffloadError> {
        let len = buf.len();
        let out = buf
            .get_mut(..HEADER_LEN)
            .ok_or(OffloadError::OutputTooSmall {
                required: HEADER_LEN,
                len,
            })?;
        out.copy_from_slice(&self.to_bytes());
        Ok(())
    }

    /// The GSO type without the [`GSO_ECN`] bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    /// True if [`F_NEEDS_CSUM`] is set.
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What `tun` hands out for a TSO read: NEEDS_CSUM, TCPv4, headers 66 bytes (IP 20 + TCP
    /// 32 with timestamps, plus linear data), MSS 1448, checksum at 20 + 16.
    const TSO_READ: [u8; HEADER_LEN] = [0x01, 0x01, 0x42, 0x00, 0xa8, 0x05, 0x14, 0x00, 0x10, 0x00];

    #[test]
    fn parse_tso_read() {
        let h = VirtioNetHdr::parse(&TSO_READ).unwrap();
        assert_eq!(
            h,
            VirtioNetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 66,
                gso_size: 1448,
                csum_start: 20,
                csum_offset: 16,
            }
        );
        assert!(h.needs_csum());
        assert_eq!(h.gso_kind(), GSO_TCPV4);
    }

    #[test]
    fn emit_tso_read() {
        let h = VirtioNetHdr::from_bytes(&TSO_READ);
        let mut buf = [0xeeu8; 12];
        h.emit(&mut buf).unwrap();
        assert_eq!(buf[..HEADER_LEN], TSO_READ);
        assert_eq!(
            buf[HEADER_LEN..],
            [0xee, 0xee],
            "bytes after the header untouched"
        );
    }

    #[test]
    fn ecn_bit_is_separate_from_kind() {
        let h = VirtioNetHdr {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..VirtioNetHdr::NONE
        };
        assert_eq!(h.gso_kind(), GSO_TCPV4);
        assert_eq!(h.to_bytes()[1], 0x81);
        assert!(!h.needs_csum());
    }

    #[test]
    fn none_is_all_zero() {
        assert_eq!(VirtioNetHdr::NONE.to_bytes(), [0u8; HEADER_LEN]);
        assert_eq!(VirtioNetHdr::default(), VirtioNetHdr::NONE);
    }

    #[test]
    fn every_truncation_is_rejected() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                VirtioNetHdr::parse(&TSO_READ[..len]),
                Err(OffloadError::HeaderTruncated(len))
            );
            let mut out = vec![0u8; len];
            assert_eq!(
                VirtioNetHdr::NONE.emit(&mut out),
                Err(OffloadError::OutputTooSmall {
                    required: HEADER_LEN,
                    len
                })
            );
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            OffloadError::HeaderTruncated(3).to_string(),
            "virtio-net header truncated: need 10 bytes, have 3"
        );
        assert_eq!(
            OffloadError::UnsupportedGso(4).to_string(),
            "GSO type 0x04 is not supported (TCPv4 or none expected)"
        );
    }

    proptest! {
        #[test]
        fn roundtrip(bytes in any::<[u8; HEADER_LEN]>(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut buf = bytes.to_vec();
            buf.extend_from_slice(&tail);
            let h = VirtioNetHdr::parse(&buf).unwrap();
            prop_assert_eq!(h.to_bytes(), bytes);
            prop_assert_eq!(VirtioNetHdr::from_bytes(&h.to_bytes()), h);
        }
    }
}
