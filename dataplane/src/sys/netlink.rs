//! Host setup over rtnetlink: find the underlay device, configure the TUN device (MTU, up,
//! /32 address), route the cluster CIDR into it, and undo that on shutdown.
//!
//! [`Netlink`] is synchronous: it owns a small current-thread tokio runtime and blocks on each
//! request, so call it from a plain thread (at start-up and shutdown, or via
//! `tokio::task::spawn_blocking`), never from inside an async task. The netlink socket is opened
//! by the thread that calls [`Netlink::new`] and therefore talks to that thread's network
//! namespace.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use futures_util::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{AddressMessageBuilder, Handle, LinkUnspec, RouteMessageBuilder};

/// Main routing table id.
const RT_TABLE_MAIN: u32 = 254;

/// A network device as netlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// `IFLA_INFO_KIND` (`"tun"`, `"bridge"`, `"veth"`, ...) when the driver reports one.
    pub kind: Option<String>,
    /// The hardware address, `aa:bb:...` (empty for devices without one, like TUN).
    pub mac: String,
}

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a route netlink socket: {0}")]
    Connect(#[source] io::Error),
    #[error("underlay IP {ip} is not on any device in this network namespace; pass an address this host owns (see `ip -4 addr`) with --underlay-ip, or add {ip} to the underlay device first")]
    UnderlayNotFound { ip: Ipv4Addr },
    #[error("no network device named `{0}` in this network namespace")]
    NoSuchLink(String),
    #[error("a route to {dst} already exists through another device (ifindex {other}); remove it (`ip route del {dst}`) or pick a cluster CIDR that does not clash")]
    RouteConflict { dst: Ipv4Net, other: u32 },
    #[error("{what}: {}", describe(.source))]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

fn describe(e: &rtnetlink::Error) -> String {
    match errno(e) {
        Some(code) => {
            let io = io::Error::from_raw_os_error(code);
            if code == libc::EPERM {
                format!("{io} (needs CAP_NET_ADMIN: run as root or `setcap cap_net_admin,cap_net_raw+ep`)")
            } else {
                io.to_string()
            }
        }
        None => e.to_string(),
    }
}

/// The positive errno of a kernel NACK.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What [`Netlink::install`] sets up on the TUN device.
#[derive(Clone, Debug)]
pub struct TunnelSetup {
    /// TUN interface index ([`super::tun::Tun::index`]).
    pub index: u32,
    /// Overlay MTU.
    pub mtu: u32,
    /// Address put on the device as /32 (the network address of the node's pod CIDR).
    pub address: Ipv4Addr,
    /// Routed into the device.
    pub cluster_cidr: Ipv4Net,
}

/// What [`Netlink::install`] added, so [`Netlink::uninstall`] removes exactly that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub index: u32,
    /// The /32 address, if we added it (it was not there before).
    pub address: Option<Ipv4Addr>,
    /// The cluster route, if we added it.
    pub route: Option<Ipv4Net>,
}

/// A blocking rtnetlink client bound to the calling thread's network namespace.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Netlink")
    }
}

impl Netlink {
    /// Opens the netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Netlink, NetlinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Connect)?;
        let handle = {
            let _ctx = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
            rt.spawn(conn);
            handle
        };
        Ok(Netlink { rt, handle })
    }

    fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let what = what.into();
        move |source| NetlinkError::Request { what, source }
    }

    /// The device called `name`, if there is one.
    pub fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let res = self.rt.block_on(
            self.handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next(),
        );
        match res {
            Ok(msg) => Ok(msg.map(link_from)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(Self::req(format!("looking up device `{name}`"))(e)),
        }
    }

    /// The device with interface index `index`.
    pub fn link_by_index(&self, index: u32) -> Result<Link, NetlinkError> {
        let msg = self
            .rt
            .block_on(
                self.handle
                    .link()
                    .get()
                    .match_index(index)
                    .execute()
                    .try_next(),
            )
            .map_err(Self::req(format!("looking up interface index {index}")))?;
        msg.map(link_from)
            .ok_or_else(|| NetlinkError::NoSuchLink(format!("#{index}")))
    }

    /// The device that holds IPv4 address `ip` (the underlay device) and its MTU.
    pub fn link_with_address(&self, ip: Ipv4Addr) -> Result<Link, NetlinkError> {
        let addrs: Vec<_> = self
            .rt
            .block_on(
                self.handle
                    .address()
                    .get()
                    .set_address_filter(IpAddr::V4(ip))
                    .execute()
                    .try_collect(),
            )
            .map_err(Self::req(format!("listing addresses to find {ip}")))?;
        // The filter is applied client-side by rtnetlink; check again to be exact.
        let index = addrs
            .iter()
            .find(|m| {
                m.attributes.iter().any(|a| {
                    matches!(a, AddressAttribute::Local(IpAddr::V4(x)) | AddressAttribute::Address(IpAddr::V4(x)) if *x == ip)
                })
            })
            .map(|m| m.header.index)
            .ok_or(NetlinkError::UnderlayNotFound { ip })?;
        self.link_by_index(index)
    }

    /// IPv4 addresses on device `index`.
    pub fn addresses(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let msgs: Vec<_> = self
            .rt
            .block_on(
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect(),
            )
            .map_err(Self::req(format!("listing addresses of ifindex {index}")))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(x)) => {
                        Ipv4Net::new(*x, m.header.prefix_len).ok()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Sets the MTU of device `index` and brings it up.
    pub fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(Self::req(format!(
                "setting MTU {mtu} and up on ifindex {index}"
            )))
    }

    /// Sets the transmit queue length of device `index`.
    pub fn set_txqueuelen(&self, index: u32, len: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).txqueuelen(len).build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(Self::req(format!(
                "setting txqueuelen {len} on ifindex {index}"
            )))
    }

    /// Adds `addr` to device `index`; `Ok(false)` if it was already there.
    pub fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<bool, NetlinkError> {
        let res = self.rt.block_on(
            self.handle
                .address()
                .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
                .execute(),
        );
        match res {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(Self::req(format!(
                "adding address {addr} to ifindex {index}"
            ))(e)),
        }
    }

    /// Removes `addr` from device `index`; `Ok(false)` if it was not there.
    pub fn del_address(&self, index: u32, addr: Ipv4Net) -> Result<bool, NetlinkError> {
        let msg = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr.addr(), addr.prefix_len())
            .build();
        let res = self.rt.block_on(self.handle.address().del(msg).execute());
        match res {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::EADDRNOTAVAIL | libc::ENODEV)) => Ok(false),
            Err(e) => Err(Self::req(format!(
                "removing address {addr} from ifindex {index}"
            ))(e)),
        }
    }

    /// IPv4 unicast routes of the main table that leave through device `index`.
    pub fn routes(&self, index: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        Ok(self
            .main_routes()?
            .into_iter()
            .filter(|(_, oif)| *oif == Some(index))
            .map(|(dst, _)| dst)
            .collect())
    }

    /// Every IPv4 route of the main table.
    fn main_table(&self) -> Result<Vec<RouteMessage>, NetlinkError> {
        let msgs: Vec<RouteMessage> = self
            .rt
            .block_on(
                self.handle
                    .route()
                    .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                    .execute()
                    .try_collect(),
            )
            .map_err(Self::req("listing IPv4 routes"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| table_of(m) == RT_TABLE_MAIN)
            .collect())
    }

    fn main_routes(&self) -> Result<Vec<(Ipv4Net, Option<u32>)>, NetlinkError> {
        Ok(self
            .main_table()?
            .iter()
            .filter(|m| m.header.kind == RouteType::Unicast)
            .filter_map(|m| {
                let dst = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                        _ => None,
                    })
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                let oif = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                Some((
                    Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
                    oif,
                ))
            })
            .collect())
    }

    /// Routes `dst` into device `index` (scope link, main table); `Ok(false)` if that exact
    /// route was already there. A route to `dst` through another device is an error.
    pub fn add_route(&self, dst: Ipv4Net, index: u32) -> Result<bool, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        match self.rt.block_on(self.handle.route().add(msg).execute()) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                let existing = self.main_routes()?;
                match existing.iter().find(|(d, _)| *d == dst.trunc()) {
                    Some((_, Some(oif))) if *oif != index => {
                        Err(NetlinkError::RouteConflict { dst, other: *oif })
                    }
                    _ => Ok(false),
                }
            }
            Err(e) => Err(Self::req(format!("adding route {dst} dev ifindex {index}"))(e)),
        }
    }

    /// Removes the route `dst` through device `index`; `Ok(false)` if it was not there.
    pub fn del_route(&self, dst: Ipv4Net, index: u32) -> Result<bool, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        match self.rt.block_on(self.handle.route().del(msg).execute()) {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENODEV)) => Ok(false),
            Err(e) => Err(Self::req(format!(
                "removing route {dst} dev ifindex {index}"
            ))(e)),
        }
    }

    /// Main-table routes marked with route protocol `proto`: (destination, gateway).
    pub fn routes_of_proto(&self, proto: u8) -> Result<Vec<(Ipv4Net, Ipv4Addr)>, NetlinkError> {
        Ok(self
            .main_table()?
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::Other(proto))
            .filter_map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut gw = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                        _ => {}
                    }
                }
                Some((
                    Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
                    gw?,
                ))
            })
            .collect())
    }

    /// Routes `dst` via gateway `gw` on device `index`, marked with route protocol `proto`,
    /// replacing a route of ours to `dst`; `Ok(false)` when a route to `dst` that is not ours
    /// is in the way (it is left alone).
    pub fn add_route_via(
        &self,
        dst: Ipv4Net,
        gw: Ipv4Addr,
        index: u32,
        proto: u8,
    ) -> Result<bool, NetlinkError> {
        let ours = self.routes_of_proto(proto)?.iter().any(|(d, _)| *d == dst);
        if ours {
            self.del_route_via(dst, proto)?;
        }
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .gateway(gw)
            .output_interface(index)
            .protocol(RouteProtocol::Other(proto))
            .build();
        match self.rt.block_on(self.handle.route().add(msg).execute()) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(Self::req(format!(
                "adding route {dst} via {gw} dev ifindex {index}"
            ))(e)),
        }
    }

    /// Removes our route (protocol `proto`) to `dst`; `Ok(false)` if there was none.
    pub fn del_route_via(&self, dst: Ipv4Net, proto: u8) -> Result<bool, NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .protocol(RouteProtocol::Other(proto))
            .build();
        match self.rt.block_on(self.handle.route().del(msg).execute()) {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENODEV)) => Ok(false),
            Err(e) => Err(Self::req(format!("removing route {dst}"))(e)),
        }
    }

    /// Creates bridge `name` (up, with `mtu`) unless it exists; returns it either way.
    pub fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<Link, NetlinkError> {
        if let Some(link) = self.link_by_name(name)? {
            return Ok(link);
        }
        let msg = rtnetlink::LinkBridge::new(name).mtu(mtu).up().build();
        match self.rt.block_on(self.handle.link().add(msg).execute()) {
            Ok(()) => {}
            // Created meanwhile by a parallel ADD.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(Self::req(format!("creating bridge {name}"))(e)),
        }
        self.link_by_name(name)?
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))
    }

    /// Creates the veth pair `name` <-> `peer` (both down) in this namespace.
    pub fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetlinkError> {
        let msg = rtnetlink::LinkVeth::new(name, peer).build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(Self::req(format!("creating veth pair {name}/{peer}")))
    }

    /// Moves device `index` into the network namespace open as `netns_fd`.
    pub fn move_to_netns(&self, index: u32, netns_fd: RawFd) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .setns_by_fd(netns_fd)
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(Self::req(format!(
                "moving ifindex {index} to another namespace"
            )))
    }

    /// Attaches device `index` to bridge `bridge`, sets its MTU and brings it up.
    pub fn attach_up(&self, index: u32, bridge: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(bridge)
            .mtu(mtu)
            .up()
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(Self::req(format!(
                "attaching ifindex {index} to the bridge"
            )))
    }

    /// Renames device `index` to `name`, sets its MTU and brings it up.
    pub fn rename_up(&self, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .name(name)
            .mtu(mtu)
            .up()
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(Self::req(format!("renaming ifindex {index} to {name}")))
    }

    /// Deletes device `index`; `Ok(false)` if it was already gone.
    pub fn del_link(&self, index: u32) -> Result<bool, NetlinkError> {
        match self.rt.block_on(self.handle.link().del(index).execute()) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(Self::req(format!("deleting ifindex {index}"))(e)),
        }
    }

    /// Adds the default route via `gw` on device `index`.
    pub fn add_default_route(&self, gw: Ipv4Addr, index: u32) -> Result<(), NetlinkError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        match self.rt.block_on(self.handle.route().add(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(Self::req(format!("adding the default route via {gw}"))(e)),
        }
    }

    /// Configures the TUN device: MTU and up, the /32 address, the cluster route. Records what
    /// it added so [`Netlink::uninstall`] can take exactly that away again.
    pub fn install(&self, setup: &TunnelSetup) -> Result<Installed, NetlinkError> {
        self.set_mtu_up(setup.index, setup.mtu)?;
        let host = Ipv4Net::new(setup.address, 32).expect("/32 is a valid prefix");
        let address = self
            .add_address(setup.index, host)?
            .then_some(setup.address);
        let route = self
            .add_route(setup.cluster_cidr.trunc(), setup.index)?
            .then_some(setup.cluster_cidr.trunc());
        Ok(Installed {
            index: setup.index,
            address,
            route,
        })
    }

    /// Removes the route and the address [`Netlink::install`] added. Things already gone (the
    /// TUN device vanishes with its last fd, taking both along) are not an error.
    pub fn uninstall(&self, installed: &Installed) -> Result<(), NetlinkError> {
        if let Some(route) = installed.route {
            self.del_route(route, installed.index)?;
        }
        if let Some(addr) = installed.address {
            let host = Ipv4Net::new(addr, 32).expect("/32 is a valid prefix");
            self.del_address(installed.index, host)?;
        }
        Ok(())
    }
}

/// A route netlink socket subscribed to link, IPv4 address and IPv4 route changes in this
/// network namespace: readable whenever something (anyone) changed one of them. The messages
/// are not parsed; the reader re-checks the state it cares about, which also covers changes
/// lost to a full socket buffer.
#[derive(Debug)]
pub struct Changes {
    sock: std::os::fd::OwnedFd,
}

impl Changes {
    /// Subscribes (`RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE`).
    pub fn subscribe() -> Result<Changes, NetlinkError> {
        use nix::sys::socket::{
            bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        let groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV4_ROUTE) as u32;
        let sock = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| NetlinkError::Connect(e.into()))?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            &NetlinkAddr::new(0, groups),
        )
        .map_err(|e| NetlinkError::Connect(e.into()))?;
        Ok(Changes { sock })
    }

    /// Reads and discards every queued notification; returns how many reads it took.
    pub fn drain(&self) -> usize {
        let mut buf = [0u8; 8192];
        let mut reads = 0;
        // Bounded: notifications arriving while we drain are seen on the next wake-up.
        while reads < 64 {
            match nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.sock),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(_) => reads += 1,
                Err(nix::errno::Errno::EINTR) => {}
                // Empty, or ENOBUFS after an overflow: either way the caller re-checks all.
                Err(_) => break,
            }
        }
        reads
    }
}

impl std::os::fd::AsFd for Changes {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn link_from(m: LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
        mac: String::new(),
    };
    for a in m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(bytes) => {
                link.mac = bytes
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                })
            }
            _ => {}
        }
    }
    link
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run};
    use crate::sys::tun::{Tun, TunConfig};

    #[test]
    fn finds_the_underlay_device_and_its_mtu() {
        in_netns("nl-underlay", || {
            run("ip link add pneth0 mtu 1400 type veth peer name pneth1 && ip addr add 198.18.0.7/24 dev pneth0 && ip link set pneth0 up");
            let nl = Netlink::new().unwrap();
            let link = nl.link_with_address("198.18.0.7".parse().unwrap()).unwrap();
            assert_eq!(
                (link.name.as_str(), link.mtu, link.up),
                ("pneth0", 1400, true)
            );
            assert_eq!(link.kind.as_deref(), Some("veth"));
            assert_eq!(nl.link_by_name("pneth0").unwrap(), Some(link));
            assert_eq!(nl.link_by_name("nosuch0").unwrap(), None);
            let err = nl
                .link_with_address("198.18.0.8".parse().unwrap())
                .unwrap_err();
            assert!(matches!(err, NetlinkError::UnderlayNotFound { .. }));
            let msg = err.to_string();
            assert!(
                msg.contains(
                    "underlay IP 198.18.0.8 is not on any device in this network namespace"
                ),
                "{msg}"
            );
            assert!(msg.contains("--underlay-ip"), "{msg}");
        });
    }

    #[test]
    fn install_and_uninstall_the_tunnel_device() {
        in_netns("nl-setup", || {
            let tun = Tun::open(&TunConfig::new("pntun9")).unwrap();
            let nl = Netlink::new().unwrap();
            let cluster: Ipv4Net = "10.244.0.0/16".parse().unwrap();
            let setup = TunnelSetup {
                index: tun.index(),
                mtu: 1450,
                address: "10.244.1.0".parse().unwrap(),
                cluster_cidr: cluster,
            };
            let inst = nl.install(&setup).unwrap();
            assert_eq!(inst.address, Some(setup.address));
            assert_eq!(inst.route, Some(cluster));
            let link = nl.link_by_index(tun.index()).unwrap();
            assert_eq!(
                (link.name.as_str(), link.mtu, link.up),
                ("pntun9", 1450, true)
            );
            assert_eq!(link.kind.as_deref(), Some("tun"));
            assert_eq!(
                nl.addresses(tun.index()).unwrap(),
                ["10.244.1.0/32".parse::<Ipv4Net>().unwrap()]
            );
            assert!(nl.routes(tun.index()).unwrap().contains(&cluster));
            // The same view from iproute2.
            let shown = run("ip -4 route show dev pntun9");
            assert!(
                shown.contains("10.244.0.0/16") && shown.contains("scope link"),
                "{shown}"
            );
            assert!(run("ip -4 addr show dev pntun9").contains("10.244.1.0/32"));

            // Installing again is idempotent and claims nothing new.
            let again = nl.install(&setup).unwrap();
            assert_eq!((again.address, again.route), (None, None));

            nl.uninstall(&inst).unwrap();
            assert!(nl.addresses(tun.index()).unwrap().is_empty());
            assert!(!nl.routes(tun.index()).unwrap().contains(&cluster));
            assert!(!run("ip -4 route").contains("10.244.0.0/16"));
            // Uninstalling twice is harmless.
            nl.uninstall(&inst).unwrap();

            nl.set_txqueuelen(tun.index(), 2000).unwrap();
            assert!(run("ip link show pntun9").contains("qlen 2000"));
        });
    }

    #[test]
    fn a_cluster_route_through_another_device_is_a_conflict() {
        in_netns("nl-conflict", || {
            run("ip link add pnd0 type veth peer name pnd1 && ip link set pnd0 up && ip route add 10.244.0.0/16 dev pnd0");
            let tun = Tun::open(&TunConfig::new("pntun8")).unwrap();
            let nl = Netlink::new().unwrap();
            nl.set_mtu_up(tun.index(), 1480).unwrap();
            let err = nl
                .add_route("10.244.0.0/16".parse().unwrap(), tun.index())
                .unwrap_err();
            assert!(matches!(err, NetlinkError::RouteConflict { .. }), "{err:?}");
            assert!(err.to_string().contains("ip route del 10.244.0.0/16"));
        });
    }
}
