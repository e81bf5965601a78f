//! Longest-prefix match over IPv4 prefixes.
//!
//! [`Lpm`] keeps one hash map per prefix length (key: the masked network address) and a 33-bit
//! bitmap of the lengths that hold at least one prefix. A lookup probes only the present lengths,
//! longest first, and stops at the first hit. Pod networks use very few distinct lengths (one per
//! node prefix, usually just `/24`, maybe a `/32` or a default), so a lookup is one or two hash
//! probes whether the table holds 1k or 100k routes; a binary trie would walk up to 24 dependent
//! pointer hops for the same answer. The worst case (all 33 lengths present) is 33 probes, still
//! bounded and allocation-free.
//!
//! The hash is a fixed integer mixer, not SipHash: keys come from the control plane (trusted), and
//! lookups with attacker-chosen addresses cannot lengthen probe chains, they only read them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Hash map keyed by a `u32` (an IPv4 address) with the cheap [`U32Hasher`].
pub(crate) type U32Map<V> = HashMap<u32, V, BuildHasherDefault<U32Hasher>>;

/// Number of distinct IPv4 prefix lengths (`/0` ..= `/32`).
const LENGTHS: usize = 33;

/// A longest-prefix-match table from IPv4 prefixes to values.
///
/// Prefixes are normalised on insert (`10.244.1.7/24` is stored as `10.244.1.0/24`).
#[derive(Clone)]
pub struct Lpm<V> {
    /// `by_len[n]` maps masked network addresses of `/n` prefixes to their values.
    by_len: [U32Map<V>; LENGTHS],
    /// Bit `n` is set when `by_len[n]` is non-empty.
    present: u64,
    len: usize,
}

impl<V> Default for Lpm<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Lpm<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V> Lpm<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            by_len: std::array::from_fn(|_| HashMap::default()),
            present: 0,
            len: 0,
        }
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the table holds no prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Inserts `prefix -> value`; returns the value it replaced for the same prefix, if any.
    pub fn insert(&mut self, prefix: Ipv4Net, value: V) -> Option<V> {
        let (len, key) = key(prefix);
        let old = self.by_len[len].insert(key, value);
        if old.is_none() {
            self.len += 1;
            self.present |= 1 << len;
        }
        old
    }

    /// Removes exactly `prefix` (not the prefixes it covers); returns its value.
    pub fn remove(&mut self, prefix: Ipv4Net) -> Option<V> {
        let (len, key) = key(prefix);
        let old = self.by_len[len].remove(&key)?;
        self.len -= 1;
        if self.by_len[len].is_empty() {
            self.present &= !(1 << len);
        }
        Some(old)
    }

    /// The value stored for exactly `prefix`.
    pub fn get(&self, prefix: Ipv4Net) -> Option<&V> {
        let (len, key) = key(prefix);
        self.by_len[len].get(&key)
    }

    /// The value of the longest prefix that contains `addr`.
    #[inline]
    pub fn lookup(&self, addr: Ipv4Addr) -> Option<&V> {
        self.lookup_prefix(addr).map(|(_, v)| v)
    }

    /// The longest prefix that contains `addr`, with its value.
    #[inline]
    pub fn lookup_prefix(&self, addr: Ipv4Addr) -> Option<(Ipv4Net, &V)> {
        let addr = u32::from(addr);
        let mut lengths = self.present;
        while lengths != 0 {
            let len = 63 - lengths.leading_zeros() as usize;
            lengths &= !(1 << len);
            let key = addr & mask(len);
            if let Some(v) = self.by_len[len].get(&key) {
                let net = Ipv4Net::new(Ipv4Addr::from(key), len as u8)
                    .expect("prefix length is at most 32");
                return Some((net, v));
            }
        }
        None
    }

    /// All prefixes with their values, longest prefixes first, in no particular order within a
    /// length.
    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Net, &V)> + '_ {
        self.by_len.iter().enumerate().rev().flat_map(|(len, map)| {
            map.iter().map(move |(&key, v)| {
                let net =
                    Ipv4Net::new(Ipv4Addr::from(key), len as u8).expect("length is at most 32");
                (net, v)
            })
        })
    }
}

/// `(prefix length, masked network address)` for a prefix.
fn key(prefix: Ipv4Net) -> (usize, u32) {
    let len = usize::from(prefix.prefix_len());
    (len, u32::from(prefix.addr()) & mask(len))
}

/// Network mask for a prefix length in `0..=32`.
#[inline]
fn mask(len: usize) -> u32 {
    // `checked_shl` covers /0, where a 32-bit shift would overflow.
    u32::MAX.checked_shl(32 - len as u32).unwrap_or(0)
}

/// Hasher for `u32` keys (also used for the route table's underlay index): one multiply-xorshift round of the murmur3 finalizer, which spreads the
/// high bits of a masked address into the low bits the hash table indexes with.
#[derive(Default, Clone, Copy)]
pub(crate) struct U32Hasher(u64);

impl Hasher for U32Hasher {
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u32` keys are hashed; this fallback keeps the trait contract for anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn mask_covers_every_length() {
        assert_eq!(mask(0), 0);
        assert_eq!(mask(1), 0x8000_0000);
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = Lpm::new();
        t.insert(net("0.0.0.0/0"), "default");
        t.insert(net("10.244.0.0/16"), "cluster");
        t.insert(net("10.244.1.0/24"), "node1");
        t.insert(net("10.244.1.7/32"), "pod");
        assert_eq!(t.len(), 4);
        assert_eq!(t.lookup(ip("10.244.1.7")), Some(&"pod"));
        assert_eq!(t.lookup(ip("10.244.1.8")), Some(&"node1"));
        assert_eq!(t.lookup(ip("10.244.2.1")), Some(&"cluster"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default"));
        assert_eq!(
            t.lookup_prefix(ip("10.244.1.200")),
            Some((net("10.244.1.0/24"), &"node1"))
        );
    }

    #[test]
    fn empty_table_matches_nothing() {
        let t: Lpm<u8> = Lpm::new();
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        assert_eq!(t.lookup(Ipv4Addr::UNSPECIFIED), None);
    }

    #[test]
    fn insert_normalises_host_bits() {
        let mut t = Lpm::new();
        assert_eq!(t.insert(net("10.244.1.77/24"), 1), None);
        assert_eq!(t.get(net("10.244.1.0/24")), Some(&1));
        assert_eq!(
            t.lookup_prefix(ip("10.244.1.1")).unwrap().0,
            net("10.244.1.0/24")
        );
        // Same prefix written differently replaces, it does not add.
        assert_eq!(t.insert(net("10.244.1.3/24"), 2), Some(1));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("10.244.1.250")), Some(&2));
    }

    #[test]
    fn replace_keeps_one_entry() {
        let mut t = Lpm::new();
        assert_eq!(t.insert(net("198.18.0.0/15"), 'a'), None);
        assert_eq!(t.insert(net("198.18.0.0/15"), 'b'), Some('a'));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("198.19.255.255")), Some(&'b'));
    }

    #[test]
    fn remove_is_exact_and_falls_back_to_shorter() {
        let mut t = Lpm::new();
        t.insert(net("10.244.0.0/16"), 16);
        t.insert(net("10.244.1.0/24"), 24);
        assert_eq!(t.remove(net("10.244.1.0/25")), None, "not present");
        assert_eq!(
            t.remove(net("10.244.2.0/24")),
            None,
            "same length, other key"
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(ip("10.244.1.1")), Some(&24));
        assert_eq!(t.remove(net("10.244.1.9/24")), Some(24));
        assert_eq!(t.len(), 1);
        assert_eq!(t.lookup(ip("10.244.1.1")), Some(&16));
        assert_eq!(t.remove(net("10.244.0.0/16")), Some(16));
        assert!(t.is_empty());
        assert_eq!(t.present, 0, "empty lengths leave the bitmap");
        assert_eq!(t.lookup(ip("10.244.1.1")), None);
    }

    #[test]
    fn remove_keeps_length_while_others_remain() {
        let mut t = Lpm::new();
        t.insert(net("10.244.1.0/24"), 1);
        t.insert(net("10.244.2.0/24"), 2);
        t.remove(net("10.244.1.0/24"));
        assert_eq!(t.lookup(ip("10.244.2.9")), Some(&2));
        assert_eq!(t.lookup(ip("10.244.1.9")), None);
    }

    #[test]
    fn host_and_default_routes() {
        let mut t = Lpm::new();
        t.insert(net("255.255.255.255/32"), "bcast");
        t.insert(net("0.0.0.0/0"), "default");
        assert_eq!(t.lookup(ip("255.255.255.255")), Some(&"bcast"));
        assert_eq!(t.lookup(ip("255.255.255.254")), Some(&"default"));
        assert_eq!(t.lookup(ip("0.0.0.0")), Some(&"default"));
    }

    #[test]
    fn iter_lists_every_prefix_longest_first() {
        let mut t = Lpm::new();
        t.insert(net("10.0.0.0/8"), 8);
        t.insert(net("10.244.1.0/24"), 24);
        t.insert(net("10.244.2.0/24"), 24);
        let all: Vec<_> = t.iter().map(|(n, v)| (n.prefix_len(), *v)).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2], (8, 8));
        assert!(all[..2].iter().all(|&(l, v)| l == 24 && v == 24));
    }

    /// Deterministic generator so a 100k-route table costs one `u64` of proptest input.
    struct SplitMix(u64);
    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    /// Linear scan: the longest stored prefix containing `addr`.
    fn oracle(routes: &BTreeMap<(u8, u32), u32>, addr: u32) -> Option<(Ipv4Net, u32)> {
        let mut best: Option<(u8, u32, u32)> = None;
        for (&(len, key), &v) in routes {
            if addr & mask(len.into()) == key && best.is_none_or(|(l, _, _)| len > l) {
                best = Some((len, key, v));
            }
        }
        best.map(|(l, k, v)| (Ipv4Net::new(Ipv4Addr::from(k), l).unwrap(), v))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Random tables (0..100k routes, mostly in a few /8s so prefixes nest) checked against
        /// the linear oracle, before and after removing a random subset.
        #[test]
        fn matches_linear_oracle(
            seed in any::<u64>(),
            count in prop_oneof![0usize..64, 64usize..4_000, 4_000usize..100_000],
            // Which prefix lengths this table uses; pod networks use few, the worst case uses all.
            lengths in prop::collection::vec(0u8..=32, 1..6),
            remove_every in 2usize..5,
        ) {
            let mut rng = SplitMix(seed);
            let mut t = Lpm::new();
            let mut model = BTreeMap::new();
            let mut inserted = Vec::with_capacity(count);
            for i in 0..count {
                let r = rng.next();
                let len = lengths[(r as usize) % lengths.len()];
                // Half the routes under 10.0.0.0/8 so that short and long prefixes overlap often.
                let addr = if r & (1 << 40) == 0 { (r >> 8) as u32 } else { 0x0a00_0000 | ((r >> 8) as u32 & 0x00ff_ffff) };
                let prefix = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap();
                let value = i as u32;
                let old = t.insert(prefix, value);
                let k = (len, addr & mask(len.into()));
                prop_assert_eq!(old, model.insert(k, value));
                inserted.push(prefix);
            }
            prop_assert_eq!(t.len(), model.len());

            // Probes: addresses inside stored prefixes (hits and nested hits) plus random ones.
            let probes: Vec<u32> = (0..48)
                .map(|i| {
                    let r = rng.next();
                    match (i % 3, inserted.is_empty()) {
                        (0, false) => {
                            let p = inserted[(r as usize) % inserted.len()];
                            u32::from(p.network()) | ((r >> 32) as u32 & !mask(p.prefix_len().into()))
                        }
                        (1, _) => 0x0a00_0000 | (r as u32 & 0x00ff_ffff),
                        _ => r as u32,
                    }
                })
                .collect();
            for &a in &probes {
                let got = t.lookup_prefix(Ipv4Addr::from(a)).map(|(n, v)| (n, *v));
                prop_assert_eq!(got, oracle(&model, a), "lookup {}", Ipv4Addr::from(a));
            }

            for p in inserted.iter().step_by(remove_every) {
                let k = (p.prefix_len(), u32::from(p.network()));
                prop_assert_eq!(t.remove(*p), model.remove(&k));
            }
            prop_assert_eq!(t.len(), model.len());
            for &a in &probes {
                let got = t.lookup_prefix(Ipv4Addr::from(a)).map(|(n, v)| (n, *v));
                prop_assert_eq!(got, oracle(&model, a), "after removal, lookup {}", Ipv4Addr::from(a));
            }
        }
    }
}
