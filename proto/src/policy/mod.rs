//! Kubernetes `NetworkPolicy` (`networking.k8s.io/v1`): the documents operators write, the
//! checks that refuse a bad one whole, and the semantics that decide whether a connection
//! between two endpoints is allowed.
//!
//! The types keep Kubernetes' JSON shape (camelCase, optional lists distinct from empty ones),
//! so the same documents work with `kubectl` and with podnet. Everything here is pure: the
//! control service validates with it, and the agent evaluates and compiles rules from it.

mod eval;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
mod model;
mod records;
mod selector;
mod validate;

pub use eval::{Cluster, Decision, Endpoint, PodView, Verdict};
pub use model::{
    Direction, EgressRule, IngressRule, IpBlock, LabelSelector, Labels, NamedPort, NetworkPolicy,
    NetworkPolicySpec, ObjectMeta, Peer, PolicyPort, PortRef, Protocol, Requirement, API_VERSION,
    NAMESPACE_NAME_LABEL,
};
pub use records::{LabelChange, PodRecord, PolicyState};
pub use validate::{
    check_label_key, check_label_value, check_namespace, check_object_name, check_port_name,
    PolicyError,
};
