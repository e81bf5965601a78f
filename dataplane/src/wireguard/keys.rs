//! The node's WireGuard key pair, and its file in the state dir: made once, 0600, never
//! logged.

use std::io;
use std::path::{Path, PathBuf};

use boringtun::x25519::{PublicKey, StaticSecret};
use podnet_proto::api::WgKey;

/// The private key's file in the state dir: base64, as `wg genkey` writes it.
pub const KEY_FILE: &str = "wireguard.key";

/// Why the key pair could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the WireGuard key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the WireGuard key {path} is not a key ({why}); restore it, or delete it to make the agent generate a new one (peers then re-learn this node's new public key)")]
    Bad { path: PathBuf, why: String },
    #[error("cannot write the WireGuard key {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot get random bytes for a WireGuard key: {0}")]
    Random(io::Error),
}

/// The node's X25519 key pair.
pub struct Keys {
    pub(super) secret: StaticSecret,
    pub(super) public: WgKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        write!(f, "Keys {{ public: {} }}", self.public)
    }
}

impl Keys {
    /// The key pair in `dir/wireguard.key`, generated (and written 0600) at first start.
    pub fn load_or_create(dir: &Path) -> Result<Keys, KeyError> {
        let path = dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let key: WgKey = text.trim().parse().map_err(|why| KeyError::Bad {
                    path: path.clone(),
                    why: why_without_key(why),
                })?;
                Ok(Keys::from_private(key.0))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                getrandom(&mut bytes).map_err(KeyError::Random)?;
                write_private(&path, &WgKey(bytes))?;
                Ok(Keys::from_private(bytes))
            }
            Err(source) => Err(KeyError::Read { path, source }),
        }
    }

    /// The key pair of private key `bytes` (clamped by X25519 as it is used).
    pub fn from_private(bytes: [u8; 32]) -> Keys {
        let secret = StaticSecret::from(bytes);
        let public = WgKey(PublicKey::from(&secret).to_bytes());
        Keys { secret, public }
    }

    /// The public key, as peers must be given it.
    pub fn public(&self) -> WgKey {
        self.public
    }
}

/// A parse error of the key file names the file's text; keep the text out of logs.
fn why_without_key(why: String) -> String {
    match why.split_once(": ") {
        Some((_, reason)) => reason.to_string(),
        None => "not base64 of 32 bytes".into(),
    }
}

fn getrandom(out: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(out)
}

fn write_private(path: &Path, key: &WgKey) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Created 0600 (not chmod-ed after): the key is never readable by others, not even for a
    // moment. `create_new`: two agents never race to write two keys.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(format!("{key}\n").as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_file_is_made_once_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let k1 = Keys::load_or_create(dir.path()).unwrap();
        let meta = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let k2 = Keys::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.public(), k2.public());
        let private = std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert!(!format!("{k1:?}").contains(private.trim()));
        std::fs::write(dir.path().join(KEY_FILE), "garbage-not-a-key\n").unwrap();
        let err = Keys::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("is not a key") && !err.contains("garbage"),
            "{err}"
        );
    }
}
