//! Seed inputs for each target: a few valid packets and one of each common way to be wrong,
//! so the fuzzer starts from inputs that reach deep into the parsers. `fuzz/corpus/<target>/`
//! holds exactly these (a unit test keeps them in sync).

use std::net::{Ipv4Addr, Ipv6Addr};

use podnet_proto::checksum;
use podnet_proto::ethernet::MacAddr;
use podnet_proto::ipv4::{self, Ipv4Repr};
use podnet_proto::ipv6::{self, next_header, Ipv6Repr};
use podnet_proto::virtio::{VirtioNetHdr, F_NEEDS_CSUM, GSO_TCPV4};
use podnet_proto::{ipip, vxlan};

use crate::check::cluster::{PEER2, SELF, VNI};

type Seeds = Vec<(&'static str, Vec<u8>)>;

const POD_H1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_H2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);

/// A UDP/IPv4 packet with `payload_len` bytes of payload (UDP checksum 0: allowed).
pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize, dont_frag: bool) -> Vec<u8> {
    let udp_len = 8 + payload_len;
    let mut p = vec![0u8; 20 + udp_len];
    Ipv4Repr {
        src,
        dst,
        protocol: ipv4::protocol::UDP,
        ttl: 64,
        tos: 0,
        ident: 7,
        dont_frag,
        payload_len: udp_len,
    }
    .emit(&mut p);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

/// A TCP/IPv4 segment with valid checksums.
pub fn tcp(src: Ipv4Addr, dst: Ipv4Addr, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    Ipv4Repr {
        src,
        dst,
        protocol: ipv4::protocol::TCP,
        ttl: 64,
        tos: 0,
        ident: 100,
        dont_frag: true,
        payload_len: 20 + payload.len(),
    }
    .emit(&mut p);
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t[20..].copy_from_slice(payload);
    let sum = checksum::pseudo_header(src, dst, ipv4::protocol::TCP, t.len() as u16);
    let c = checksum::finish(checksum::partial(t, sum));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    p
}

/// `packet` behind an outer IP-in-IP header from `src` to this node (any inner bytes).
pub fn in_ipip(packet: &[u8], src: Ipv4Addr) -> Vec<u8> {
    let mut buf = vec![0u8; ipip::OVERHEAD + packet.len()];
    Ipv4Repr {
        src,
        dst: SELF,
        protocol: ipv4::protocol::IPIP,
        ttl: 64,
        tos: 0,
        ident: 1,
        dont_frag: true,
        payload_len: packet.len(),
    }
    .emit(&mut buf);
    buf[ipip::OVERHEAD..].copy_from_slice(packet);
    buf
}

/// `packet` as a VXLAN UDP payload with `vni`.
pub fn in_vxlan(packet: &[u8], vni: u32) -> Vec<u8> {
    let mut buf = vec![0u8; vxlan::ENCAP_LEN + packet.len()];
    buf[vxlan::ENCAP_LEN..].copy_from_slice(packet);
    let vni = vxlan::Vni::new(vni).expect("24-bit");
    let start = vxlan::encapsulate(
        &mut buf,
        vxlan::ENCAP_LEN,
        vni,
        MacAddr::vtep_for(PEER2),
        MacAddr::vtep_for(SELF),
    );
    buf[start..].to_vec()
}

fn with(mut p: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut p);
    p
}

fn prepend(byte: u8, p: &[u8]) -> Vec<u8> {
    let mut v = vec![byte];
    v.extend_from_slice(p);
    v
}

/// A minimal IPv6 header (version 6), as junk inside a tunnel.
fn ipv6() -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[5] = 8;
    p[6] = 17;
    p[7] = 64;
    p
}

/// A UDP/IPv6 packet from one pod to another behind extension headers `exts` (kind and
/// length in 8-byte units; each header's first byte names the next one).
fn udp6(exts: &[(u8, usize)], payload_len: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, &(_, words)) in exts.iter().enumerate() {
        let mut h = vec![0u8; words * 8];
        h[0] = exts.get(i + 1).map_or(next_header::UDP, |e| e.0);
        h[1] = (words - 1) as u8;
        body.extend_from_slice(&h);
    }
    let udp_len = 8 + payload_len;
    body.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
    body.extend_from_slice(&(udp_len as u16).to_be_bytes());
    body.extend_from_slice(&[0, 0]);
    body.resize(body.len() + payload_len, 0xab);
    let mut p = vec![0u8; ipv6::HEADER_LEN];
    Ipv6Repr {
        src: Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5),
        dst: Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 7),
        next_header: exts.first().map_or(next_header::UDP, |e| e.0),
        hop_limit: 64,
        traffic_class: 0,
        flow_label: 0x54321,
        payload_len: body.len(),
    }
    .emit(&mut p);
    p.extend_from_slice(&body);
    p
}

/// Seeds for the named target.
pub fn for_target(target: &str) -> Seeds {
    let good = udp(POD_H2, POD_H1, 32, true);
    let ipip_good = in_ipip(&good, PEER2);
    let vxlan_good = in_vxlan(&good, VNI);
    match target {
        "ipv4" => vec![
            ("valid-udp", good.clone()),
            ("options-ihl6", {
                let mut p = good.clone();
                p.splice(20..20, [1, 1, 1, 0]);
                p[0] = 0x46;
                let total = p.len() as u16;
                p[2..4].copy_from_slice(&total.to_be_bytes());
                p
            }),
            ("truncated", good[..13].to_vec()),
            ("bad-ihl", with(good.clone(), |p| p[0] = 0x44)),
            ("total-len-past-end", with(good.clone(), |p| p[3] = 0xff)),
            ("fragment", with(good.clone(), |p| p[6] = 0x20)),
            ("bad-checksum", with(good.clone(), |p| p[10] ^= 0xff)),
            ("ipv6", ipv6()),
        ],
        "ipv6" => {
            let dest = next_header::DEST_OPTS;
            let chain = [
                (next_header::HOP_BY_HOP, 1),
                (dest, 2),
                (next_header::FRAGMENT, 1),
                (next_header::AH, 3),
            ];
            vec![
                ("valid-udp", udp6(&[], 32)),
                ("ext-chain", udp6(&chain, 16)),
                ("routing-header", udp6(&[(next_header::ROUTING, 3)], 8)),
                ("later-fragment", with(udp6(&[(next_header::FRAGMENT, 1)], 24), |p| p[43] = 0xb8)),
                ("truncated-chain", with(udp6(&[(dest, 4)], 0), |p| {
                    p.truncate(60);
                    p[4..6].copy_from_slice(&20u16.to_be_bytes());
                })),
                ("hop-by-hop-second", udp6(&[(dest, 1), (next_header::HOP_BY_HOP, 1)], 4)),
                ("nine-headers", udp6(&[(dest, 1); 9], 4)),
                ("payload-len-past-end", with(udp6(&[], 8), |p| p[5] = 0xff)),
                ("ipv4", good.clone()),
            ]
        }
        "ipip_decap" => vec![
            ("valid", ipip_good.clone()),
            ("bad-checksum", with(ipip_good.clone(), |p| p[11] ^= 1)),
            ("wrong-protocol", with(ipip_good.clone(), outer_udp)),
            ("fragment", with(ipip_good.clone(), |p| p[6] |= 0x20)),
            ("truncated", ipip_good[..19].to_vec()),
            ("empty-inner", in_ipip(&[], PEER2)),
        ],
        "vxlan_decap" => vec![
            ("valid", vxlan_good.clone()),
            ("no-i-flag", with(vxlan_good.clone(), |p| p[0] = 0)),
            ("arp", with(vxlan_good.clone(), |p| p[20..22].copy_from_slice(&[8, 6]))),
            ("ipv6", with(vxlan_good.clone(), |p| p[20..22].copy_from_slice(&[0x86, 0xdd]))),
            ("truncated", vxlan_good[..21].to_vec()),
            ("header-only", vxlan_good[..22].to_vec()),
        ],
        "inbound" => vec![
            ("ipip-valid", prepend(8, &ipip_good)),
            ("vxlan-valid", prepend(1, &vxlan_good)),
            ("vxlan-stranger", prepend(1 | (2 << 1), &vxlan_good)),
            ("vxlan-wrong-vni", prepend(1, &in_vxlan(&good, 7))),
            (
                "vxlan-spoofed",
                prepend(1, &in_vxlan(&udp(Ipv4Addr::new(10, 244, 3, 3), POD_H1, 8, true), VNI)),
            ),
            (
                "ipip-not-local",
                prepend(8, &in_ipip(&udp(POD_H2, Ipv4Addr::new(10, 244, 3, 3), 8, true), PEER2)),
            ),
            ("vxlan-inner-ipv6", prepend(1, &in_vxlan(&ipv6(), VNI))),
            ("ipip-inner-bad-checksum", prepend(8, &in_ipip(&with(good.clone(), |p| p[10] ^= 1), PEER2))),
        ],
        "outbound" => vec![
            ("ipip-to-peer", prepend(0, &udp(POD_H1, POD_H2, 64, true))),
            ("vxlan-to-peer", prepend(1, &udp(POD_H1, POD_H2, 64, true))),
            ("own-cidr", prepend(0, &udp(POD_H1, Ipv4Addr::new(10, 244, 1, 9), 8, true))),
            ("outside-cluster", prepend(1, &udp(POD_H1, Ipv4Addr::new(192, 0, 2, 1), 8, true))),
            ("no-route", prepend(0, &udp(POD_H1, Ipv4Addr::new(10, 244, 9, 1), 8, true))),
            ("too-big-df", prepend(1, &udp(POD_H1, POD_H2, 1500, true))),
            ("ipv6", prepend(0, &ipv6())),
        ],
        "gso" => {
            let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
            let sup = tcp(POD_H1, POD_H2, 1000, 0x18, &payload);
            let tso = VirtioNetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 40,
                gso_size: 1000,
                csum_start: 20,
                csum_offset: 16,
            };
            let input = |hdr: VirtioNetHdr, prefix: u8, p: &[u8]| {
                let mut v = hdr.to_bytes().to_vec();
                v.push(prefix);
                v.extend_from_slice(p);
                v
            };
            vec![
                ("tso-3-segments-vxlan-prefix", input(tso, 22, &sup)),
                ("tso-uneven-ipip-prefix", input(VirtioNetHdr { gso_size: 1400, ..tso }, 20, &sup)),
                ("gso-none", input(VirtioNetHdr::NONE, 0, &tcp(POD_H1, POD_H2, 5, 0x10, b"hello"))),
                ("zero-gso-size", input(VirtioNetHdr { gso_size: 0, ..tso }, 0, &sup)),
                ("udp-not-tcp", input(tso, 0, &udp(POD_H1, POD_H2, 100, true))),
            ]
        }
        "gro" => {
            let seg = |seq: u32, flags: u8, n: usize| tcp(POD_H2, POD_H1, seq, flags, &vec![seq as u8; n]);
            let batch = |packets: &[Vec<u8>]| {
                let mut v = Vec::new();
                for p in packets {
                    v.extend_from_slice(&(p.len() as u16).to_be_bytes());
                    v.extend_from_slice(p);
                }
                v
            };
            vec![
                ("one-flow-3", batch(&[seg(1, 0x10, 100), seg(101, 0x10, 100), seg(201, 0x18, 50)])),
                ("flow-and-udp", batch(&[seg(1, 0x10, 100), udp(POD_H2, POD_H1, 10, true), seg(101, 0x10, 100)])),
                ("gap", batch(&[seg(1, 0x10, 100), seg(500, 0x10, 100)])),
                ("bad-checksum", batch(&[seg(1, 0x10, 100), with(seg(101, 0x10, 100), |p| p[39] ^= 1)])),
                ("junk", vec![0, 3, 0x45, 0, 0, 0, 1, 0x60]),
            ]
        }
        "api_json" => vec![
            ("register", prepend(0, br#"{"underlay_ip":"198.18.0.1","encap":"vxlan"}"#)),
            (
                "register-mac",
                prepend(0, br#"{"underlay_ip":"198.18.0.2","encap":"ipip","vtep_mac":"02:00:c6:12:00:02"}"#),
            ),
            ("register-bad", prepend(0, br#"{"underlay_ip":7,"encap":"gre","x":[1,{}]}"#)),
            ("name", prepend(1, b"node-7")),
            ("name-traversal", prepend(1, b"../../etc/passwd")),
            ("name-control", prepend(1, b"h1\n\x00")),
            (
                "watch-event",
                prepend(
                    2,
                    br#"{"type":"added","revision":3,"node":{"name":"h2","underlay_ip":"198.18.0.2","encap":"vxlan","vtep_mac":"02:00:c6:12:00:02","pod_cidr":"10.244.2.0/24","state":"up","last_heartbeat":1,"revision":3}}"#,
                ),
            ),
        ],
        "wireguard_inbound" => vec![
            ("sealed-udp", prepend(1, &good)),
            ("sealed-keepalive", vec![1]),
            ("sealed-ipv6", prepend(1, &ipv6())),
            ("sealed-short-total-len", prepend(1, &with(good.clone(), |p| p[3] = 20))),
            ("sealed-long-total-len", prepend(1, &with(good.clone(), |p| p[3] = 0xff))),
            ("forged-data", prepend(0, &with(vec![0u8; 64], |p| p[0] = 4))),
            ("forged-init", prepend(0, &with(vec![0u8; 148], |p| p[0] = 1))),
            ("forged-response", prepend(0, &with(vec![0u8; 92], |p| p[0] = 2))),
            ("forged-cookie", prepend(0, &with(vec![0u8; 64], |p| p[0] = 3))),
            ("truncated", prepend(0, &[4, 0, 0, 0, 1])),
            // Found by the fuzzer: boringtun reads an empty datagram as "send what you queued".
            ("forged-empty", vec![0]),
        ],
        "policy_documents" => vec![
            (
                "selectors.yaml",
                b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
spec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      \
podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [b]}]}\n    ports: [{port: 80}, {port: serve-81-udp, protocol: UDP}]\n"
                    .to_vec(),
            ),
            (
                "egress-block.yaml",
                b"kind: NetworkPolicy\nmetadata: {name: out, namespace: y}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  \
egress:\n  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.0/24]}}]\n    ports: [{port: 80, endPort: 90}]\n---\n\
kind: NetworkPolicy\nmetadata: {name: deny, namespace: z}\nspec: {podSelector: {}, policyTypes: [Ingress, Egress]}\n"
                    .to_vec(),
            ),
            (
                "list.json",
                br#"{"kind":"List","items":[{"metadata":{"name":"p","namespace":"x"},"spec":{"podSelector":{},"egress":[{"ports":[{"port":"serve-80-tcp"}]}]}}]}"#
                    .to_vec(),
            ),
            (
                "bad-except.yaml",
                b"kind: NetworkPolicy\nmetadata: {name: p}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]\n"
                    .to_vec(),
            ),
            ("not-yaml", b"{[: -\n\t}".to_vec()),
        ],
        other => panic!("no target named {other}"),
    }
}

/// Makes the outer protocol UDP instead of IP-in-IP (header checksum fixed up).
fn outer_udp(p: &mut Vec<u8>) {
    let p = p.as_mut_slice();
    p[9] = ipv4::protocol::UDP;
    p[10..12].fill(0);
    let c = checksum::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
}
