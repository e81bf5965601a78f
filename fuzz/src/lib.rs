//! Invariants the fuzz targets check, and the seed inputs they start from.
//!
//! Every parser of untrusted bytes has a `check::*` function: it feeds the fuzzer's input to
//! the parser and panics (a finding) when the result breaks a property that must hold for
//! every input, not just for well-formed ones. The functions are plain Rust, so the unit tests
//! below run them over the seed corpus with `cargo test` and no fuzzer; the binaries in
//! `fuzz_targets/` hand them to libFuzzer.

pub mod check;
pub mod seeds;

/// True if `inner` lies inside `outer` (same memory, within bounds): decapsulation must hand
/// out a view of the received buffer, never bytes from anywhere else.
pub fn is_subslice(outer: &[u8], inner: &[u8]) -> bool {
    let o = outer.as_ptr_range();
    let i = inner.as_ptr_range();
    o.start <= i.start && i.end <= o.end
}

/// Byte offset of the subslice `inner` within `outer`.
pub fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    assert!(is_subslice(outer, inner), "not a subslice");
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_keeps_its_invariant() {
        for (target, check) in check::TARGETS {
            let seeds = seeds::for_target(target);
            assert!(seeds.len() >= 4, "{target}: too few seeds");
            for (name, bytes) in &seeds {
                let outcome = std::panic::catch_unwind(|| check(bytes));
                assert!(outcome.is_ok(), "{target}/{name} broke its invariant");
            }
        }
    }

    /// The corpus in `fuzz/corpus/` is what `seeds` generates: regenerate with
    /// `PODNET_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml`.
    #[test]
    fn committed_corpus_matches_the_generator() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let write = std::env::var_os("PODNET_WRITE_SEEDS").is_some();
        for (target, _) in check::TARGETS {
            let dir = root.join(target);
            for (name, bytes) in seeds::for_target(target) {
                let path = dir.join(name);
                if write {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                }
                let stored = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("{}: {e} (regenerate the corpus)", path.display()));
                assert_eq!(stored, bytes, "{} is stale", path.display());
            }
        }
    }

    /// The policy seeds reach the compiler: the valid ones are read (the check returns early
    /// on a document it cannot read), and the bad ones are refused.
    #[test]
    fn policy_seeds_are_read_as_meant() {
        for (name, bytes) in seeds::for_target("policy_documents") {
            let text = std::str::from_utf8(&bytes).unwrap();
            let read = podnet_control::documents::read_policies(text);
            let valid = ["selectors.yaml", "egress-block.yaml", "list.json"].contains(&name);
            assert_eq!(read.is_ok(), valid, "{name}: {read:?}");
        }
    }

    /// Each IPv6 seed reaches the part of the walk its name says.
    #[test]
    fn ipv6_seeds_are_read_as_meant() {
        use podnet_proto::ipv6::{next_header, Ipv6Packet};
        use podnet_proto::{Layer, WireError};
        for (name, bytes) in seeds::for_target("ipv6") {
            let walked = Ipv6Packet::new_checked(&bytes[..]).map(|ip| ip.transport());
            let found = walked.map(|w| w.map(|t| (t.protocol, t.routing, t.header_present())));
            let udp = next_header::UDP;
            let expected = match name {
                "valid-udp" | "ext-chain" => Ok(Ok((udp, false, true))),
                "routing-header" => Ok(Ok((udp, true, true))),
                "later-fragment" => Ok(Ok((udp, false, false))),
                "truncated-chain" => Ok(Err(WireError::Truncated {
                    layer: Layer::Ipv6Ext,
                    required: 72,
                    len: 60,
                })),
                "hop-by-hop-second" => Ok(Err(WireError::HopByHopNotFirst)),
                "nine-headers" => Ok(Err(WireError::TooManyExtHeaders(8))),
                "payload-len-past-end" => Err(WireError::Truncated {
                    layer: Layer::Ipv6,
                    required: 40 + 0xff,
                    len: 56,
                }),
                "ipv4" => Err(WireError::NotIpv6(4)),
                other => panic!("seed {other} has no expectation"),
            };
            assert_eq!(found, expected, "{name}");
        }
    }

    /// The checks are not vacuous: a broken "parser" result trips them.
    #[test]
    fn subslice_check_catches_foreign_bytes() {
        let buf = [1u8, 2, 3, 4];
        assert!(is_subslice(&buf, &buf[1..3]));
        let other = [2u8, 3];
        assert!(!is_subslice(&buf, &other));
        assert_eq!(offset_in(&buf, &buf[2..]), 2);
    }
}
