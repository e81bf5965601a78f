//! The service's own metrics, in prometheus-client's types.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// One label pair with a fixed key and value.
type Fixed = [(&'static str, &'static str); 1];

/// The service's metrics, in prometheus-client's types, registered once in `registry`.
/// The node counts, the revision and the capacity are set from the core at each scrape.
pub(crate) struct Metrics {
    pub(crate) registry: prometheus_client::registry::Registry,
    pub(crate) nodes: Family<Fixed, Gauge>,
    pub(crate) revision: Gauge,
    pub(crate) capacity: Gauge,
    pub(crate) registrations: Family<Fixed, Counter>,
    pub(crate) lapsed: Counter,
    pub(crate) store_errors: Counter,
    pub(crate) watchers: Gauge,
    pub(crate) watchers_refused: Counter,
    pub(crate) connections: Gauge,
    pub(crate) connections_closed: Family<Fixed, Counter>,
    pub(crate) requests: Family<[(&'static str, u16); 1], Counter>,
    pub(crate) insecure: Gauge,
    pub(crate) store_available: Gauge,
}

impl Metrics {
    pub(super) fn new() -> Metrics {
        let mut m = Metrics {
            registry: Default::default(),
            nodes: Default::default(),
            revision: Default::default(),
            capacity: Default::default(),
            registrations: Default::default(),
            lapsed: Default::default(),
            store_errors: Default::default(),
            watchers: Default::default(),
            watchers_refused: Default::default(),
            connections: Default::default(),
            connections_closed: Default::default(),
            requests: Default::default(),
            insecure: Default::default(),
            store_available: Default::default(),
        };
        // Every labelled sample is there from the start, at 0, so a rate() over a restart
        // sees the series begin rather than appear.
        for state in ["up", "down"] {
            m.nodes.get_or_create(&[("state", state)]).set(0);
        }
        for result in ["added", "modified", "renewed"] {
            m.registrations
                .get_or_create(&[("result", result)])
                .inc_by(0);
        }
        for reason in ["limit", "timeout"] {
            m.connections_closed
                .get_or_create(&[("reason", reason)])
                .inc_by(0);
        }
        let r = &mut m.registry;
        // prometheus-client appends "_total" to counters and a "." to each help text.
        r.register(
            "podnet_control_nodes",
            "Nodes known to the control service, by state",
            m.nodes.clone(),
        );
        r.register(
            "podnet_control_revision",
            "Revision of the node table",
            m.revision.clone(),
        );
        r.register(
            "podnet_control_pod_cidr_capacity",
            "Nodes the cluster CIDR fits",
            m.capacity.clone(),
        );
        r.register(
            "podnet_control_registrations",
            "Accepted registrations by outcome",
            m.registrations.clone(),
        );
        r.register(
            "podnet_control_lease_lapses",
            "Nodes withdrawn because their lease lapsed",
            m.lapsed.clone(),
        );
        r.register(
            "podnet_control_store_errors",
            "Failed writes of the state store",
            m.store_errors.clone(),
        );
        r.register(
            "podnet_control_watchers",
            "Open watch streams",
            m.watchers.clone(),
        );
        r.register(
            "podnet_control_watchers_refused",
            "Watch requests refused at the limit",
            m.watchers_refused.clone(),
        );
        r.register(
            "podnet_control_connections",
            "Open connections",
            m.connections.clone(),
        );
        r.register(
            "podnet_control_connections_closed",
            "Connections closed by a limit",
            m.connections_closed.clone(),
        );
        r.register(
            "podnet_control_http_requests",
            "HTTP requests by status code",
            m.requests.clone(),
        );
        r.register(
            "podnet_control_insecure",
            "1 while the service serves plain HTTP (--insecure), 0 under mTLS",
            m.insecure.clone(),
        );
        r.register(
            "podnet_control_store_available",
            "1 while the store takes writes; with --store etcd, 0 while etcd has no quorum or \
             cannot be reached (reads and watches are still served)",
            m.store_available.clone(),
        );
        m
    }
}
