//! The host state the agent owns, kept as desired: the TUN device (present, its MTU, up), its
//! /32 address, the cluster route into it, the sysctls the data path needs, the direct routes
//! and the pod egress table ([`crate::agent::egress`]).
//!
//! [`Host::install`] applies it at start and records what this process added. While the agent
//! runs, [`watch`] re-checks it whenever rtnetlink reports a link, address or route change in
//! the namespace, and at least every [`CHECK_PERIOD`], and puts back what someone else changed
//! (an operator's `ip route del`, a deleted `tunl0`): each repair is logged once with what
//! changed and counted by kind ([`Repairs`]). [`Host::teardown`], also run when the `Host` is
//! dropped, removes exactly what this process added, and nothing another process owns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;

use crate::agent::egress::{EgressError, Masquerade, TABLE};
use crate::core::routing::ROUTE_PROTO;

use crate::sys::netlink::{Changes, Installed, Netlink, NetlinkError, TunnelSetup};
use crate::sys::tun::Tun;
use crate::sys::{sysctl, Readiness, Stop, Watch};

/// How often the host state is checked when no notification came: the bound on how long a
/// change that raised none (a sysctl) stays unrepaired.
pub const CHECK_PERIOD: Duration = Duration::from_millis(500);

/// How long the host watch waits for a burst of rtnetlink notifications to end before it
/// compares and repairs.
const SETTLE: Duration = Duration::from_millis(100);

/// What the host should look like.
#[derive(Clone, Debug)]
pub struct Desired {
    pub tun_name: String,
    pub mtu: u32,
    /// The /32 on the TUN device (the network address of the node's pod CIDR).
    pub address: Ipv4Addr,
    pub cluster_cidr: Ipv4Net,
    pub tx_queue_len: u32,
    /// Direct routes (pod CIDR -> peer underlay IP) on the underlay device
    /// ([`crate::core::routing`]); the agent swaps in a new set whenever its peers change.
    pub direct: Arc<ArcSwap<DirectRoutes>>,
    pub underlay_index: u32,
    /// Pod egress (`--masquerade`); `None` also removes a table an earlier agent left.
    pub masquerade: Option<Masquerade>,
}

/// How often the egress table is compared with what it should be: each check runs `nft`, and
/// nftables changes raise no rtnetlink notification.
const EGRESS_CHECK_PERIOD: Duration = Duration::from_secs(2);

/// Pod CIDR -> the peer's underlay IP.
pub type DirectRoutes = BTreeMap<Ipv4Net, Ipv4Addr>;

/// Kinds of repair, in the order [`Host::reconcile`] checks them (also the `what` label of
/// `podnet_agent_repairs_total`).
pub const REPAIR_KINDS: [&str; 9] = [
    "device",
    "mtu",
    "link_up",
    "address",
    "route",
    "ip_forward",
    "direct_route",
    "masquerade",
    "policy",
];

/// Repairs made, by kind ([`REPAIR_KINDS`]).
#[derive(Debug, Default)]
pub struct Repairs {
    counts: [AtomicU64; REPAIR_KINDS.len()],
}

impl Repairs {
    pub(crate) fn add(&self, what: &str) {
        if let Some(i) = REPAIR_KINDS.iter().position(|k| *k == what) {
            self.counts[i].fetch_add(1, Relaxed);
        }
    }

    /// `(kind, count)` for every kind.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        REPAIR_KINDS
            .iter()
            .zip(&self.counts)
            .map(|(k, c)| (*k, c.load(Relaxed)))
            .collect()
    }
}

/// Why the host state could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
    #[error(transparent)]
    Egress(#[from] EgressError),
    #[error("cannot rebuild TUN device {name}: {source}")]
    Reattach {
        name: String,
        source: std::io::Error,
    },
}

/// The host state this agent applied, and how to reach it.
#[derive(Debug)]
pub struct Host {
    netlink: Netlink,
    desired: Desired,
    installed: Installed,
    /// Direct routes this process installed (with the gateway it gave them).
    direct: DirectRoutes,
    /// Direct routes another route is in the way of (logged once each).
    blocked: BTreeSet<Ipv4Net>,
    /// When the egress table was last compared.
    egress_checked: Instant,
}

impl Host {
    /// Configures the TUN device `index` as `desired` says. On error, whatever this call added
    /// is removed again before it returns.
    pub fn install(netlink: Netlink, desired: Desired, index: u32) -> Result<Host, HostError> {
        let mut host = Host {
            netlink,
            desired,
            installed: Installed {
                index,
                address: None,
                route: None,
            },
            direct: DirectRoutes::new(),
            blocked: BTreeSet::new(),
            egress_checked: Instant::now(),
        };
        // On error `host` is dropped, which removes what this call added. The direct routes
        // pass also removes those a crashed agent left, and the egress table replaces theirs.
        host.apply_device(index)?;
        host.reconcile_direct(&mut Vec::new())?;
        match &host.desired.masquerade {
            Some(m) => m.apply()?,
            None => {
                // A table an earlier agent of this namespace left (without nft there is none).
                if let Err(e) = Masquerade::remove() {
                    tracing::debug!("no egress table to remove: {e}");
                }
            }
        }
        Ok(host)
    }

    /// Everything on device `index`: per-device sysctls first (IPv6 off before the link comes
    /// up, or the kernel sends router solicitations into a TUN that carries only IPv4), then
    /// link, address and route, then forwarding. What was added is recorded for teardown.
    fn apply_device(&mut self, index: u32) -> Result<(), HostError> {
        let d = &self.desired;
        sysctl::disable_ipv6(&d.tun_name)?;
        // The agent writes ICMP errors into the TUN from the TUN's own address: the kernel
        // takes those only with accept_local (else a martian), and rp_filter would drop them.
        sysctl::set_device(&d.tun_name, "accept_local", "1")?;
        sysctl::set_device(&d.tun_name, "rp_filter", "0")?;
        self.netlink.set_txqueuelen(index, d.tx_queue_len)?;
        let added = self.netlink.install(&TunnelSetup {
            index,
            mtu: d.mtu,
            address: d.address,
            cluster_cidr: d.cluster_cidr,
        })?;
        self.installed.index = index;
        self.installed.address = self.installed.address.or(added.address);
        self.installed.route = self.installed.route.or(added.route);
        sysctl::enable_ip_forward()?;
        Ok(())
    }

    /// Checks the host against the desired state and repairs what differs. `queues` are the
    /// agent's TUN queues, rebuilt in place when the device is gone. Returns what it repaired,
    /// each as `(kind, what changed)`.
    pub fn reconcile(&mut self, queues: &[&Tun]) -> Result<Vec<(&'static str, String)>, HostError> {
        let d = self.desired.clone();
        let mut done = Vec::new();
        let link = self.netlink.link_by_name(&d.tun_name)?;
        let index = match link {
            Some(l) if l.index == self.installed.index => {
                if l.mtu != d.mtu {
                    self.netlink.set_mtu_up(l.index, d.mtu)?;
                    let why = format!("MTU was changed to {}; set back to {}", l.mtu, d.mtu);
                    done.push(("mtu", why));
                } else if !l.up {
                    self.netlink.set_mtu_up(l.index, d.mtu)?;
                    done.push(("link_up", "it was set down; set up again".to_string()));
                }
                l.index
            }
            gone => {
                let name = d.tun_name.clone();
                let reattach = |source| HostError::Reattach {
                    name: name.clone(),
                    source,
                };
                let mut index = 0;
                for q in queues {
                    index = q.reattach().map_err(reattach)?;
                }
                // Rebuilt: everything on it is new, and ours to remove at teardown.
                self.installed.address = None;
                self.installed.route = None;
                self.apply_device(index)?;
                let why = match gone {
                    Some(other) => format!("it was replaced (ifindex {})", other.index),
                    None => "it was deleted".to_string(),
                };
                done.push((
                    "device",
                    format!("{why}; rebuilt as ifindex {index} on the same queues"),
                ));
                return Ok(done);
            }
        };
        let host = Ipv4Net::new(d.address, 32).expect("/32 is a valid prefix");
        if !self.netlink.addresses(index)?.contains(&host) {
            if self.netlink.add_address(index, host)? {
                self.installed.address = Some(d.address);
            }
            done.push(("address", format!("{host} was removed; added again")));
        }
        if !self
            .netlink
            .routes(index)?
            .contains(&d.cluster_cidr.trunc())
        {
            if self.netlink.add_route(d.cluster_cidr.trunc(), index)? {
                self.installed.route = Some(d.cluster_cidr.trunc());
            }
            done.push((
                "route",
                format!(
                    "{} dev {} was removed; added again",
                    d.cluster_cidr, d.tun_name
                ),
            ));
        }
        if sysctl::read("net.ipv4.ip_forward")? != "1" {
            sysctl::enable_ip_forward()?;
            done.push((
                "ip_forward",
                "net.ipv4.ip_forward was turned off; set to 1".to_string(),
            ));
        }
        self.reconcile_direct(&mut done)?;
        if let Some(m) = self.desired.masquerade {
            if self.egress_checked.elapsed() >= EGRESS_CHECK_PERIOD {
                self.egress_checked = Instant::now();
                if !m.present()? {
                    m.apply()?;
                    done.push((
                        "masquerade",
                        format!(
                            "the nftables table ip {TABLE} was removed or changed; replaced \
                             (masquerade {} to outside {})",
                            m.pod_cidr, m.cluster_cidr
                        ),
                    ));
                }
            }
        }
        Ok(done)
    }

    /// Makes the direct routes (route protocol [`ROUTE_PROTO`]) what [`Desired::direct`]
    /// says: adds the missing, removes those no longer wanted (also a crashed agent's). A
    /// route of ours that someone else removed or changed is a repair.
    fn reconcile_direct(
        &mut self,
        done: &mut Vec<(&'static str, String)>,
    ) -> Result<(), HostError> {
        let want = self.desired.direct.load();
        let have: DirectRoutes = self
            .netlink
            .routes_of_proto(ROUTE_PROTO)?
            .into_iter()
            .collect();
        for (dst, gw) in want.iter() {
            if have.get(dst) == Some(gw) {
                continue;
            }
            let dev = self.desired.underlay_index;
            if !self.netlink.add_route_via(*dst, *gw, dev, ROUTE_PROTO)? {
                if self.blocked.insert(*dst) {
                    tracing::warn!(%dst, %gw,
                        "another route to {dst} is in the way of the direct route via {gw}; \
                         remove it (`ip route del {dst}`) for the peer to be reached");
                }
                continue;
            }
            self.blocked.remove(dst);
            if self.direct.get(dst) == Some(gw) {
                done.push((
                    "direct_route",
                    format!("{dst} via {gw} was removed; added again"),
                ));
            }
            self.direct.insert(*dst, *gw);
        }
        for dst in have.keys().filter(|d| !want.contains_key(d)) {
            self.netlink.del_route_via(*dst, ROUTE_PROTO)?;
            self.direct.remove(dst);
        }
        Ok(())
    }

    /// Removes the route and the address this process added (the TUN device goes with its
    /// last descriptor). Failures are logged: teardown runs on the way out and must finish.
    /// Idempotent; dropping the `Host` does it too.
    pub fn teardown(&self) {
        if let Err(e) = self.netlink.uninstall(&self.installed) {
            tracing::warn!(error = %e, "could not remove everything the agent installed");
        }
        // Every route of our protocol in this namespace is this agent's (one per namespace).
        let direct = self
            .netlink
            .routes_of_proto(ROUTE_PROTO)
            .unwrap_or_default();
        for (dst, _) in direct {
            if let Err(e) = self.netlink.del_route_via(dst, ROUTE_PROTO) {
                tracing::warn!(error = %e, "could not remove the direct route to {dst}");
            }
        }
        if self.desired.masquerade.is_some() {
            if let Err(e) = Masquerade::remove() {
                tracing::warn!(error = %e, "could not remove the egress table ip {TABLE}");
            }
        }
    }
}

/// Every way out (a failed start, a signal, a panicking thread) removes what was added.
impl Drop for Host {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Keeps `host` as desired until `stop` is raised, then drops it (tearing it down).
pub fn watch(mut host: Host, queues: &[&Tun], repairs: &Repairs, stop: &Stop) {
    let changes = match Changes::subscribe() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, period = ?CHECK_PERIOD,
                "no rtnetlink notifications; checking the host state periodically only");
            None
        }
    };
    let fds: Vec<_> = changes.iter().map(std::os::fd::AsFd::as_fd).collect();
    let watch = match Watch::new(&fds, stop) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the host state; it will not be repaired");
            return;
        }
    };
    // Log a failing repair once until it succeeds, not every period.
    let mut failing = false;
    loop {
        match watch.wait_timeout(CHECK_PERIOD) {
            Ok(Readiness::Stopped) => return,
            Ok(Readiness::Ready(_)) => {}
            Err(e) => {
                tracing::error!(error = %e, "host watch failed; the host state is no longer repaired");
                return;
            }
        }
        // Let a burst of changes settle first: a command such as `ip addr flush` repeats
        // until its dump comes back empty, and repairing in the middle of it would only
        // make it go round again. Bounded, so a stream of notifications cannot hold
        // repairs off.
        if let Some(c) = &changes {
            let settle_until = std::time::Instant::now() + CHECK_PERIOD;
            while c.drain() > 0 && std::time::Instant::now() < settle_until {
                match watch.wait_timeout(SETTLE) {
                    Ok(Readiness::Stopped) => return,
                    Ok(Readiness::Ready(0)) => break,
                    Ok(Readiness::Ready(_)) | Err(_) => {}
                }
            }
        }
        match host.reconcile(queues) {
            Ok(done) => {
                failing = false;
                for (what, change) in done {
                    repairs.add(what);
                    tracing::warn!(what, tun = %host.desired.tun_name, "host state repaired: {change}");
                }
            }
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot repair the host state; retrying");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run};
    use crate::sys::tun::TunConfig;

    fn desired(name: &str) -> Desired {
        Desired {
            tun_name: name.to_string(),
            mtu: 1450,
            address: "10.244.1.0".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            tx_queue_len: 1000,
            direct: Arc::default(),
            underlay_index: 0,
            masquerade: None,
        }
    }

    fn kinds(done: &[(&'static str, String)]) -> Vec<&'static str> {
        done.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn what_others_change_is_put_back_and_named() {
        in_netns("host-repair", || {
            let tun = Tun::open(&TunConfig {
                multi_queue: true,
                ..TunConfig::new("pntunr0")
            })
            .unwrap();
            let second = tun.clone_queue().unwrap();
            let queues = [&tun, &second];
            let mut host =
                Host::install(Netlink::new().unwrap(), desired("pntunr0"), tun.index()).unwrap();
            assert!(
                host.reconcile(&queues).unwrap().is_empty(),
                "freshly installed"
            );

            run("ip route del 10.244.0.0/16");
            assert_eq!(kinds(&host.reconcile(&queues).unwrap()), ["route"]);
            assert!(run("ip -4 route").contains("10.244.0.0/16 dev pntunr0"));

            run("ip link set pntunr0 mtu 1300");
            let done = host.reconcile(&queues).unwrap();
            assert_eq!(kinds(&done), ["mtu"]);
            assert!(
                done[0].1.contains("1300") && done[0].1.contains("1450"),
                "{done:?}"
            );
            assert!(run("ip link show pntunr0").contains("mtu 1450"));

            // Down takes the device's routes with it.
            run("ip link set pntunr0 down");
            assert_eq!(
                kinds(&host.reconcile(&queues).unwrap()),
                ["link_up", "route"]
            );

            // Flushing the last address also takes the device's routes with it.
            run("ip addr flush dev pntunr0");
            assert_eq!(
                kinds(&host.reconcile(&queues).unwrap()),
                ["address", "route"]
            );
            assert!(run("ip -4 addr show dev pntunr0").contains("10.244.1.0/32"));

            run("echo 0 > /proc/sys/net/ipv4/ip_forward");
            assert_eq!(kinds(&host.reconcile(&queues).unwrap()), ["ip_forward"]);

            // Deleted: rebuilt on the same descriptors, with everything on it.
            let old = tun.index();
            run("ip link del pntunr0");
            let done = host.reconcile(&queues).unwrap();
            assert_eq!(kinds(&done), ["device"], "{done:?}");
            assert_ne!(tun.index(), old);
            assert_eq!(tun.index(), second.index());
            let link = run("ip link show pntunr0");
            assert!(link.contains("mtu 1450") && link.contains(",UP"), "{link}");
            assert!(run("ip -4 route").contains("10.244.0.0/16 dev pntunr0"));
            assert!(host.reconcile(&queues).unwrap().is_empty());

            // Teardown removes what this process added, including on the rebuilt device.
            host.teardown();
            assert!(!run("ip -4 route").contains("10.244.0.0/16"));
            assert!(!run("ip -4 addr").contains("10.244.1.0"));
        });
    }

    #[test]
    fn direct_routes_follow_the_desired_set_and_a_killed_agents_are_removed() {
        in_netns("host-direct", || {
            run("ip link add pneth0 type veth peer name pneth1 && ip addr add 198.18.0.1/24 dev pneth0 && ip link set pneth0 up && ip link set pneth1 up");
            // A killed agent left one of its routes.
            run("ip route add 10.244.9.0/24 via 198.18.0.9 dev pneth0 proto 222");
            let tun = Tun::open(&TunConfig::new("pntund0")).unwrap();
            let nl = Netlink::new().unwrap();
            let dev = nl.link_by_name("pneth0").unwrap().unwrap().index;
            let mut d = desired("pntund0");
            d.underlay_index = dev;
            let two: DirectRoutes = [(
                "10.244.2.0/24".parse().unwrap(),
                "198.18.0.2".parse().unwrap(),
            )]
            .into_iter()
            .collect();
            d.direct.store(Arc::new(two));
            let direct = Arc::clone(&d.direct);
            let mut host = Host::install(nl, d, tun.index()).unwrap();
            let shown = run("ip route show proto 222");
            assert!(
                shown.contains("10.244.2.0/24 via 198.18.0.2 dev pneth0"),
                "{shown}"
            );
            assert!(
                !shown.contains("10.244.9.0"),
                "the stale route stays: {shown}"
            );
            // Removed by someone else: a repair.
            run("ip route del 10.244.2.0/24");
            assert_eq!(kinds(&host.reconcile(&[&tun]).unwrap()), ["direct_route"]);
            assert!(run("ip route").contains("10.244.2.0/24 via 198.18.0.2"));
            // The peer leaves: the route goes, and that is no repair.
            direct.store(Arc::default());
            assert!(host.reconcile(&[&tun]).unwrap().is_empty());
            assert!(!run("ip route").contains("10.244.2.0/24"));
            // Someone else's route to a peer's CIDR is left alone.
            run("ip route add 10.244.3.0/24 via 198.18.0.33 dev pneth0");
            let three: DirectRoutes = [(
                "10.244.3.0/24".parse().unwrap(),
                "198.18.0.3".parse().unwrap(),
            )]
            .into_iter()
            .collect();
            direct.store(Arc::new(three));
            assert!(host.reconcile(&[&tun]).unwrap().is_empty());
            assert!(run("ip route").contains("10.244.3.0/24 via 198.18.0.33"));
            run("ip route del 10.244.3.0/24");
            host.reconcile(&[&tun]).unwrap();
            assert!(run("ip route show proto 222").contains("10.244.3.0/24 via 198.18.0.3"));
            drop(host);
            assert_eq!(
                run("ip route show proto 222"),
                "",
                "teardown removes every direct route"
            );
        });
    }

    #[test]
    fn teardown_leaves_what_it_found() {
        in_netns("host-owned", || {
            let tun = Tun::open(&TunConfig::new("pntuno0")).unwrap();
            // Someone else's route and address were there first.
            run("ip link set pntuno0 up && ip addr add 10.244.1.0/32 dev pntuno0 && ip route add 10.244.0.0/16 dev pntuno0");
            let host =
                Host::install(Netlink::new().unwrap(), desired("pntuno0"), tun.index()).unwrap();
            host.teardown();
            assert!(run("ip -4 route").contains("10.244.0.0/16 dev pntuno0"));
            assert!(run("ip -4 addr").contains("10.244.1.0/32"));
        });
    }

    #[test]
    fn repairs_are_counted_by_kind() {
        let r = Repairs::default();
        r.add("route");
        r.add("route");
        r.add("device");
        r.add("no such kind");
        let snap = r.snapshot();
        assert_eq!(snap.len(), REPAIR_KINDS.len());
        assert!(snap.contains(&("route", 2)) && snap.contains(&("device", 1)));
        assert_eq!(snap.iter().map(|(_, n)| n).sum::<u64>(), 3);
    }
}
