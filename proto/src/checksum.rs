//! The Internet checksum (RFC 1071), tuned for 64 KiB TSO segments.
//!
//! A running sum is kept wide and unfolded in a `u64` so that sums over several pieces (pseudo
//! header, TCP header, payload chunks) compose by passing the accumulator along; only
//! [`finish`] folds and complements. The bulk loop adds 32-bit halves of 8-byte words into
//! `u64` accumulators, which the compiler turns into SIMD adds; because 2^16 ≡ 1 and
//! 2^32 ≡ 1 (mod 0xffff), this equals the 16-bit ones' complement sum after folding.

use std::net::Ipv4Addr;

/// Bytes summed between two reductions of the bulk accumulators. Each 8-byte step adds less than
/// 2^32 to each accumulator, so 2^30 bytes (2^27 steps) stays far below `u64` overflow.
const BLOCK: usize = 1 << 30;

/// Adds `data` (big-endian 16-bit words, an odd last byte padded with zero) to the running
/// ones' complement sum `acc`.
///
/// Sums compose: `partial(b, partial(a, acc))` equals `partial(a ++ b, acc)` whenever `a` has
/// even length. The result is wide and unfolded; pass it on or hand it to [`finish`] / [`fold`].
#[inline]
pub fn partial(data: &[u8], acc: u64) -> u64 {
    // Shrink the incoming sum to < 2^33 (2^32 ≡ 1 mod 0xffff) so the addition below cannot
    // overflow however many times the accumulator has been passed along.
    let mut acc = (acc & 0xffff_ffff) + (acc >> 32);
    for block in data.chunks(BLOCK) {
        acc += u64::from(sum_block(block));
    }
    acc
}

/// Sums one block (at most [`BLOCK`] bytes, starting at an even offset of the whole input)
/// and returns it folded to 16 bits in big-endian word order.
#[inline]
fn sum_block(data: &[u8]) -> u16 {
    // Read words little-endian and swap once at the end: the ones' complement sum commutes
    // with byte swapping (RFC 1071 section 2(B)), and plain loads vectorize best.
    let mut chunks = data.chunks_exact(8);
    let (mut lo, mut hi) = (0u64, 0u64);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        lo += w & 0xffff_ffff;
        hi += w >> 32;
    }
    // The last 0-7 bytes as a 4-, a 2- and a 1-byte step (no padded copy: a 20-byte IPv4
    // header would otherwise spend most of its time there). Each step starts at an even
    // offset, so a lone last byte is the low byte of its little-endian word, which becomes
    // the high-order byte of its big-endian word after the swap, as RFC 1071 requires.
    let mut rest = chunks.remainder();
    if let [a, b, c, d, tail @ ..] = rest {
        lo += u64::from(u32::from_le_bytes([*a, *b, *c, *d]));
        rest = tail;
    }
    if let [a, b, tail @ ..] = rest {
        lo += u64::from(u16::from_le_bytes([*a, *b]));
        rest = tail;
    }
    if let [a] = rest {
        lo += u64::from(*a);
    }
    fold(lo + hi).swap_bytes()
}

/// Folds a running sum to 16 bits with end-around carry, without complementing.
///
/// This is the form the kernel expects as the seed in a `VIRTIO_NET_HDR_F_NEEDS_CSUM` packet
/// (the folded pseudo-header sum). The result is 0 only if every summed word was 0.
#[inline]
pub fn fold(acc: u64) -> u16 {
    let mut s = (acc & 0xffff_ffff) + (acc >> 32);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    // The loop leaves s <= 0xffff.
    s as u16
}

/// Folds and complements a running sum: the value to store in a checksum field (big-endian).
///
/// Verifying a region that contains its own checksum yields 0.
#[inline]
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// The Internet checksum of `data`: `finish(partial(data, 0))`.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    finish(partial(data, 0))
}

/// The running sum of the TCP/UDP pseudo header (RFC 793 section 3.1, RFC 768):
/// source, destination, zero + protocol, and the transport length (header + payload).
#[inline]
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: u16) -> u64 {
    let s = u32::from(src);
    let d = u32::from(dst);
    u64::from(s >> 16)
        + u64::from(s & 0xffff)
        + u64::from(d >> 16)
        + u64::from(d & 0xffff)
        + u64::from(protocol)
        + u64::from(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook definition: big-endian byte pairs, end-around carry after every add.
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in data.chunks(2) {
            let word = u32::from(pair[0]) << 8 | u32::from(pair.get(1).copied().unwrap_or(0));
            sum += word;
            if sum > 0xffff {
                sum = (sum & 0xffff) + 1;
            }
        }
        !(sum as u16)
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(partial(&data, 0)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A real header (192.168.0.1 -> 192.168.0.199, UDP) whose stored checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0, "a header with its checksum verifies to 0");
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn odd_lengths_pad_high_byte() {
        assert_eq!(checksum(&[]), 0xffff);
        assert_eq!(checksum(&[0x12]), !0x1200);
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), !(0x1234 + 0x5600));
        // Nine bytes: a full 8-byte word plus a lone tail byte.
        let d = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(checksum(&d), reference(&d));
    }

    #[test]
    fn all_ones_and_carries() {
        let d = [0xffu8; 65535];
        assert_eq!(checksum(&d), reference(&d));
        let d = [0xfeu8; 4097];
        assert_eq!(checksum(&d), reference(&d));
        // Zero data folds to 0 (not 0xffff), so its checksum is 0xffff.
        assert_eq!(fold(partial(&[0u8; 100], 0)), 0);
    }

    #[test]
    fn huge_accumulator_does_not_overflow() {
        let d = [0xffu8; 1500];
        let mut acc = u64::MAX;
        // u64::MAX ≡ 0 (mod 0xffff) but is nonzero, i.e. the ones' complement "-0".
        for _ in 0..1000 {
            acc = partial(&d, acc);
        }
        assert_eq!(fold(acc), 0xffff);
    }

    #[test]
    fn pseudo_header_matches_bytes() {
        let src = Ipv4Addr::new(10, 244, 1, 2);
        let dst = Ipv4Addr::new(10, 244, 2, 3);
        let bytes = [10, 244, 1, 2, 10, 244, 2, 3, 0, 6, 0x05, 0xdc];
        assert_eq!(
            fold(pseudo_header(src, dst, 6, 1500)),
            fold(partial(&bytes, 0))
        );
    }

    proptest! {
        #[test]
        fn matches_reference(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            prop_assert_eq!(checksum(&data), reference(&data));
        }

        #[test]
        fn matches_reference_at_odd_start(data in proptest::collection::vec(any::<u8>(), 1..3000)) {
            // Slices that start at an odd address (unaligned loads) sum the same as a copy.
            let tail = &data[1..];
            prop_assert_eq!(checksum(tail), reference(tail));
            let mut copy = vec![0u8; tail.len()];
            copy.copy_from_slice(tail);
            prop_assert_eq!(checksum(tail), checksum(&copy));
        }

        #[test]
        fn partial_composes_at_even_splits(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            a in any::<proptest::sample::Index>(),
            b in any::<proptest::sample::Index>(),
        ) {
            let mut cuts = [a.index(data.len() + 1) & !1, b.index(data.len() + 1) & !1];
            cuts.sort_unstable();
            let [x, y] = cuts;
            let acc = partial(&data[..x], 0);
            let acc = partial(&data[x..y], acc);
            let acc = partial(&data[y..], acc);
            prop_assert_eq!(finish(acc), reference(&data));
        }

        #[test]
        fn verifying_stored_checksum_gives_zero(
            mut data in proptest::collection::vec(any::<u8>(), 2..3000).prop_map(|mut v| {
                if v.len() % 2 == 1 { v.pop(); }
                v
            })
        ) {
            data[0] = 0;
            data[1] = 0;
            let c = checksum(&data);
            data[..2].copy_from_slice(&c.to_be_bytes());
            prop_assert_eq!(checksum(&data), 0);
        }
    }
}
