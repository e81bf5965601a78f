//! `podnet-cni`, the CNI plugin (spec 1.0.0 and 1.1.0; 0.4.0 accepted), installed as
//! `/opt/cni/bin/podnet`. A runtime runs it per pod with the verb and the pod in environment
//! variables and the network config on stdin; it answers with the spec's result or error JSON
//! on stdout.
//!
//! ADD gives the pod a veth pair: `CNI_IFNAME` in the pod's namespace, the host end on the
//! node's bridge (`cni0`, gateway `.1` of the node's pod CIDR, made if missing), an address from
//! [`ipam`] (or from a delegated IPAM plugin such as `host-local`) and a default route via the
//! gateway. The pod CIDR and MTU come from the agent's `subnet.env`. Whatever ADD made is
//! removed again when a later step fails.
//!
//! Before the pod's interface is made, ADD tells the agent who the pod is and which address it
//! gets ([`identity`], through [`agent_api`]), so network policy selects it and is in force
//! before the pod can be reached; DEL tells the agent the pod is gone.

pub mod agent_api;
pub mod identity;
pub mod ipam;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::sys::netlink::{Link, Netlink, NetlinkError};
use crate::sys::netns::NetNs;
use ipam::{Attachment, IpamError, Store};

/// The versions this plugin speaks; the first is what VERSION reports as its own.
pub const VERSIONS: [&str; 3] = ["1.1.0", "1.0.0", "0.4.0"];
const DEFAULT_SUBNET_FILE: &str = "/run/podnet/subnet.env";
const DEFAULT_DATA_DIR: &str = "/var/lib/cni/podnet";
const DEFAULT_BRIDGE: &str = "cni0";

/// A CNI error: the spec's code, a message that says what to do, and details.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The spec's error object.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// Codes of the spec (1-99) and of podnet (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const BAD_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const IPAM_EXHAUSTED: u32 = 100;
    pub const NETLINK: u32 = 101;
    pub const IPAM_STORE: u32 = 102;
    pub const DELEGATE: u32 = 103;
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> CniError {
        let code = match e {
            IpamError::Exhausted { .. } => code::IPAM_EXHAUSTED,
            IpamError::Io { .. } => code::IPAM_STORE,
        };
        CniError::new(code, e.to_string(), "")
    }
}

impl From<NetlinkError> for CniError {
    fn from(e: NetlinkError) -> CniError {
        CniError::new(code::NETLINK, "netlink", e.to_string())
    }
}

/// The network configuration on stdin.
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "subnetFile")]
    pub subnet_file: Option<PathBuf>,
    #[serde(rename = "dataDir")]
    pub data_dir: Option<PathBuf>,
    pub bridge: Option<String>,
    pub mtu: Option<u32>,
    pub ipam: Option<Value>,
    /// The CNI conventions' `args`; `args.cni.labels` are the pod's labels.
    pub args: Option<Value>,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// The CNI_* environment.
#[derive(Debug, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub path: Option<String>,
    /// `CNI_ARGS`: `KEY=VALUE;...` (the pod's namespace, name, labels and named ports).
    pub args: Option<String>,
}

impl Env {
    pub fn from_process() -> Env {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            path: var("CNI_PATH"),
            args: var("CNI_ARGS"),
        }
    }

    fn need<'a>(&self, value: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        value.as_deref().ok_or_else(|| {
            CniError::new(
                code::BAD_ENV,
                format!(
                    "{name} is not set: the runtime must set it for {:?}",
                    self.command
                ),
                "",
            )
        })
    }

    fn attachment(&self) -> Result<Attachment, CniError> {
        Ok(Attachment {
            container_id: self
                .need(&self.container_id, "CNI_CONTAINERID")?
                .to_string(),
            ifname: self.need(&self.ifname, "CNI_IFNAME")?.to_string(),
        })
    }
}

/// What the agent's `subnet.env` says.
#[derive(Debug, Clone, Copy)]
pub struct Subnet {
    pub pod_cidr: Ipv4Net,
    pub mtu: u32,
    /// The agent's admin API (`PODNET_API`), where pods are reported.
    pub api: Option<SocketAddr>,
}

fn read_subnet(path: &Path) -> Result<Subnet, CniError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN,
            format!(
                "{} is missing: podnet-agent writes it once it has this node's pod CIDR; is it \
                 running? Try again",
                path.display()
            ),
            e.to_string(),
        )
    })?;
    let vars: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
        .collect();
    let bad = |what: &str| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("{}: no valid {what}", path.display()),
            text.clone(),
        )
    };
    let pod_cidr = vars
        .get("POD_SUBNET")
        .and_then(|v| v.parse::<Ipv4Net>().ok())
        .ok_or_else(|| bad("POD_SUBNET"))?;
    let mtu = vars
        .get("POD_MTU")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("POD_MTU"))?;
    let api = match vars.get("PODNET_API") {
        None => None,
        Some(v) => Some(v.parse().map_err(|_| bad("PODNET_API"))?),
    };
    Ok(Subnet { pod_cidr, mtu, api })
}

/// Runs one plugin invocation; `Ok(Some(json))` is printed, `Ok(None)` prints nothing.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, (String, CniError)> {
    let command = env.command.clone().unwrap_or_default();
    if command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": VERSIONS[0],
            "supportedVersions": VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        (
            VERSIONS[0].to_string(),
            CniError::new(
                code::DECODE,
                "the network config on stdin is not valid JSON for podnet",
                e.to_string(),
            ),
        )
    })?;
    let version = conf.cni_version.clone();
    let fail = |e: CniError| (version.clone(), e);
    if !VERSIONS.contains(&version.as_str()) {
        return Err(fail(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version} is not supported: use one of {}",
                VERSIONS.join(", ")
            ),
            "",
        )));
    }
    // The spec's network name (it also names the IPAM directory: no `/`, no `..`).
    let valid_name = conf
        .name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && conf
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid_name {
        return Err(fail(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "network name {:?} is invalid: use letters, digits, '_', '.' and '-', starting \
                 with a letter or digit",
                conf.name
            ),
            "",
        )));
    }
    let subnet_file = conf
        .subnet_file
        .clone()
        .unwrap_or_else(|| DEFAULT_SUBNET_FILE.into());
    let inv = Invocation {
        env,
        conf: &conf,
        stdin,
    };
    match command.as_str() {
        "ADD" => add(&inv, &subnet_file).map(Some).map_err(fail),
        "DEL" => del(&inv).map(|()| None).map_err(fail),
        "CHECK" => check(env, &conf).map(|()| None).map_err(fail),
        "GC" => gc(&conf).map(|()| None).map_err(fail),
        "STATUS" => match read_subnet(&subnet_file) {
            Ok(_) => Ok(None),
            Err(e) => Err(fail(CniError::new(
                code::NOT_AVAILABLE,
                format!("podnet is not ready on this node: {}", e.msg),
                e.details,
            ))),
        },
        other => Err(fail(CniError::new(
            code::BAD_ENV,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"),
            "",
        ))),
    }
}

fn store(conf: &NetConf) -> Result<Store, CniError> {
    let dir = conf
        .data_dir
        .clone()
        .unwrap_or_else(|| DEFAULT_DATA_DIR.into());
    Ok(Store::open(&dir, &conf.name)?)
}

/// The host end's name: `veth` and 8 hex digits of an FNV-1a hash of container ID and interface,
/// the same in every version of the plugin, so a DEL or GC after an upgrade finds it.
fn host_veth(who: &Attachment) -> String {
    let hash = who.key().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("veth{hash:08x}")
}

impl Attachment {
    fn key(&self) -> String {
        format!("{}/{}", self.container_id, self.ifname)
    }
}

fn open_netns(env: &Env) -> Result<NetNs, CniError> {
    let path = env.need(&env.netns, "CNI_NETNS")?;
    NetNs::open(Path::new(path)).map_err(|e| {
        CniError::new(
            code::BAD_ENV,
            format!("CNI_NETNS {path} cannot be opened: give the pod's network namespace"),
            e.to_string(),
        )
    })
}

/// An address for the pod: from the delegated IPAM plugin if the config names one, else ours.
fn allocate(
    inv: &Invocation,
    subnet: Subnet,
    who: &Attachment,
) -> Result<(Ipv4Net, Ipv4Addr), CniError> {
    let conf = inv.conf;
    if let Some(kind) = delegate_type(conf) {
        let result = delegate(inv.env, inv.stdin, &kind, "ADD")?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.parse::<Ipv4Net>().ok())
            .ok_or_else(|| {
                CniError::new(
                    code::DELEGATE,
                    format!("IPAM plugin {kind} gave no IPv4 address"),
                    result.to_string(),
                )
            })?;
        let gw = result["ips"][0]["gateway"]
            .as_str()
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| ipam::gateway(subnet.pod_cidr));
        return Ok((ip, gw));
    }
    let ip = store(conf)?.allocate(subnet.pod_cidr, who)?;
    let net = Ipv4Net::new(ip, subnet.pod_cidr.prefix_len()).expect("prefix of a valid net");
    Ok((net, ipam::gateway(subnet.pod_cidr)))
}

fn release(inv: &Invocation, who: &Attachment) -> Result<(), CniError> {
    if let Some(kind) = delegate_type(inv.conf) {
        delegate(inv.env, inv.stdin, &kind, "DEL")?;
        return Ok(());
    }
    store(inv.conf)?.release(who)?;
    Ok(())
}

/// One run of the plugin: its environment, its config, and the config's bytes.
struct Invocation<'a> {
    env: &'a Env,
    conf: &'a NetConf,
    stdin: &'a [u8],
}

fn delegate_type(conf: &NetConf) -> Option<String> {
    conf.ipam
        .as_ref()
        .and_then(|i| i.get("type"))
        .and_then(|t| t.as_str())
        .map(str::to_string)
}

/// Runs IPAM plugin `kind` from CNI_PATH with this invocation's environment and the config
/// bytes as received (`stdin`).
fn delegate(env: &Env, stdin: &[u8], kind: &str, verb: &str) -> Result<Value, CniError> {
    let paths = env.path.clone().unwrap_or_default();
    let bin = std::env::split_paths(&paths)
        .map(|d| d.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::DELEGATE,
                format!("IPAM plugin {kind} is not in CNI_PATH ({paths}): install it (Debian containernetworking-plugins puts them in /usr/lib/cni)"),
                "",
            )
        })?;
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", verb)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::DELEGATE,
                format!("cannot run {}", bin.display()),
                e.to_string(),
            )
        })?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(
            code::DELEGATE,
            format!("{} failed", bin.display()),
            e.to_string(),
        )
    })?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if !out.status.success() {
        let msg = v["msg"].as_str().unwrap_or("failed").to_string();
        return Err(CniError::new(
            code::DELEGATE,
            format!("IPAM plugin {kind}: {msg}"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(v)
}

fn add(inv: &Invocation, subnet_file: &Path) -> Result<Value, CniError> {
    let (env, conf) = (inv.env, inv.conf);
    let who = env.attachment()?;
    let pod = identity::identity(env.args.as_deref(), conf.args.as_ref(), &who.container_id)
        .map_err(|e| {
            let code = if e.starts_with("args.") {
                code::INVALID_CONFIG
            } else {
                code::BAD_ENV
            };
            CniError::new(code, e, "")
        })?;
    let netns = open_netns(env)?;
    let subnet = read_subnet(subnet_file)?;
    let mtu = conf.mtu.unwrap_or(subnet.mtu);
    let bridge_name = conf.bridge.clone().unwrap_or_else(|| DEFAULT_BRIDGE.into());
    let (ip, gw) = allocate(inv, subnet, &who)?;
    // The agent has the pod, and has applied its network policy, before the pod has its
    // address: there is no moment in which it is reachable against its policy.
    if let Some(api) = subnet.api {
        if let Err(e) = report(api, &who, &pod, ip.addr()) {
            let _ = release(inv, &who);
            return Err(e);
        }
    }
    let (bridge, host, pod) = match setup(&netns, &who, &bridge_name, mtu, ip, gw, subnet.pod_cidr)
    {
        Ok(m) => m,
        Err(e) => {
            // Nothing left behind: the pair (if made), the agent's record and the address.
            teardown(Some(&netns), &who);
            forget(conf, &who);
            let _ = release(inv, &who);
            return Err(e);
        }
    };
    let netns_path = env.netns.clone().unwrap_or_default();
    let mut ip_entry =
        json!({"address": ip.to_string(), "gateway": gw.to_string(), "interface": 2});
    if conf.cni_version == "0.4.0" {
        ip_entry["version"] = json!("4");
    }
    let mut result = json!({
        "cniVersion": conf.cni_version,
        "interfaces": [
            {"name": bridge.name, "mac": bridge.mac},
            {"name": host.name, "mac": host.mac},
            {"name": who.ifname, "mac": pod.mac, "sandbox": netns_path},
        ],
        "ips": [ip_entry],
        "routes": [{"dst": "0.0.0.0/0", "gw": gw.to_string()}],
        "dns": {},
    });
    if let Some(prev) = &conf.prev_result {
        result = chain(prev, result);
    }
    Ok(result)
}

/// The admin API path of an attachment.
fn pod_path(who: &Attachment) -> String {
    // Runtimes' container IDs and interface names hold no `/`, `?` or spaces, but the path is
    // built from them, so anything else is refused rather than sent.
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if ok(&who.container_id) && ok(&who.ifname) {
        format!("/pods/{}/{}", who.container_id, who.ifname)
    } else {
        String::new()
    }
}

/// Tells the agent at `api` that the pod is being attached with `ip`, before the pod gets it,
/// so the node knows every pod it runs (and enforces its policy) before the pod has an address.
fn report(
    api: SocketAddr,
    who: &Attachment,
    pod: &identity::PodIdentity,
    ip: Ipv4Addr,
) -> Result<(), CniError> {
    let path = pod_path(who);
    if path.is_empty() {
        return Err(CniError::new(
            code::BAD_ENV,
            "CNI_CONTAINERID and CNI_IFNAME may hold only letters, digits, '-', '_' and '.'",
            format!("{who:?}"),
        ));
    }
    let mut body = serde_json::to_value(pod).expect("identities serialize");
    body["ips"] = json!([ip]);
    match agent_api::call(api, "PUT", &path, Some(&body)) {
        Ok((200, _)) => Ok(()),
        Ok((status, answer)) => {
            let detail = serde_json::from_str::<Value>(&answer)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_string))
                .unwrap_or(answer);
            let code = if status >= 500 {
                code::TRY_AGAIN
            } else {
                code::INVALID_CONFIG
            };
            Err(CniError::new(
                code,
                format!(
                    "podnet-agent refused pod {}/{}: {detail}",
                    pod.namespace, pod.name
                ),
                format!("HTTP {status}"),
            ))
        }
        Err(e) => Err(CniError::new(
            code::TRY_AGAIN,
            format!(
                "cannot reach podnet-agent at {api} to register the pod; is it running? Try again"
            ),
            e,
        )),
    }
}

/// A chained ADD: the earlier plugins' result with ours appended (interface indexes moved).
fn chain(prev: &Value, ours: Value) -> Value {
    let mut out = prev.clone();
    let offset = prev["interfaces"].as_array().map_or(0, Vec::len);
    for key in ["interfaces", "routes"] {
        let mut list = prev[key].as_array().cloned().unwrap_or_default();
        list.extend(ours[key].as_array().cloned().unwrap_or_default());
        out[key] = Value::Array(list);
    }
    let mut ips = prev["ips"].as_array().cloned().unwrap_or_default();
    for mut ip in ours["ips"].as_array().cloned().unwrap_or_default() {
        ip["interface"] = json!(ip["interface"].as_u64().unwrap_or(0) as usize + offset);
        ips.push(ip);
    }
    out["ips"] = Value::Array(ips);
    out["cniVersion"] = ours["cniVersion"].clone();
    out
}

fn setup(
    netns: &NetNs,
    who: &Attachment,
    bridge_name: &str,
    mtu: u32,
    ip: Ipv4Net,
    gw: Ipv4Addr,
    pod_cidr: Ipv4Net,
) -> Result<(Link, Link, Link), CniError> {
    let nl = Netlink::new()?;
    let bridge = nl.ensure_bridge(bridge_name, mtu)?;
    let gw_net = Ipv4Net::new(gw, pod_cidr.prefix_len()).expect("prefix of a valid net");
    nl.add_address(bridge.index, gw_net)?;
    nl.set_mtu_up(bridge.index, bridge.mtu.max(mtu))?;
    let host_name = host_veth(who);
    // The pod end gets a temporary name here (the host may have an `eth0` of its own) and its
    // real one inside the pod.
    let temp = format!("pn{}", &host_name[4..]);
    nl.add_veth(&host_name, &temp)?;
    let peer = nl
        .link_by_name(&temp)?
        .ok_or_else(|| NetlinkError::NoSuchLink(temp.clone()))?;
    nl.move_to_netns(peer.index, netns.fd())?;
    let host = nl
        .link_by_name(&host_name)?
        .ok_or_else(|| NetlinkError::NoSuchLink(host_name.clone()))?;
    nl.attach_up(host.index, bridge.index, mtu)?;
    let ifname = who.ifname.clone();
    let pod = in_pod(netns, move || {
        let nl = Netlink::new()?;
        let link = nl
            .link_by_name(&temp)?
            .ok_or_else(|| NetlinkError::NoSuchLink(temp.clone()))?;
        nl.rename_up(link.index, &ifname, mtu)?;
        nl.add_address(link.index, ip)?;
        nl.add_default_route(gw, link.index)?;
        nl.link_by_index(link.index)
    })?;
    let host = nl.link_by_index(host.index)?;
    Ok((bridge, host, pod))
}

/// Deletes the pair: from inside the pod when its namespace is still there, else by the host
/// end. Gone already is fine.
fn teardown(netns: Option<&NetNs>, who: &Attachment) {
    if let Some(ns) = netns {
        let ifname = who.ifname.clone();
        let _ = ns.run(move || {
            if let Ok(nl) = Netlink::new() {
                if let Ok(Some(l)) = nl.link_by_name(&ifname) {
                    let _ = nl.del_link(l.index);
                }
            }
        });
    }
    if let Ok(nl) = Netlink::new() {
        if let Ok(Some(l)) = nl.link_by_name(&host_veth(who)) {
            let _ = nl.del_link(l.index);
        }
    }
}

fn del(inv: &Invocation) -> Result<(), CniError> {
    let env = inv.env;
    let who = env.attachment()?;
    // The spec: DEL of an unknown container, or with its namespace gone, succeeds.
    let netns = env
        .netns
        .as_deref()
        .and_then(|p| NetNs::open(Path::new(p)).ok());
    teardown(netns.as_ref(), &who);
    forget(inv.conf, &who);
    release(inv, &who)
}

/// Tells the agent the pod is gone (DEL, and GC for each attachment it frees). DEL succeeds whatever the agent says (the spec wants DEL
/// to succeed where it can); a record left behind is replaced when its address is reused, and
/// the agent withdraws it when it learns otherwise.
fn forget(conf: &NetConf, who: &Attachment) {
    let file = conf
        .subnet_file
        .clone()
        .unwrap_or_else(|| DEFAULT_SUBNET_FILE.into());
    let api = read_subnet(&file).ok().and_then(|s| s.api);
    let path = pod_path(who);
    if let (Some(api), false) = (api, path.is_empty()) {
        let _ = agent_api::call(api, "DELETE", &path, None);
    }
}

/// Runs `f` (netlink work) on a thread inside the pod's namespace.
fn in_pod<T: Send>(
    netns: &NetNs,
    f: impl FnOnce() -> Result<T, NetlinkError> + Send,
) -> Result<T, CniError> {
    let done = netns.run(f).map_err(|e| {
        CniError::new(
            code::NETLINK,
            "cannot enter the pod's namespace",
            e.to_string(),
        )
    })?;
    Ok(done?)
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let who = env.attachment()?;
    let netns = open_netns(env)?;
    let ip = if delegate_type(conf).is_some() {
        None
    } else {
        Some(store(conf)?.find(&who)?.ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("no address is allocated to {}", who.key()),
                "",
            )
        })?)
    };
    let ifname = who.ifname.clone();
    let addrs = in_pod(&netns, move || {
        let nl = Netlink::new()?;
        match nl.link_by_name(&ifname)? {
            Some(l) => nl.addresses(l.index).map(Some),
            None => Ok(None),
        }
    })?;
    let Some(addrs) = addrs else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "{} is missing in {}",
                who.ifname,
                env.netns.clone().unwrap_or_default()
            ),
            "",
        ));
    };
    if let Some(ip) = ip {
        if !addrs.iter().any(|a| a.addr() == ip) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("{} lacks its address {ip}", who.ifname),
                format!("{addrs:?}"),
            ));
        }
    }
    Ok(())
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    let keep = conf.valid_attachments.clone().unwrap_or_default();
    if delegate_type(conf).is_some() {
        return Ok(());
    }
    let freed = store(conf)?.gc(&keep)?;
    for (_, who) in &freed {
        teardown(None, who);
        forget(conf, who);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> Env {
        Env {
            command: Some(command.into()),
            ..Env::default()
        }
    }

    #[test]
    fn version_lists_what_is_spoken() {
        let v = run(&env("VERSION"), b"").unwrap().unwrap();
        assert_eq!(v["supportedVersions"], json!(["1.1.0", "1.0.0", "0.4.0"]));
    }

    #[test]
    fn bad_input_gets_the_spec_codes() {
        let (_, e) = run(&env("ADD"), b"{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let (_, e) = run(&env("ADD"), br#"{"cniVersion":"0.3.1","name":"podnet"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("1.1.0"), "{}", e.msg);
        let (v, e) = run(&env("ADD"), br#"{"cniVersion":"1.0.0","name":"podnet"}"#).unwrap_err();
        assert_eq!((v.as_str(), e.code), ("1.0.0", code::BAD_ENV));
        assert!(e.msg.contains("CNI_CONTAINERID"), "{}", e.msg);
        let conf =
            br#"{"cniVersion":"1.1.0","name":"podnet","subnetFile":"/nonexistent/subnet.env"}"#;
        let (_, e) = run(&env("STATUS"), conf).unwrap_err();
        assert_eq!(e.code, code::NOT_AVAILABLE);
        let (_, e) = run(&env("FROB"), conf).unwrap_err();
        assert_eq!(e.code, code::BAD_ENV);
        let (_, e) = run(&env("ADD"), br#"{"cniVersion":"1.0.0","name":"../../etc"}"#).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
    }

    #[test]
    fn host_end_names_are_stable_and_fit_ifnamsiz() {
        let who = Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        };
        // FNV-1a of "abc/eth0" (computed independently), so a new build names an old veth alike.
        assert_eq!(host_veth(&who), "veth2d0e111d");
        assert!(host_veth(&who).len() <= 15);
    }

    #[test]
    fn a_chained_result_keeps_the_earlier_ones() {
        let prev = json!({"cniVersion":"1.0.0","interfaces":[{"name":"a"}],
            "ips":[{"address":"10.0.0.2/24","interface":0}],"routes":[]});
        let ours = json!({"cniVersion":"1.0.0","interfaces":[{"name":"b"},{"name":"c"},{"name":"eth0"}],
            "ips":[{"address":"10.244.1.2/24","interface":2}],"routes":[{"dst":"0.0.0.0/0"}]});
        let out = chain(&prev, ours);
        assert_eq!(out["interfaces"].as_array().unwrap().len(), 4);
        assert_eq!(out["ips"][1]["interface"], json!(3));
        assert_eq!(out["ips"][0]["address"], json!("10.0.0.2/24"));
    }
}
