//! Ethernet II headers and MAC addresses, as carried inside VXLAN.
//!
//! podnet only ever builds and reads the 14-byte untagged header that VXLAN puts in front of the
//! inner IPv4 packet. VTEP MAC addresses follow the DESIGN rule `02:00:` + the underlay IPv4
//! address, so a kernel VXLAN peer can be configured with static FDB/neighbour entries.

use core::fmt;
use core::str::FromStr;
use std::net::Ipv4Addr;

use crate::error::{need, Layer, WireError};

/// Length of an untagged Ethernet II header.
pub const HEADER_LEN: usize = 14;
/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;

/// Byte offsets of the header fields.
mod field {
    use core::ops::Range;
    pub const DST: Range<usize> = 0..6;
    pub const SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
}

/// A 48-bit MAC address. Text form: six lowercase two-digit hex groups joined by `:`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The default VTEP MAC of a node: `02:00:` followed by the four bytes of its underlay
    /// address (198.18.0.1 -> 02:00:c6:12:00:01). The 0x02 bit marks it locally administered.
    pub fn vtep_for(underlay: Ipv4Addr) -> MacAddr {
        let [a, b, c, d] = underlay.octets();
        MacAddr([0x02, 0x00, a, b, c, d])
    }

    /// True for group (multicast or broadcast) addresses, which can never name a VTEP.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// The address bytes.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacParseError {
    /// Not six `:`-separated groups.
    #[error(
        "MAC address {input:?} has {groups} ':'-separated groups, expected 6 (like 02:00:c6:12:00:01)"
    )]
    GroupCount {
        /// The rejected text.
        input: String,
        /// How many groups it had.
        groups: usize,
    },
    /// A group that is not exactly two hex digits.
    #[error("MAC address {input:?}: group {index} ({group:?}) is not two hex digits")]
    BadGroup {
        /// The rejected text.
        input: String,
        /// Zero-based position of the bad group.
        index: usize,
        /// The bad group.
        group: String,
    },
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    /// Parses `02:00:c6:12:00:01` (either letter case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let groups = s.split(':').count();
        if groups != 6 {
            return Err(MacParseError::GroupCount {
                input: s.to_owned(),
                groups,
            });
        }
        let mut mac = [0u8; 6];
        for (index, (group, byte)) in s.split(':').zip(mac.iter_mut()).enumerate() {
            let bad = || MacParseError::BadGroup {
                input: s.to_owned(),
                index,
                group: group.to_owned(),
            };
            // from_str_radix alone would accept "+f" and single digits.
            if group.len() != 2 || !group.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(group, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(mac))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A validated view of an Ethernet II frame (no FCS) at the start of `buffer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Checks that `buf` holds at least a full header.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        need(Layer::Ethernet, buf.as_ref(), HEADER_LEN)?;
        Ok(EthernetFrame { buffer: buf })
    }

    fn mac_at(&self, at: core::ops::Range<usize>) -> MacAddr {
        let b = &self.buffer.as_ref()[at];
        MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// Destination address.
    pub fn dst(&self) -> MacAddr {
        self.mac_at(field::DST)
    }

    /// Source address.
    pub fn src(&self) -> MacAddr {
        self.mac_at(field::SRC)
    }

    /// EtherType.
    pub fn ethertype(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::ETHERTYPE];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// Everything after the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// Gives back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// An Ethernet II header, for building frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetRepr {
    /// Destination address.
    pub dst: MacAddr,
    /// Source address.
    pub src: MacAddr,
    /// EtherType.
    pub ethertype: u16,
}

impl EthernetRepr {
    /// Writes the 14-byte header into `buf[..14]`.
    ///
    /// # Panics
    /// If `buf` is shorter than 14 bytes.
    pub fn emit(&self, buf: &mut [u8]) {
        let h = &mut buf[..HEADER_LEN];
        h[field::DST].copy_from_slice(&self.dst.0);
        h[field::SRC].copy_from_slice(&self.src.0);
        h[field::ETHERTYPE].copy_from_slice(&self.ethertype.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vtep_mac_follows_design() {
        let mac = MacAddr::vtep_for(Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(mac, MacAddr([0x02, 0x00, 0xc6, 0x12, 0x00, 0x01]));
        assert_eq!(mac.to_string(), "02:00:c6:12:00:01");
        assert!(!mac.is_multicast());
        assert!(MacAddr([0xff; 6]).is_multicast());
    }

    #[test]
    fn parse_accepts_both_cases() {
        assert_eq!(
            "02:00:C6:12:00:0a".parse::<MacAddr>(),
            Ok(MacAddr([2, 0, 0xc6, 0x12, 0, 0x0a]))
        );
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let e = "02:00:c6:12:00".parse::<MacAddr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "MAC address \"02:00:c6:12:00\" has 5 ':'-separated groups, expected 6 (like 02:00:c6:12:00:01)"
        );
        let e = "02:00:c6:12:00:0g".parse::<MacAddr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "MAC address \"02:00:c6:12:00:0g\": group 5 (\"0g\") is not two hex digits"
        );
        for bad in [
            "0200c6120001",
            "2:00:c6:12:00:01",
            "+2:00:c6:12:00:01",
            "",
            "02:00:c6:12:00:01:",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_uses_text_form() {
        let mac = MacAddr([0x02, 0x00, 0xc6, 0x12, 0x00, 0x01]);
        let json = serde_json::to_string(&mac).unwrap();
        assert_eq!(json, "\"02:00:c6:12:00:01\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
        let err = serde_json::from_str::<MacAddr>("\"nope\"").unwrap_err();
        assert!(err.to_string().contains("expected 6"), "{err}");
    }

    #[test]
    fn frame_fixture() {
        // ff:ff:ff:ff:ff:ff <- 02:00:c6:12:00:01, IPv4, 2 payload bytes.
        let bytes = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0xc6, 0x12, 0x00, 0x01, 0x08, 0x00,
            0xab, 0xcd,
        ];
        let f = EthernetFrame::new_checked(&bytes[..]).unwrap();
        assert_eq!(f.dst(), MacAddr([0xff; 6]));
        assert_eq!(f.src(), MacAddr([0x02, 0x00, 0xc6, 0x12, 0x00, 0x01]));
        assert_eq!(f.ethertype(), ETHERTYPE_IPV4);
        assert_eq!(f.payload(), &[0xab, 0xcd]);
        let mut out = [0u8; 14];
        EthernetRepr {
            dst: f.dst(),
            src: f.src(),
            ethertype: f.ethertype(),
        }
        .emit(&mut out);
        assert_eq!(out, bytes[..14]);
        for n in 0..HEADER_LEN {
            assert_eq!(
                EthernetFrame::new_checked(&bytes[..n]),
                Err(WireError::Truncated {
                    layer: Layer::Ethernet,
                    required: 14,
                    len: n
                })
            );
        }
    }

    proptest! {
        #[test]
        fn text_round_trip(bytes in any::<[u8; 6]>()) {
            let mac = MacAddr(bytes);
            prop_assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
        }

        #[test]
        fn emit_matches_etherparse(dst in any::<[u8; 6]>(), src in any::<[u8; 6]>(), ethertype in any::<u16>()) {
            let mut buf = [0u8; 14];
            EthernetRepr { dst: MacAddr(dst), src: MacAddr(src), ethertype }.emit(&mut buf);
            let e = etherparse::Ethernet2Slice::from_slice_without_fcs(&buf).unwrap();
            prop_assert_eq!(e.destination(), dst);
            prop_assert_eq!(e.source(), src);
            prop_assert_eq!(e.ether_type().0, ethertype);
        }
    }
}
