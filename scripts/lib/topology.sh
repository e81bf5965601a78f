#!/usr/bin/env bash
# The topology of every namespace testbed: its address plan and its etcd cluster, written once.
# scripts/testbed and scripts/bench-control source this file; the Rust harness
# (tests/src/testbed/topology.rs) runs it:
#
#   scripts/lib/topology.sh values                  every TOPO_ value, NAME=VALUE per line
#   scripts/lib/topology.sh etcd-args I DATA TOKEN [PKI]
#       etcd member I's command line, one argument per line (data dir DATA, cluster token
#       TOKEN); with PKI (a `podnet-control ca` directory holding etcd-server.pem) TLS on the
#       client and peer ports, and client certificates required on both
#   scripts/lib/topology.sh etcd-endpoints [https]  the etcd client URLs
#
# Sourcing it defines the TOPO_ values and the topo_ functions and changes nothing else.

# Underlay: host n of subnet s (0, or 1 for the second half of a two-subnet testbed) is
# $TOPO_UNDERLAY.s.n/24; the underlay namespace routes between the subnets from .254.
TOPO_UNDERLAY=198.18
# Static pod CIDR of host n: $TOPO_PODS.n.0/24.
TOPO_PODS=10.244
# podnet-control's port (on host 1's underlay address, or on each replica's).
TOPO_CONTROL_PORT=7800
# The agent's admin API inside each host namespace (DESIGN.md's default).
TOPO_ADMIN_API=127.0.0.1:7801
# The etcd cluster of an HA testbed: member i at .(ETCD_BASE + i) of the first underlay subnet,
# podnet-control replica r at .(REPLICA_BASE + r).
TOPO_ETCD_MEMBERS=3
TOPO_ETCD_BASE=200
TOPO_REPLICA_BASE=210
TOPO_ETCD_CLIENT_PORT=2379
TOPO_ETCD_PEER_PORT=2380
# The "outside" host of the egress checks: on the underlay, no route to any pod CIDR.
TOPO_OUTSIDE_IP=198.18.0.250

topo_static_cidr() { echo "$TOPO_PODS.$1.0/24"; }
topo_etcd_ip() { echo "$TOPO_UNDERLAY.0.$((TOPO_ETCD_BASE + $1))"; }
topo_replica_ip() { echo "$TOPO_UNDERLAY.0.$((TOPO_REPLICA_BASE + $1))"; }

# The etcd client URLs, comma-separated; scheme $1 (http by default).
topo_etcd_endpoints() {
    local scheme=${1:-http} i out=""
    for ((i = 1; i <= TOPO_ETCD_MEMBERS; i++)); do
        out+=${out:+,}$scheme://$(topo_etcd_ip "$i"):$TOPO_ETCD_CLIENT_PORT
    done
    echo "$out"
}

# etcd member $1's command line, one argument per line: data dir $2, cluster token $3, and with
# $4 (a CA directory with etcd-server.pem for every member's address) TLS on both ports.
topo_etcd_args() {
    local i=$1 data=$2 token=$3 pki=${4:-} k cluster="" ip scheme=http
    [[ -z $pki ]] || scheme=https
    for ((k = 1; k <= TOPO_ETCD_MEMBERS; k++)); do
        cluster+=${cluster:+,}e$k=$scheme://$(topo_etcd_ip "$k"):$TOPO_ETCD_PEER_PORT
    done
    ip=$(topo_etcd_ip "$i")
    printf '%s\n' etcd --name "e$i" --data-dir "$data" \
        --listen-client-urls "$scheme://$ip:$TOPO_ETCD_CLIENT_PORT" \
        --advertise-client-urls "$scheme://$ip:$TOPO_ETCD_CLIENT_PORT" \
        --listen-peer-urls "$scheme://$ip:$TOPO_ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "$scheme://$ip:$TOPO_ETCD_PEER_PORT" \
        --initial-cluster "$cluster" --initial-cluster-token "$token" --initial-cluster-state new
    if [[ -n $pki ]]; then
        printf '%s\n' --cert-file "$pki/etcd-server.pem" --key-file "$pki/etcd-server-key.pem" \
            --client-cert-auth --trusted-ca-file "$pki/ca.pem" \
            --peer-cert-file "$pki/etcd-server.pem" --peer-key-file "$pki/etcd-server-key.pem" \
            --peer-client-cert-auth --peer-trusted-ca-file "$pki/ca.pem"
    fi
}

# etcdctl's TLS flags with the CA directory $1 (and the client certificate etcd-client-etcdctl).
topo_etcdctl_tls() {
    printf '%s\n' --cacert "$1/ca.pem" --cert "$1/etcd-client-etcdctl.pem" \
        --key "$1/etcd-client-etcdctl-key.pem"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    case ${1:-} in
    values) set | grep '^TOPO_' ;;
    etcd-args)
        (($# == 4 || $# == 5)) || { echo "topology.sh etcd-args I DATA TOKEN [PKI]" >&2; exit 2; }
        topo_etcd_args "$2" "$3" "$4" "${5:-}"
        ;;
    etcd-endpoints)
        topo_etcd_endpoints "${2:-http}"
        ;;
    *)
        echo "usage: topology.sh values | etcd-args I DATA TOKEN [PKI] | etcd-endpoints [https]" >&2
        exit 2
        ;;
    esac
fi
