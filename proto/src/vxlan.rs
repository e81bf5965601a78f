//! VXLAN encapsulation (RFC 7348) of IPv4 packets.
//!
//! What podnet puts in a UDP datagram to port 4789: the 8-byte VXLAN header (I flag, 24-bit
//! VNI) and an inner Ethernet II header (destination = peer VTEP MAC, source = own VTEP MAC,
//! type IPv4) in front of the pod's IPv4 packet. The outer IPv4/UDP headers come from the socket
//! (or from the segment builder), so this module only deals with the 22 bytes in between.

use crate::error::{need, Layer, WireError};
use crate::ethernet::{self, EthernetFrame, EthernetRepr, MacAddr};

/// IANA-assigned VXLAN UDP port.
pub const PORT: u16 = 4789;
/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// VXLAN header plus inner Ethernet header: what precedes the inner IPv4 packet in the UDP payload.
pub const ENCAP_LEN: usize = HEADER_LEN + ethernet::HEADER_LEN;
/// Total per-packet overhead on the underlay: outer IPv4 (20) + UDP (8) + [`ENCAP_LEN`].
pub const OVERHEAD: usize = crate::ipv4::HEADER_LEN + 8 + ENCAP_LEN;

/// The I flag: "the VNI is valid" (RFC 7348 section 5). The other flag bits are reserved.
const FLAG_I: u8 = 0x08;

/// Byte offsets of the VXLAN header fields.
mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    /// 24-bit VNI; byte 7 after it is reserved.
    pub const VNI: Range<usize> = 4..7;
}

/// A 24-bit VXLAN Network Identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Vni(u32);

impl Vni {
    /// Largest VNI (2^24 - 1).
    pub const MAX: u32 = 0x00ff_ffff;

    /// A VNI, or `BadVni` if `vni` does not fit in 24 bits.
    pub fn new(vni: u32) -> Result<Vni, WireError> {
        if vni > Self::MAX {
            Err(WireError::BadVni(vni))
        } else {
            Ok(Vni(vni))
        }
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for Vni {
    /// VNI 1, podnet's default (DESIGN).
    fn default() -> Self {
        Vni(1)
    }
}

impl core::fmt::Display for Vni {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

/// Writes the VXLAN header and inner Ethernet header into `out`, for callers that assemble
/// datagrams themselves (segment builders). All reserved bits are written as zero.
pub fn write_header(out: &mut [u8; ENCAP_LEN], vni: Vni, src_mac: MacAddr, dst_mac: MacAddr) {
    let (vxlan, eth) = out.split_at_mut(HEADER_LEN);
    vxlan.fill(0);
    vxlan[field::FLAGS] = FLAG_I;
    vxlan[field::VNI].copy_from_slice(&vni.0.to_be_bytes()[1..]);
    EthernetRepr {
        dst: dst_mac,
        src: src_mac,
        ethertype: ethernet::ETHERTYPE_IPV4,
    }
    .emit(eth);
}

/// Prepends VXLAN + inner Ethernet to the packet that starts at `buf[start]`, writing into the
/// headroom `buf[start - ENCAP_LEN..start]`. Returns the new start: the UDP payload is
/// `buf[new_start..start + inner_len]`.
///
/// # Panics
/// If `start < ENCAP_LEN` or `start > buf.len()`: the caller did not reserve headroom, a bug.
pub fn encapsulate(
    buf: &mut [u8],
    start: usize,
    vni: Vni,
    src_mac: MacAddr,
    dst_mac: MacAddr,
) -> usize {
    assert!(
        start >= ENCAP_LEN,
        "VXLAN encapsulation needs {ENCAP_LEN} bytes of headroom, packet starts at {start}"
    );
    let new_start = start - ENCAP_LEN;
    let head: &mut [u8; ENCAP_LEN] = (&mut buf[new_start..start])
        .try_into()
        .expect("range is ENCAP_LEN long");
    write_header(head, vni, src_mac, dst_mac);
    new_start
}

/// A decapsulated VXLAN datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decapsulated<'a> {
    /// VNI from the header.
    pub vni: Vni,
    /// Inner Ethernet destination (should be our VTEP MAC).
    pub dst_mac: MacAddr,
    /// Inner Ethernet source (the sender's VTEP MAC).
    pub src_mac: MacAddr,
    /// The inner packet, not yet validated as IPv4.
    pub inner: &'a [u8],
}

/// Splits a UDP payload into VXLAN header, inner Ethernet header and inner packet.
///
/// Rejects a datagram shorter than the two headers, a VXLAN header without the I flag, and an
/// inner EtherType other than IPv4. Reserved bits are ignored, as RFC 7348 requires of receivers.
pub fn decapsulate(udp_payload: &[u8]) -> Result<Decapsulated<'_>, WireError> {
    need(Layer::Vxlan, udp_payload, HEADER_LEN)?;
    let flags = udp_payload[field::FLAGS];
    if flags & FLAG_I == 0 {
        return Err(WireError::BadVxlanFlags(flags));
    }
    let v = &udp_payload[field::VNI];
    let vni = Vni(u32::from_be_bytes([0, v[0], v[1], v[2]]));
    let frame = EthernetFrame::new_checked(&udp_payload[HEADER_LEN..])?;
    let ethertype = frame.ethertype();
    if ethertype != ethernet::ETHERTYPE_IPV4 {
        return Err(WireError::BadEtherType(ethertype));
    }
    Ok(Decapsulated {
        vni,
        dst_mac: frame.dst(),
        src_mac: frame.src(),
        inner: &udp_payload[ENCAP_LEN..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A VXLAN frame as it crosses the underlay and tcpdump shows it
    /// (`tcpdump -xx -i eth0 udp port 4789`): node 198.18.0.1 (VTEP 02:00:c6:12:00:01) sends
    /// pod 10.244.1.2's ping to 10.244.2.3 to node 198.18.0.2 (VTEP 02:00:c6:12:00:02), VNI 1.
    const FRAME: &[u8] = &[
        // outer Ethernet: underlay MACs, IPv4
        0x52, 0x54, 0x00, 0x00, 0x00, 0x02, 0x52, 0x54, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00,
        // outer IPv4: total 78, id 0, DF, TTL 64, UDP, checksum 0xae77, 198.18.0.1 -> 198.18.0.2
        0x45, 0x00, 0x00, 0x4e, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xae, 0x77, 0xc6, 0x12, 0x00,
        0x01, 0xc6, 0x12, 0x00, 0x02,
        // UDP: 51234 -> 4789, length 58, checksum 0 (allowed for VXLAN over IPv4)
        0xc8, 0x22, 0x12, 0xb5, 0x00, 0x3a, 0x00, 0x00, // VXLAN: flags 0x08, VNI 1
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00,
        // inner Ethernet: 02:00:c6:12:00:02 <- 02:00:c6:12:00:01, IPv4
        0x02, 0x00, 0xc6, 0x12, 0x00, 0x02, 0x02, 0x00, 0xc6, 0x12, 0x00, 0x01, 0x08, 0x00,
        // inner IPv4: total 28, id 0x1c46, DF, TTL 64, ICMP, checksum 0x05af, 10.244.1.2 -> 10.244.2.3
        0x45, 0x00, 0x00, 0x1c, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x01, 0x05, 0xaf, 0x0a, 0xf4, 0x01,
        0x02, 0x0a, 0xf4, 0x02, 0x03, // ICMP echo request, id 0, seq 0
        0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00,
    ];
    const UDP_PAYLOAD: core::ops::Range<usize> = 42..FRAME.len();
    const INNER: core::ops::Range<usize> = 64..FRAME.len();

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x02, 0x00, 0xc6, 0x12, 0x00, last])
    }

    #[test]
    fn fixture_is_a_valid_frame() {
        // Guard the hand-written bytes themselves with an independent parser.
        let p = etherparse::SlicedPacket::from_ethernet(FRAME).unwrap();
        let Some(etherparse::TransportSlice::Udp(udp)) = p.transport else {
            panic!("not UDP: {:?}", p.transport);
        };
        assert_eq!(udp.destination_port(), PORT);
        assert_eq!(udp.payload(), &FRAME[UDP_PAYLOAD]);
        let Some(etherparse::NetSlice::Ipv4(outer)) = p.net else {
            panic!("not IPv4");
        };
        assert_eq!(
            outer.header().header_checksum(),
            outer.header().to_header().calc_header_checksum()
        );
        let inner = etherparse::Ipv4HeaderSlice::from_slice(&FRAME[INNER]).unwrap();
        assert_eq!(
            inner.header_checksum(),
            inner.to_header().calc_header_checksum()
        );
    }

    #[test]
    fn decapsulate_fixture() {
        let d = decapsulate(&FRAME[UDP_PAYLOAD]).unwrap();
        assert_eq!(d.vni, Vni::new(1).unwrap());
        assert_eq!(d.dst_mac, mac(2));
        assert_eq!(d.src_mac, mac(1));
        assert_eq!(d.inner, &FRAME[INNER]);
    }

    #[test]
    fn encapsulate_reproduces_fixture() {
        let inner = &FRAME[INNER];
        let mut buf = vec![0xaa; 30 + inner.len()];
        buf[30..].copy_from_slice(inner);
        let start = encapsulate(&mut buf, 30, Vni::default(), mac(1), mac(2));
        assert_eq!(start, 30 - ENCAP_LEN);
        assert_eq!(&buf[start..], &FRAME[UDP_PAYLOAD]);
        assert!(
            buf[..start].iter().all(|&b| b == 0xaa),
            "wrote outside headroom"
        );
    }

    #[test]
    fn write_header_clears_reserved_bits() {
        let mut out = [0xffu8; ENCAP_LEN];
        write_header(&mut out, Vni::new(0xabcdef).unwrap(), mac(1), mac(2));
        assert_eq!(&out[..8], &[0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(&out[8..], &FRAME[42 + 8..42 + 22]);
    }

    #[test]
    #[should_panic(expected = "headroom")]
    fn encapsulate_without_headroom_is_a_bug() {
        let mut buf = [0u8; 64];
        encapsulate(&mut buf, ENCAP_LEN - 1, Vni::default(), mac(1), mac(2));
    }

    #[test]
    fn vni_range() {
        assert_eq!(Vni::new(0).map(Vni::get), Ok(0));
        assert_eq!(Vni::new(0xff_ffff).map(Vni::get), Ok(0xff_ffff));
        assert_eq!(Vni::new(0x100_0000), Err(WireError::BadVni(0x100_0000)));
        assert_eq!(Vni::default().get(), 1);
        assert_eq!(OVERHEAD, 50);
    }

    #[test]
    fn rejects_missing_i_flag() {
        let mut p = FRAME[UDP_PAYLOAD].to_vec();
        p[0] = 0x00;
        assert_eq!(decapsulate(&p), Err(WireError::BadVxlanFlags(0)));
        // Reserved bits are ignored as long as I is set (RFC 7348 section 5).
        p[0] = 0x08 | 0x80;
        p[1] = 0xff;
        p[7] = 0xff;
        assert!(decapsulate(&p).is_ok());
    }

    #[test]
    fn rejects_non_ipv4_ethertype() {
        let mut p = FRAME[UDP_PAYLOAD].to_vec();
        p[20..22].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(decapsulate(&p), Err(WireError::BadEtherType(0x86dd)));
        p[20..22].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(decapsulate(&p), Err(WireError::BadEtherType(0x0806)));
    }

    #[test]
    fn every_truncation_of_headers_is_an_error() {
        let p = &FRAME[UDP_PAYLOAD];
        for n in 0..ENCAP_LEN {
            let layer = if n < HEADER_LEN {
                Layer::Vxlan
            } else {
                Layer::Ethernet
            };
            let required = if n < HEADER_LEN { HEADER_LEN } else { 14 };
            let len = if n < HEADER_LEN { n } else { n - HEADER_LEN };
            assert_eq!(
                decapsulate(&p[..n]),
                Err(WireError::Truncated {
                    layer,
                    required,
                    len
                }),
                "prefix of {n} bytes"
            );
        }
        // With both headers present the inner bytes are handed on as they are; the forwarder
        // validates them as IPv4 next.
        for n in ENCAP_LEN..=p.len() {
            assert_eq!(decapsulate(&p[..n]).unwrap().inner, &p[ENCAP_LEN..n]);
        }
    }

    proptest! {
        #[test]
        fn encap_decap_round_trip(
            inner in proptest::collection::vec(any::<u8>(), 0..1600),
            headroom in ENCAP_LEN..80usize,
            vni in 0..=Vni::MAX,
            src in any::<[u8; 6]>(),
            dst in any::<[u8; 6]>(),
        ) {
            let vni = Vni::new(vni).unwrap();
            let mut buf = vec![0u8; headroom + inner.len()];
            buf[headroom..].copy_from_slice(&inner);
            let start = encapsulate(&mut buf, headroom, vni, MacAddr(src), MacAddr(dst));
            let d = decapsulate(&buf[start..]).unwrap();
            prop_assert_eq!(d.vni, vni);
            prop_assert_eq!(d.src_mac, MacAddr(src));
            prop_assert_eq!(d.dst_mac, MacAddr(dst));
            prop_assert_eq!(d.inner, &inner[..]);
            // Independent check of the inner Ethernet header.
            let e = etherparse::Ethernet2Slice::from_slice_without_fcs(&buf[start + HEADER_LEN..]).unwrap();
            prop_assert_eq!(e.source(), src);
            prop_assert_eq!(e.destination(), dst);
            prop_assert_eq!(e.ether_type(), etherparse::EtherType::IPV4);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(d) = decapsulate(&data) {
                prop_assert_eq!(d.inner.len() + ENCAP_LEN, data.len());
            }
        }
    }
}
