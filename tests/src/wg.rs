//! WireGuard keys for tests, as `wg genkey` / `wg pubkey` make them (base64 X25519), without
//! needing those tools where a test does not run wireguard-go.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};

/// A fresh private key, base64.
pub fn genkey() -> String {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("/dev/urandom"),
        &mut bytes,
    )
    .expect("random bytes");
    STANDARD.encode(StaticSecret::from(bytes).to_bytes())
}

/// The public key of base64 private key `private`.
pub fn pubkey(private: &str) -> String {
    STANDARD.encode(PublicKey::from(&secret(private)).as_bytes())
}

/// The X25519 secret of base64 private key `private`.
pub fn secret(private: &str) -> StaticSecret {
    StaticSecret::from(key_bytes(private))
}

/// The X25519 public key of base64 `public`.
pub fn public(public: &str) -> PublicKey {
    PublicKey::from(key_bytes(public))
}

/// The 32 bytes of a base64 key.
fn key_bytes(key: &str) -> [u8; 32] {
    STANDARD
        .decode(key.trim())
        .expect("base64 key")
        .try_into()
        .expect("32-byte key")
}
