//! Pod egress: the nftables table `ip podnet`, whose one rule source-NATs (masquerades) what
//! this node's pods send outside the cluster CIDR, as flannel and Calico do. Pod-to-pod
//! traffic keeps its pod source address. Written through nft's JSON API (the `nftables`
//! crate runs `nft -j`), replaced atomically in one transaction, so a crashed agent's table is
//! replaced rather than doubled.

use std::borrow::Cow;
use std::io::ErrorKind;

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, Prefix};
use nftables::helper::{self, NftablesError};
use nftables::schema::{Chain, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainType, NfFamily, NfHook};

/// The table's name (family `ip`).
pub const TABLE: &str = "podnet";
const CHAIN: &str = "postrouting";
/// `srcnat`: NAT after routing, where the outgoing interface is known.
const SRCNAT: i32 = 100;

/// What to masquerade: sources in `pod_cidr` to destinations outside `cluster_cidr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Masquerade {
    pub pod_cidr: Ipv4Net,
    pub cluster_cidr: Ipv4Net,
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(
        "pod egress (--masquerade, the default) needs nftables, and `nft` was not found: \
         apt-get install nftables, or run with --no-masquerade (pods then reach only the cluster)"
    )]
    NoNft,
    #[error(
        "nft refused the egress table `ip {TABLE}`: {0}. The kernel may lack nf_tables or its \
         NAT support; run with --no-masquerade to go without pod egress"
    )]
    Nft(String),
}

fn nft_error(e: NftablesError) -> EgressError {
    match e {
        NftablesError::NftExecution { inner, .. } if inner.kind() == ErrorKind::NotFound => {
            EgressError::NoNft
        }
        NftablesError::NftFailed { stderr, .. } => EgressError::Nft(stderr.trim().to_string()),
        other => EgressError::Nft(other.to_string()),
    }
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

fn ip_field(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed("ip"),
            field: Cow::Borrowed(field),
        },
    )))
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::IP,
        name: Cow::Borrowed(TABLE),
        ..Table::default()
    }
}

impl Masquerade {
    /// `ip saddr POD_CIDR ip daddr != CLUSTER_CIDR masquerade`
    fn rule(&self) -> Vec<Statement<'static>> {
        vec![
            Statement::Match(Match {
                left: ip_field("saddr"),
                right: prefix(self.pod_cidr.trunc()),
                op: Operator::EQ,
            }),
            Statement::Match(Match {
                left: ip_field("daddr"),
                right: prefix(self.cluster_cidr.trunc()),
                op: Operator::NEQ,
            }),
            Statement::Masquerade(None),
        ]
    }

    /// One transaction: create the table if missing, delete it (with whatever a crashed agent
    /// or an operator left in it), and build it again.
    fn ruleset(&self) -> Nftables<'static> {
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(table()));
        batch.delete(NfListObject::Table(table()));
        batch.add(NfListObject::Table(table()));
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::IP,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(CHAIN),
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Postrouting),
            prio: Some(SRCNAT),
            ..Chain::default()
        }));
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::IP,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Borrowed(CHAIN),
            expr: Cow::Owned(self.rule()),
            comment: Some(Cow::Borrowed("podnet-agent: pod egress")),
            ..Rule::default()
        }));
        batch.to_nftables()
    }

    /// Replaces the table with this node's rule.
    pub fn apply(&self) -> Result<(), EgressError> {
        helper::apply_ruleset(&self.ruleset()).map_err(nft_error)
    }

    /// Whether the table holds this node's rule (and nothing was taken out of it).
    pub fn present(&self) -> Result<bool, EgressError> {
        let listed = match helper::get_current_ruleset_with_args(
            helper::DEFAULT_NFT,
            ["list", "table", "ip", TABLE],
        ) {
            Ok(listed) => listed,
            // No such table.
            Err(NftablesError::NftFailed { .. }) => return Ok(false),
            Err(e) => return Err(nft_error(e)),
        };
        let want = self.rule();
        Ok(listed.objects.iter().any(|o| match o {
            NfObject::ListObject(NfListObject::Rule(r)) => {
                r.chain == CHAIN && r.expr[..] == want[..]
            }
            _ => false,
        }))
    }

    /// Deletes the table, if there is one. Needs no `Masquerade`: the table is this
    /// namespace's agent's, whatever CIDRs it was made for.
    pub fn remove() -> Result<(), EgressError> {
        let mut batch = Batch::new();
        // Adding first makes the delete succeed when there is nothing to delete.
        batch.add(NfListObject::Table(table()));
        batch.delete(NfListObject::Table(table()));
        helper::apply_ruleset(&batch.to_nftables()).map_err(nft_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run};

    #[test]
    fn the_table_is_made_replaced_checked_and_removed() {
        in_netns("egress", || {
            let m = Masquerade {
                pod_cidr: "10.244.3.0/24".parse().unwrap(),
                cluster_cidr: "10.244.0.0/16".parse().unwrap(),
            };
            assert!(!m.present().unwrap());
            m.apply().unwrap();
            assert!(m.present().unwrap());
            // Applied again (a restart): replaced, not doubled.
            m.apply().unwrap();
            let listed = run(&format!("nft list table ip {TABLE}"));
            assert_eq!(listed.matches("masquerade").count(), 1, "{listed}");
            assert!(
                listed.contains("ip saddr 10.244.3.0/24 ip daddr != 10.244.0.0/16"),
                "{listed}"
            );
            // Someone empties the chain: no longer present; the next apply puts it back.
            run(&format!("nft flush chain ip {TABLE} {CHAIN}"));
            assert!(!m.present().unwrap());
            m.apply().unwrap();
            assert!(m.present().unwrap());
            // Another node's rule is not this one's.
            let other = Masquerade {
                pod_cidr: "10.244.4.0/24".parse().unwrap(),
                ..m
            };
            assert!(!other.present().unwrap());
            Masquerade::remove().unwrap();
            assert!(!m.present().unwrap());
            Masquerade::remove().unwrap();
        });
    }

    #[test]
    fn the_rule_is_what_nft_would_print() {
        let m = Masquerade {
            pod_cidr: "10.244.3.0/24".parse().unwrap(),
            cluster_cidr: "10.244.0.0/16".parse().unwrap(),
        };
        let json = serde_json::to_string(&m.ruleset()).unwrap();
        // The shape `nft -j list table ip podnet` prints for
        // `ip saddr 10.244.3.0/24 ip daddr != 10.244.0.0/16 masquerade`.
        for part in [
            r#"{"match":{"left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.244.3.0","len":24}},"op":"=="}}"#,
            r#"{"match":{"left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"10.244.0.0","len":16}},"op":"!="}}"#,
            r#"{"masquerade":null}"#,
            r#""type":"nat","hook":"postrouting","prio":100"#,
            r#"{"delete":{"table":{"family":"ip","name":"podnet""#,
        ] {
            assert!(json.contains(part), "{part} not in {json}");
        }
    }
}
