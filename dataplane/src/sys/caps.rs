//! Capability check done once at start, so a missing privilege fails with advice instead of
//! an `EPERM` from deep inside device setup.
//!
//! Reads the effective set (`CapEff`) from `/proc/self/status`.

use std::fmt;
use std::io;

/// A Linux capability the agent needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// TUN creation, netlink changes, sysctls, `SO_*BUFFORCE`.
    NetAdmin,
    /// The IP-in-IP raw socket.
    NetRaw,
}

impl Capability {
    /// Bit number in the capability sets (`linux/capability.h`).
    pub fn bit(self) -> u32 {
        match self {
            Capability::NetAdmin => 12,
            Capability::NetRaw => 13,
        }
    }

    /// Name as `setcap`/`capsh` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Capability::NetAdmin => "cap_net_admin",
            Capability::NetRaw => "cap_net_raw",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name().to_ascii_uppercase())
    }
}

/// Why the capability check failed.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("podnet-agent lacks {}: run it as root, or grant them with `sudo setcap cap_net_admin,cap_net_raw+ep $(command -v podnet-agent)`", list(.missing))]
    Missing { missing: Vec<Capability> },
    #[error("cannot read the process capabilities from /proc/self/status: {0}")]
    Read(#[source] io::Error),
    #[error("cannot parse the CapEff line of /proc/self/status")]
    Parse,
}

fn list(caps: &[Capability]) -> String {
    caps.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Fails unless every capability in `required` is in the effective set.
pub fn require(required: &[Capability]) -> Result<(), CapsError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(CapsError::Read)?;
    let eff = effective_from_status(&status).ok_or(CapsError::Parse)?;
    check(eff, required)
}

/// The `CapEff` mask from the text of a `/proc/<pid>/status` file.
pub fn effective_from_status(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Fails with the missing subset of `required` given an effective mask.
pub fn check(effective: u64, required: &[Capability]) -> Result<(), CapsError> {
    let missing: Vec<Capability> = required
        .iter()
        .copied()
        .filter(|c| effective & (1u64 << c.bit()) == 0)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CapsError::Missing { missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcat\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\n";

    #[test]
    fn parses_cap_eff() {
        assert_eq!(effective_from_status(STATUS), Some(0x3000));
        assert_eq!(effective_from_status("Name: x\n"), None);
        assert_eq!(effective_from_status("CapEff:\tzz\n"), None);
    }

    #[test]
    fn reports_exactly_the_missing_capabilities() {
        let both = [Capability::NetAdmin, Capability::NetRaw];
        assert!(check(0x3000, &both).is_ok());
        match check(1 << 13, &both) {
            Err(CapsError::Missing { missing }) => assert_eq!(missing, [Capability::NetAdmin]),
            other => panic!("unexpected {other:?}"),
        }
        let err = check(0, &both).unwrap_err().to_string();
        assert!(err.contains("CAP_NET_ADMIN and CAP_NET_RAW"), "{err}");
        assert!(err.contains("setcap cap_net_admin,cap_net_raw+ep"), "{err}");
        assert!(err.contains("root"), "{err}");
    }

    #[test]
    fn this_process_matches_its_uid() {
        // Root normally holds every capability; an unprivileged test run holds none of these.
        let res = require(&[Capability::NetAdmin]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(res.is_ok(), "{res:?}");
        } else {
            assert!(matches!(res, Err(CapsError::Missing { .. })));
        }
    }
}
