//! The nfnetlink_log (NFLOG) messages the agent exchanges with the kernel to sample the packets
//! network policy denies: the two configuration requests that bind a log group and ask for the
//! packets' first bytes, and the parse of a logged packet. Netlink's own fields are in host
//! byte order; nfnetlink's resource id (the group) is big-endian.

use std::net::Ipv4Addr;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
/// The attribute type without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// The NFLOG group the policy table logs denied packets to.
pub const GROUP: u16 = 47;
/// Bytes of each logged packet the kernel copies: the IPv4 header and the ports.
pub const COPY_RANGE: u32 = 96;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A config request for `group` carrying one attribute.
fn config(seq: u32, group: u16, attr: u16, value: &[u8]) -> Vec<u8> {
    let attr_len = 4 + value.len();
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + align4(attr_len);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC, version 0, the group.
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&group.to_be_bytes());
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&attr.to_ne_bytes());
    m.extend_from_slice(value);
    m.resize(len, 0);
    m
}

/// The request that binds this socket to `group`.
pub fn bind_request(group: u16) -> Vec<u8> {
    config(1, group, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])
}

/// The request that asks for the first `range` bytes of each packet of `group`.
pub fn copy_request(group: u16, range: u32) -> Vec<u8> {
    let mut mode = range.to_be_bytes().to_vec();
    mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
    config(2, group, NFULA_CFG_MODE, &mode)
}

/// The error code of a netlink acknowledgement (0: success), if `msg` is one.
pub fn ack_error(msg: &[u8]) -> Option<i32> {
    if msg.len() < NLMSG_HDRLEN + 4 || u16::from_ne_bytes([msg[4], msg[5]]) != NLMSG_ERROR {
        return None;
    }
    Some(i32::from_ne_bytes(
        msg[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].try_into().ok()?,
    ))
}

/// A logged packet: the rule's prefix and the packet's first bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Logged<'a> {
    pub prefix: &'a str,
    pub payload: &'a [u8],
}

/// The logged packets in one datagram from the kernel (several messages may share it).
pub fn packets(datagram: &[u8]) -> Vec<Logged<'_>> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET && len >= NLMSG_HDRLEN + NFGENMSG_LEN
        {
            let (mut prefix, mut payload) = ("", &[][..]);
            let mut attrs = &rest[NLMSG_HDRLEN + NFGENMSG_LEN..len];
            while attrs.len() >= 4 {
                let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let atype = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
                if alen < 4 || alen > attrs.len() {
                    break;
                }
                let value = &attrs[4..alen];
                match atype {
                    NFULA_PAYLOAD => payload = value,
                    NFULA_PREFIX => {
                        let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                        prefix = std::str::from_utf8(&value[..end]).unwrap_or("");
                    }
                    _ => {}
                }
                attrs = &attrs[align4(alen).min(attrs.len())..];
            }
            out.push(Logged { prefix, payload });
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    out
}

/// What a denied packet was: addresses, protocol and destination port (0 without one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub dst_port: u16,
}

/// The flow of an IPv4 packet's first bytes (`None` if they are not one).
pub fn flow(packet: &[u8]) -> Option<Flow> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0xf) * 4;
    let protocol = packet[9];
    let ports = matches!(protocol, 6 | 17 | 132) && packet.len() >= ihl + 4 && ihl >= 20;
    Some(Flow {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
        protocol,
        dst_port: if ports {
            u16::from_be_bytes([packet[ihl + 2], packet[ihl + 3]])
        } else {
            0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_nfnetlink_config_messages() {
        let m = bind_request(47);
        assert_eq!(m.len(), 16 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0401);
        assert_eq!(&m[18..20], &47u16.to_be_bytes());
        assert_eq!(u16::from_ne_bytes([m[22], m[23]]), NFULA_CFG_CMD);
        assert_eq!(m[24], NFULNL_CFG_CMD_BIND);
        let c = copy_request(47, 96);
        assert_eq!(u16::from_ne_bytes([c[20], c[21]]), 4 + 6);
        assert_eq!(&c[24..28], &96u32.to_be_bytes());
        assert_eq!(c[28], NFULNL_COPY_PACKET);
        assert_eq!(c.len() % 4, 0);
    }

    /// A datagram as the kernel sends it: two packet messages, attributes padded.
    #[test]
    fn logged_packets_are_read() {
        let packet: Vec<u8> = {
            let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            p.extend_from_slice(&[10, 244, 2, 5, 10, 244, 1, 7]);
            p.extend_from_slice(&[0xc0, 0x00, 0x00, 0x50]);
            p
        };
        let message = |prefix: &str| {
            let mut attrs = Vec::new();
            let mut attr = |t: u16, v: &[u8]| {
                attrs.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
                attrs.extend_from_slice(&t.to_ne_bytes());
                attrs.extend_from_slice(v);
                attrs.resize(align4(attrs.len()), 0);
            };
            attr(1, &[0x08, 0x00, 3, 0]);
            let mut p = prefix.as_bytes().to_vec();
            p.push(0);
            attr(NFULA_PREFIX, &p);
            attr(NFULA_PAYLOAD | 0x8000, &packet);
            let len = 16 + 4 + attrs.len();
            let mut m = (len as u32).to_ne_bytes().to_vec();
            m.extend_from_slice(&0x0400u16.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&[2, 0, 0, 47]);
            m.extend_from_slice(&attrs);
            m
        };
        let mut datagram = message("ingress");
        datagram.extend(message("egress"));
        let got = packets(&datagram);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].prefix, "ingress");
        assert_eq!(got[1].prefix, "egress");
        assert_eq!(
            flow(got[0].payload),
            Some(Flow {
                src: Ipv4Addr::new(10, 244, 2, 5),
                dst: Ipv4Addr::new(10, 244, 1, 7),
                protocol: 6,
                dst_port: 80
            })
        );
        // Cut short anywhere: no panic, and no packet from the cut message.
        for cut in 0..datagram.len() {
            assert!(packets(&datagram[..cut]).len() <= 2);
        }
        assert_eq!(flow(&packet[..12]), None);
        assert_eq!(flow(&packet[..20]).unwrap().dst_port, 0);
    }

    #[test]
    fn an_ack_says_its_error() {
        let mut ack = 36u32.to_ne_bytes().to_vec();
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&[0; 10]);
        ack.extend_from_slice(&(-16i32).to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        assert_eq!(ack_error(&ack), Some(-16));
        assert_eq!(ack_error(&bind_request(1)), None);
    }
}
