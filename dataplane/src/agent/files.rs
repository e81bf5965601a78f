//! The files the agent keeps in its state directory (`subnet.env`, and `nodes.json` written by
//! the membership task), written so a reader never sees half a file.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

/// A state file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}; pass a writable --state-dir", path.display())]
pub struct StateDirError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Writes `<state-dir>/subnet.env` for pod setup (DESIGN: POD_NETWORK, POD_SUBNET, POD_MTU,
/// POD_GATEWAY; and PODNET_API, the admin API the CNI plugin reports pods to), atomically so a
/// pod script never reads half a file.
pub fn write_subnet_env(
    dir: &Path,
    cluster: Ipv4Net,
    pod: Ipv4Net,
    mtu: u16,
    api: SocketAddr,
) -> Result<(), StateDirError> {
    let gateway = Ipv4Addr::from(u32::from(pod.network()) + 1);
    let mut body = String::new();
    let _ = writeln!(body, "POD_NETWORK={cluster}");
    let _ = writeln!(body, "POD_SUBNET={pod}");
    let _ = writeln!(body, "POD_MTU={mtu}");
    let _ = writeln!(body, "POD_GATEWAY={gateway}");
    let _ = writeln!(body, "PODNET_API={api}");
    write_atomic(&dir.join("subnet.env"), body.as_bytes())
}

/// Write to a temp file, fsync, rename, fsync the directory: readers see the old or the new
/// file, never a torn one, and the rename itself survives a crash (as the control service's
/// store does it).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateDirError> {
    use std::io::Write;
    let err = |source| StateDirError {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_env_has_the_design_keys() {
        let dir = tempfile::tempdir().unwrap();
        write_subnet_env(
            dir.path(),
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
            1450,
            "127.0.0.1:7801".parse().unwrap(),
        )
        .unwrap();
        let s = std::fs::read_to_string(dir.path().join("subnet.env")).unwrap();
        assert_eq!(
            s,
            "POD_NETWORK=10.244.0.0/16\nPOD_SUBNET=10.244.3.0/24\nPOD_MTU=1450\nPOD_GATEWAY=10.244.3.1\n\
             PODNET_API=127.0.0.1:7801\n"
        );
    }

    #[test]
    fn state_dir_errors_name_the_flag() {
        let e = write_subnet_env(
            Path::new("/proc/podnet-nope"),
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
            1450,
            "127.0.0.1:7801".parse().unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--state-dir"), "{e}");
    }
}
