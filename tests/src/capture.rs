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
