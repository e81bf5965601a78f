//! Packet captures with tcpdump inside a namespace, decoded afterwards with tcpdump / tshark.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podnet_proto::checksum;

use crate::cmd::run;
use crate::process::Background;
use crate::wait::wait_for;

/// A running `tcpdump -w`, bounded by a packet count; stopped by PID.
pub struct Capture {
    proc: Background,
    pcap: PathBuf,
}

impl Capture {
    /// Starts tcpdump on `iface` in `ns` writing at most `count` packets matching `filter`
    /// (a pcap filter, may be empty) to `pcap`, and waits until it is listening.
    pub fn start(ns: &str, iface: &str, filter: &str, count: u32, pcap: &Path) -> Capture {
        Capture::spawn(ns, iface, filter, count, None, pcap)
    }

    /// As [`Capture::start`], keeping only the first 128 bytes of each packet: enough for the
    /// headers, and light enough to keep up with bulk traffic.
    pub fn headers(ns: &str, iface: &str, filter: &str, count: u32, pcap: &Path) -> Capture {
        Capture::spawn(ns, iface, filter, count, Some(128), pcap)
    }

    fn spawn(
        ns: &str,
        iface: &str,
        filter: &str,
        count: u32,
        snaplen: Option<u32>,
        pcap: &Path,
    ) -> Capture {
        let log = pcap.with_extension("tcpdump.log");
        let count = count.to_string();
        let pcap_s = pcap.to_str().expect("utf-8 path");
        // -Z root: tcpdump would otherwise drop to user `tcpdump` and fail to write the file.
        let mut argv = vec![
            "tcpdump",
            "-Z",
            "root",
            "-U",
            "--immediate-mode",
            "-n",
            "-i",
            iface,
            "-c",
            &count,
            "-w",
            pcap_s,
        ];
        let snaplen = snaplen.map(|s| s.to_string());
        if let Some(s) = &snaplen {
            argv.extend(["-s", s]);
        }
        argv.extend(filter.split_whitespace());
        let mut proc = Background::start("tcpdump", Some(ns), &argv, &log);
        let ready = wait_for("tcpdump to listen", Duration::from_secs(10), || {
            let text = proc.log();
            if text.contains("listening on") {
                Ok(None)
            } else if let Some(status) = proc.try_exit() {
                Ok(Some(format!("tcpdump exited ({status}): {text}")))
            } else {
                Err(text)
            }
        });
        match ready {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => panic!("tcpdump on {iface} in {ns}: {e}"),
        }
        Capture {
            proc,
            pcap: pcap.to_owned(),
        }
    }

    /// Stops the capture (if the count was not reached yet) and returns the pcap path.
    pub fn finish(mut self) -> PathBuf {
        // Give in-flight packets a moment to reach the file (-U flushes per packet).
        if self.proc.wait_exit(Duration::from_millis(300)).is_none() {
            self.proc.signal(nix::sys::signal::Signal::SIGINT);
            if self.proc.wait_exit(Duration::from_secs(3)).is_none() {
                self.proc.stop();
            }
        }
        self.pcap.clone()
    }
}

/// `tcpdump -nr PCAP [-v]` output: how a user would look at the capture.
pub fn tcpdump_text(pcap: &Path, verbose: bool) -> String {
    let p = pcap.to_str().expect("utf-8 path");
    let mut argv = vec!["tcpdump", "-n", "-r", p];
    if verbose {
        argv.push("-vv");
    }
    let out = run(None, &argv, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "tcpdump -r {p}: {}", out.stderr);
    out.stdout
}

/// TCP checksum verdicts tshark gives for every TCP segment in a capture (innermost TCP when
/// encapsulated).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChecksumTally {
    pub good: u32,
    /// Wrong, and not a partial checksum either.
    pub bad: u32,
    /// Not the checksum, but exactly the pseudo-header sum: what a sender's checksum offload
    /// leaves in the field for a later hop to complete (`CHECKSUM_PARTIAL`). Valid in a capture
    /// inside a host; on the wire it means the checksum was never filled in.
    pub partial: u32,
    pub unverified: u32,
    /// Innermost IPv4 header checksums of the same frames (1 good, 0 bad).
    pub ip_good: u32,
    pub ip_bad: u32,
}

/// Decodes `pcap` with tshark (VXLAN on 4789 and IP-in-IP are decoded by default) and tallies
/// `tcp.checksum.status` (1 good, 0 bad or partial, 2 unverified) and the innermost
/// `ip.checksum.status`, with checksum validation enabled.
pub fn tcp_checksums(pcap: &Path) -> ChecksumTally {
    let p = pcap.to_str().expect("utf-8 path");
    let argv = [
        "tshark",
        "-n",
        "-r",
        p,
        "-o",
        "tcp.check_checksum:TRUE",
        "-o",
        "ip.check_checksum:TRUE",
        "-Y",
        "tcp",
        "-T",
        "fields",
        "-e",
        "tcp.checksum.status",
        "-e",
        "ip.checksum.status",
        "-e",
        "tcp.checksum",
        "-e",
        "tcp.checksum_calculated",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "ip.len",
        "-e",
        "ip.hdr_len",
    ];
    let out = run(None, &argv, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "tshark -r {p}: {}", out.stderr);
    let mut t = ChecksumTally::default();
    for line in out.stdout.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        let col = |i: usize| cols.get(i).copied().and_then(innermost);
        // Several layers in one frame are comma separated; the last is the innermost.
        match col(0) {
            Some("1") => t.good += 1,
            // 0xffff and 0x0000 are the two ones'-complement zeros (RFC 1624): the kernel's
            // skb_checksum_help writes 0xffff where the sum is zero; tshark calls it bad.
            Some("0") if is_negative_zero(col(2), col(3)) => t.good += 1,
            Some("0") if col(2) == pseudo_header_sum(col(4), col(5), col(6), col(7)).as_deref() => {
                t.partial += 1
            }
            Some("0") => t.bad += 1,
            Some(_) => t.unverified += 1,
            None => {}
        }
        match col(1) {
            Some("1") => t.ip_good += 1,
            Some("0") => t.ip_bad += 1,
            _ => {}
        }
    }
    t
}

/// A TCP checksum of 0xffff where the computed one is 0x0000: the same value in ones' complement.
fn is_negative_zero(stored: Option<&str>, calculated: Option<&str>) -> bool {
    stored == Some("0xffff") && calculated == Some("0x0000")
}

/// The TCP pseudo-header sum (folded, not complemented) of a segment, as tshark writes a
/// checksum (`0x1a2b`), from its IPv4 source, destination, total and header length.
fn pseudo_header_sum(
    src: Option<&str>,
    dst: Option<&str>,
    len: Option<&str>,
    hdr_len: Option<&str>,
) -> Option<String> {
    let (src, dst) = (src?.parse().ok()?, dst?.parse().ok()?);
    let tcp_len = len?
        .parse::<u16>()
        .ok()?
        .checked_sub(hdr_len?.parse().ok()?)?;
    let sum = checksum::fold(checksum::pseudo_header(src, dst, 6, tcp_len));
    Some(format!("{sum:#06x}"))
}

/// The last of a comma-separated list of per-layer values: the innermost layer's.
fn innermost(column: &str) -> Option<&str> {
    column.rsplit(',').next().map(str::trim)
}

/// How the TCP data segments of a capture arrived, over all connections in it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpArrivals {
    pub connections: usize,
    pub segments: u64,
    /// Segments that arrived after one their sender sent later: an IP ID before the highest
    /// one already seen on their connection (Linux numbers a connection's segments in order,
    /// retransmissions included, and so does podnet's segmentation). Reordering, not loss.
    pub reordered: u64,
    /// Segments in sending order whose data starts before data already seen: retransmissions,
    /// the sender's answer to a loss somewhere on the way.
    pub retransmitted: u64,
}

impl TcpArrivals {
    /// Tallies `(source port, IP ID, raw sequence number, payload length)` in arrival order.
    pub fn tally(segments: impl IntoIterator<Item = (u16, u16, u32, u32)>) -> TcpArrivals {
        // Per source port: the newest IP ID and the sequence number after the furthest data.
        let mut newest: std::collections::HashMap<u16, (u16, u32)> = Default::default();
        let mut t = TcpArrivals::default();
        for (port, id, seq, len) in segments {
            t.segments += 1;
            let end = seq.wrapping_add(len);
            match newest.get_mut(&port) {
                None => {
                    newest.insert(port, (id, end));
                }
                Some((max_id, _)) if wrapping_before_u16(id, *max_id) => t.reordered += 1,
                Some((max_id, max_end)) => {
                    if wrapping_before_u32(seq, *max_end) {
                        t.retransmitted += 1;
                    }
                    *max_id = id;
                    if wrapping_before_u32(*max_end, end) {
                        *max_end = end;
                    }
                }
            }
        }
        t.connections = newest.len();
        t
    }
}

/// `a` comes strictly before `b` in a 16-bit sequence space (serial number arithmetic).
fn wrapping_before_u16(a: u16, b: u16) -> bool {
    (1..0x8000).contains(&b.wrapping_sub(a))
}

/// `a` comes strictly before `b` in TCP's 32-bit sequence space.
fn wrapping_before_u32(a: u32, b: u32) -> bool {
    (1..0x8000_0000).contains(&b.wrapping_sub(a))
}

/// The TCP segments that carry data in `pcap`, tallied by [`TcpArrivals::tally`].
pub fn tcp_arrivals(pcap: &Path) -> TcpArrivals {
    let p = pcap.to_str().expect("utf-8 path");
    let argv = [
        "tshark",
        "-n",
        "-r",
        p,
        "-Y",
        "tcp.len > 0",
        "-T",
        "fields",
        "-e",
        "tcp.srcport",
        "-e",
        "ip.id",
        "-e",
        "tcp.seq_raw",
        "-e",
        "tcp.len",
    ];
    let out = run(None, &argv, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.success(), "tshark -r {p}: {}", out.stderr);
    let parse = |line: &str| -> Option<(u16, u16, u32, u32)> {
        let mut cols = line.split('\t');
        let port = cols.next()?.parse().ok()?;
        let id = u16::from_str_radix(cols.next()?.trim_start_matches("0x"), 16).ok()?;
        Some((
            port,
            id,
            cols.next()?.parse().ok()?,
            cols.next()?.parse().ok()?,
        ))
    };
    TcpArrivals::tally(
        out.stdout
            .lines()
            .map(|l| parse(l).unwrap_or_else(|| panic!("tshark -r {p}: unexpected line {l:?}"))),
    )
}

/// The first TCP segments tshark finds a bad checksum in (frame, length, addresses, TCP
/// payload length), for failure messages.
pub fn bad_tcp_checksums(pcap: &Path) -> String {
    let p = pcap.to_str().expect("utf-8 path");
    let argv = [
        "tshark",
        "-n",
        "-r",
        p,
        "-o",
        "tcp.check_checksum:TRUE",
        "-Y",
        "tcp.checksum.status == 0",
        "-T",
        "fields",
        "-e",
        "frame.number",
        "-e",
        "frame.len",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "tcp.len",
        "-c",
        "10",
    ];
    match run(None, &argv, Duration::from_secs(60)) {
        Ok(out) => out.stdout,
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(port, id, seq, len)` for `n` consecutive 1000-byte segments from `id`, `seq`.
    fn run_of(port: u16, id: u16, seq: u32, n: u16) -> Vec<(u16, u16, u32, u32)> {
        (0..n)
            .map(|i| {
                let k = u32::from(i);
                (port, id.wrapping_add(i), seq.wrapping_add(k * 1000), 1000)
            })
            .collect()
    }

    #[test]
    fn segments_in_sending_order_are_neither_reordered_nor_retransmitted() {
        // IDs and sequence numbers both wrap inside the run; two connections interleave.
        let a = run_of(40000, 0xfffe, u32::MAX - 1500, 6);
        let b = run_of(40001, 7, 1, 6);
        let mixed = a.iter().zip(&b).flat_map(|(x, y)| [*x, *y]);
        let t = TcpArrivals::tally(mixed);
        assert_eq!(
            t,
            TcpArrivals {
                connections: 2,
                segments: 12,
                reordered: 0,
                retransmitted: 0
            }
        );
    }

    #[test]
    fn a_segment_overtaken_by_a_later_one_is_reordered() {
        let mut s = run_of(40000, 100, 1, 5);
        s.swap(1, 3);
        let t = TcpArrivals::tally(s);
        assert_eq!((t.reordered, t.retransmitted), (2, 0), "{t:?}");
    }

    #[test]
    fn a_lost_segment_sent_again_is_a_retransmission_not_reordering() {
        // Segment 2 (seq 1001) is lost; the sender sends it again after 3 and 4, with a new ID.
        let mut s = run_of(40000, 100, 1, 5);
        let lost = s.remove(1);
        s.push((lost.0, 105, lost.2, lost.3));
        let t = TcpArrivals::tally(s);
        assert_eq!((t.reordered, t.retransmitted), (0, 1), "{t:?}");
    }

    #[test]
    fn a_partial_checksum_is_the_pseudo_header_sum_of_the_segment() {
        // 10.244.1.2 -> 10.244.2.2, 60-byte TCP segment behind a 20-byte header.
        let sum = pseudo_header_sum(
            Some("10.244.1.2"),
            Some("10.244.2.2"),
            Some("80"),
            Some("20"),
        );
        let want = checksum::fold(checksum::pseudo_header(
            "10.244.1.2".parse().unwrap(),
            "10.244.2.2".parse().unwrap(),
            6,
            60,
        ));
        assert_eq!(sum, Some(format!("{want:#06x}")));
        assert_eq!(
            pseudo_header_sum(Some("x"), Some("10.0.0.1"), Some("80"), Some("20")),
            None
        );
        // A header longer than the packet is no segment.
        assert_eq!(
            pseudo_header_sum(Some("10.0.0.1"), Some("10.0.0.2"), Some("10"), Some("20")),
            None
        );
    }

    #[test]
    fn only_the_rfc1624_zero_pair_is_forgiven() {
        assert!(is_negative_zero(Some("0xffff"), Some("0x0000")));
        assert!(!is_negative_zero(Some("0xffff"), Some("0x1234")));
        assert!(!is_negative_zero(Some("0x0000"), Some("0xffff")));
        assert!(!is_negative_zero(None, Some("0x0000")));
        assert_eq!(innermost("1,0"), Some("0"));
        assert_eq!(innermost("1"), Some("1"));
    }
}
