//! IPv4 sysctls the agent sets, written through `/proc/sys`.
//!
//! `/proc/sys/net` resolves to the network namespace of the calling thread at open time, so
//! these apply to the namespace the agent runs in.

use std::io;
use std::path::PathBuf;

/// Why a sysctl could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot set {key} = {value} (writing {}): {source}{}", path.display(), hint(.source))]
    Write {
        key: String,
        value: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {key} ({}): {source}", path.display())]
    Read {
        key: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("device name {0:?} cannot be used in a sysctl path")]
    BadDevice(String),
}

fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            " (needs CAP_NET_ADMIN and a writable /proc/sys: run as root, not in a read-only container)"
        }
        io::ErrorKind::NotFound => " (no such setting: is the device present in this network namespace?)",
        _ => "",
    }
}

fn path_of(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Writes `value` to the dotted sysctl `key` (e.g. `net.ipv4.ip_forward`).
pub fn write(key: &str, value: &str) -> Result<(), SysctlError> {
    let path = path_of(key);
    std::fs::write(&path, value).map_err(|source| SysctlError::Write {
        key: key.to_string(),
        value: value.to_string(),
        path,
        source,
    })
}

/// Reads the dotted sysctl `key`, trimmed.
pub fn read(key: &str) -> Result<String, SysctlError> {
    let path = path_of(key);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|source| SysctlError::Read {
            key: key.to_string(),
            path,
            source,
        })
}

/// Turns on IPv4 forwarding (`net.ipv4.ip_forward = 1`) so pod traffic is routed between the
/// pod bridge and the TUN device.
pub fn enable_ip_forward() -> Result<(), SysctlError> {
    write("net.ipv4.ip_forward", "1")
}

/// Writes `net.ipv4.conf.<dev>.<setting>`, e.g. `rp_filter` or `forwarding`.
pub fn set_device(dev: &str, setting: &str, value: &str) -> Result<(), SysctlError> {
    // Device names may contain dots (vlans); the dotted key would split them, so build the path
    // directly. Slashes and ".." would escape the directory.
    if dev.is_empty() || dev.contains('/') || dev == "." || dev == ".." {
        return Err(SysctlError::BadDevice(dev.to_string()));
    }
    let path = PathBuf::from("/proc/sys/net/ipv4/conf")
        .join(dev)
        .join(setting);
    std::fs::write(&path, value).map_err(|source| SysctlError::Write {
        key: format!("net.ipv4.conf.{dev}.{setting}"),
        value: value.to_string(),
        path,
        source,
    })
}

/// Turns IPv6 off on device `dev` (`net.ipv6.conf.<dev>.disable_ipv6 = 1`), so the kernel
/// stops sending router solicitations and MLD reports into a TUN device that only carries IPv4.
pub fn disable_ipv6(dev: &str) -> Result<(), SysctlError> {
    if dev.is_empty() || dev.contains('/') || dev == "." || dev == ".." {
        return Err(SysctlError::BadDevice(dev.to_string()));
    }
    let path = PathBuf::from("/proc/sys/net/ipv6/conf")
        .join(dev)
        .join("disable_ipv6");
    std::fs::write(&path, "1").map_err(|source| SysctlError::Write {
        key: format!("net.ipv6.conf.{dev}.disable_ipv6"),
        value: "1".to_string(),
        path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run};

    #[test]
    fn forwarding_and_device_settings_apply_to_this_namespace() {
        in_netns("sysctl", || {
            assert_eq!(
                read("net.ipv4.ip_forward").unwrap(),
                "0",
                "fresh netns forwards nothing"
            );
            enable_ip_forward().unwrap();
            assert_eq!(read("net.ipv4.ip_forward").unwrap(), "1");
            assert_eq!(run("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
            run("ip link add pnx0 type veth peer name pnx1");
            set_device("pnx0", "rp_filter", "2").unwrap();
            assert_eq!(
                run("cat /proc/sys/net/ipv4/conf/pnx0/rp_filter").trim(),
                "2"
            );
        });
    }

    #[test]
    fn errors_name_the_setting_and_what_to_do() {
        in_netns("sysctl-err", || {
            let err = set_device("nosuchdev0", "rp_filter", "0")
                .unwrap_err()
                .to_string();
            assert!(err.contains("net.ipv4.conf.nosuchdev0.rp_filter"), "{err}");
            assert!(err.contains("is the device present"), "{err}");
        });
        assert!(matches!(
            set_device("../x", "a", "1"),
            Err(SysctlError::BadDevice(_))
        ));
    }
}
