//! `podnet-control`: run the control service (`serve`), show its node table (`nodes`), manage
//! network policy (`policy apply|delete|list`, `pods`, `pod label`, `namespace label`), or
//! manage the cluster CA (`ca init|issue`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ipnet::{Ipv4Net, Ipv6Net};
use podnet_control::api::{Node, NodeList};
use podnet_control::client::read_token_file;
use podnet_control::clock::now_ms;
use podnet_control::copy::{self, EtcdAccess, Place};
use podnet_control::documents::read_policies;
use podnet_control::etcd_tls::EtcdTls;
use podnet_control::server::{DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_WATCHERS};
use podnet_control::tls::{self, ClientArgs, Subject};
use podnet_control::{Client, Etcd, FileStore, Server, ServerConfig};
use podnet_proto::policy::{Direction, LabelChange, Labels, PolicyState};

#[derive(Parser)]
#[command(
    name = "podnet-control",
    version,
    about = "podnet control service: pod CIDRs and the node table"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control service.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7800")]
        listen: SocketAddr,
        /// The whole pod network, cut into one block per node (the first block is reserved).
        #[arg(long, default_value = "10.244.0.0/16")]
        cluster_cidr: Ipv4Net,
        /// Prefix length of each node's pod CIDR.
        #[arg(long, default_value_t = 24)]
        node_prefix: u8,
        /// The IPv6 pod network of a dual-stack cluster: every node also gets one block of it,
        /// the one with its IPv4 block's index (without it the cluster is IPv4-only).
        #[arg(long)]
        cluster_cidr_v6: Option<Ipv6Net>,
        /// Prefix length of each node's IPv6 pod CIDR (with --cluster-cidr-v6).
        #[arg(long, default_value_t = 64, requires = "cluster_cidr_v6")]
        node_prefix_v6: u8,
        /// Where the node table is kept: `file` (one process, --state) or `etcd` (any number
        /// of replicas over --etcd-endpoints).
        #[arg(long, value_enum, default_value_t = StoreKind::File)]
        store: StoreKind,
        /// State file of the file store (written atomically; refuses to start over a corrupt one).
        #[arg(long, default_value = "/var/lib/podnet/control-state.json")]
        state: PathBuf,
        /// etcd client URLs, comma-separated (with --store etcd).
        #[arg(long, value_delimiter = ',', required_if_eq("store", "etcd"))]
        etcd_endpoints: Vec<String>,
        /// Key prefix of this cluster in etcd (with --store etcd).
        #[arg(long, default_value = "/podnet")]
        etcd_prefix: String,
        #[command(flatten)]
        etcd_tls: EtcdTlsFlags,
        /// A node that does not renew within this is marked down and withdrawn.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        /// How long a down node's pod CIDR stays reserved for its name.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        reclaim_after: Duration,
        /// Require `Authorization: Bearer <token>` with the token in this file (except /healthz).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Open watch streams at most; every agent keeps one, so this bounds the cluster size.
        /// More are refused with 503 until one closes.
        #[arg(long, default_value_t = DEFAULT_MAX_WATCHERS, value_parser = limit_parser())]
        max_watchers: usize,
        /// Open connections at most (every agent keeps one or two); more are answered 503 and
        /// closed. The open-file limit is raised to fit at start.
        #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = limit_parser())]
        max_connections: usize,
        #[command(flatten)]
        tls: ServeTls,
    },
    /// Print the node table.
    Nodes {
        #[command(flatten)]
        conn: Connection,
    },
    /// Network policies (Kubernetes networking.k8s.io/v1 NetworkPolicy): apply, delete, list.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Print the pods the nodes registered, with their addresses and labels.
    Pods {
        #[command(flatten)]
        conn: Connection,
    },
    /// Change a pod's labels.
    Pod {
        #[command(subcommand)]
        command: LabelCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// Change a namespace's labels.
    Namespace {
        #[command(subcommand)]
        command: LabelCommand,
        #[command(flatten)]
        conn: Connection,
    },
    /// The cluster CA: make it, and issue node, operator and server certificates.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Copy a cluster's whole state between stores (file:PATH, etcd:URL,...), with every
    /// node's pod CIDR: grow from the file store to etcd, back up, restore.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy everything from one store into another that holds no cluster. Stop the services
    /// of both first. Into etcd it is resumable: run again after a failure, it finishes.
    Migrate {
        #[arg(long, value_name = "file:PATH|etcd:URL,...")]
        from: Place,
        #[arg(long, value_name = "file:PATH|etcd:URL,...")]
        to: Place,
        /// Keys per etcd transaction (etcd takes at most 128 operations in one).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=96))]
        batch: u16,
    },
    /// Print a store's whole state as a JSON snapshot (the file store's format).
    Dump {
        #[arg(long, value_name = "file:PATH|etcd:URL,...")]
        from: Place,
    },
    /// Write a JSON snapshot (from `store dump`) into a store that holds no cluster.
    Restore {
        #[arg(long, value_name = "file:PATH|etcd:URL,...")]
        to: Place,
        /// The snapshot, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=96))]
        batch: u16,
    },
}

/// How `store` reaches an etcd place.
#[derive(clap::Args)]
struct EtcdFlags {
    /// Key prefix of the cluster in etcd.
    #[arg(long, global = true, default_value = "/podnet")]
    etcd_prefix: String,
    #[command(flatten)]
    tls: EtcdTlsFlags,
}

impl EtcdFlags {
    fn access(self) -> EtcdAccess {
        EtcdAccess {
            prefix: self.etcd_prefix,
            tls: self.tls.files(),
        }
    }
}

/// How `serve` and `store` reach etcd over TLS.
#[derive(clap::Args)]
struct EtcdTlsFlags {
    /// The CA that signed etcd's certificate, for https:// etcd endpoints.
    #[arg(long, global = true)]
    etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd's --client-cert-auth (`ca issue --etcd-client NAME`).
    /// Read again when a call fails, so a replaced one is used at the next reconnect.
    #[arg(long, global = true, requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (mode 0600).
    #[arg(long, global = true, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl EtcdTlsFlags {
    fn files(self) -> Option<EtcdTls> {
        self.etcd_ca.map(|ca| EtcdTls {
            ca,
            client: self.etcd_cert.zip(self.etcd_key),
        })
    }
}

async fn store(command: StoreCommand, etcd: EtcdAccess) -> Result<(), CliError> {
    match command {
        StoreCommand::Migrate { from, to, batch } => {
            if from == to {
                return Err(CliError::Usage("--from and --to are the same store".into()));
            }
            let state = copy::read(&from, &etcd).await?;
            let said = copy::write(&to, &state, &etcd, usize::from(batch)).await?;
            println!("{said}");
        }
        StoreCommand::Dump { from } => {
            let state = copy::read(&from, &etcd).await?;
            let text = serde_json::to_string_pretty(&state).expect("states serialize");
            println!("{text}");
        }
        StoreCommand::Restore { to, file, batch } => {
            let text = read_input(&file)?;
            let state: podnet_control::state::StoredState =
                serde_json::from_str(&text).map_err(|e| {
                    CliError::Usage(format!(
                        "{}: not a snapshot from `store dump` ({e}); nothing written",
                        file.display()
                    ))
                })?;
            let said = copy::write(&to, &state, &etcd, usize::from(batch)).await?;
            println!("{said}");
        }
    }
    Ok(())
}

/// How a command reaches the control service.
#[derive(clap::Args)]
struct Connection {
    /// Control service URL.
    #[arg(
        long,
        global = true,
        env = "PODNET_CONTROL_URL",
        default_value = "http://127.0.0.1:7800"
    )]
    server: String,
    /// Bearer token file.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: ClientArgs,
}

impl Connection {
    fn client(&self) -> Result<Client, CliError> {
        let token = self
            .token_file
            .as_deref()
            .map(read_token_file)
            .transpose()?;
        let files = self.tls.files().map_err(tls::TlsError::from)?;
        Ok(Client::with_tls(&self.server, token, files.as_ref())?)
    }
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Create or replace the policies in FILE (YAML or JSON; several documents, or a List),
    /// all or none: one invalid document changes nothing.
    Apply {
        /// The file, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete policy NS/NAME.
    Delete {
        #[arg(value_name = "NS/NAME")]
        policy: String,
    },
    /// List the policies.
    List,
}

#[derive(Subcommand)]
enum LabelCommand {
    /// Set labels (key=value) and remove them (key-), as `kubectl label` does.
    Label {
        /// The pod (NS/NAME) or the namespace (NS).
        target: String,
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        labels: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    File,
    Etcd,
}

#[derive(clap::Args)]
struct ServeTls {
    /// The service's certificate (`ca issue --server --ip ADDR`).
    #[arg(long, requires_all = ["tls_key", "client_ca"])]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (mode 0600).
    #[arg(long, requires_all = ["tls_cert", "client_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA whose certificates clients present (mTLS): a node may then write only its own
    /// record, an operator any.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    client_ca: Option<PathBuf>,
    /// Serve plain HTTP: anyone who reaches the port can register nodes and read the topology.
    /// For tests and trusted networks only; logged as a warning and exported as
    /// podnet_control_insecure.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "client_ca"])]
    insecure: bool,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a cluster CA in DIR (ca.pem, ca-key.pem); never overwrites one.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate signed by the CA in DIR (replacing an earlier one of the same
    /// subject: that is a rotation).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// A node certificate for NAME (node-NAME.pem): it may register, renew and delete
        /// node NAME only.
        #[arg(long, group = "subject")]
        node: Option<String>,
        /// An operator certificate (operator-NAME.pem): may delete any node and read all.
        #[arg(long, group = "subject")]
        operator: Option<String>,
        /// The service's certificate (server.pem), for the addresses in --ip and --dns.
        #[arg(long, group = "subject")]
        server: bool,
        /// etcd's members' certificate (etcd-server.pem), for the addresses in --ip and --dns:
        /// their client and peer ports (etcd's --cert-file and --peer-cert-file).
        #[arg(long, group = "subject")]
        etcd_server: bool,
        /// A replica's client certificate for etcd's --client-cert-auth
        /// (etcd-client-NAME.pem; podnet-control serve --etcd-cert).
        #[arg(long, group = "subject", value_name = "NAME")]
        etcd_client: Option<String>,
        /// An address clients dial (with --server or --etcd-server; repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// A DNS name clients dial (with --server or --etcd-server; repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Server(#[from] podnet_control::ServerError),
    #[error(transparent)]
    Client(#[from] podnet_control::ClientError),
    #[error(transparent)]
    Store(#[from] podnet_control::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Tls(#[from] podnet_control::tls::TlsError),
    #[error(transparent)]
    Copy(#[from] podnet_control::copy::CopyError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "serve needs --tls-cert, --tls-key and --client-ca (make them with `podnet-control ca \
         init --dir D` and `ca issue --dir D --server --ip ADDR`), or --insecure to serve \
         plain HTTP that anyone on the network can use"
    )]
    NoTls,
}

fn ca(command: CaCommand) -> Result<(), CliError> {
    let (cert, key) = match command {
        CaCommand::Init { dir, days } => tls::ca_init(&dir, days)?,
        CaCommand::Issue {
            dir,
            node,
            operator,
            server,
            etcd_server,
            etcd_client,
            ip,
            dns,
            days,
        } => {
            let names = !(ip.is_empty() && dns.is_empty());
            if names && !server && !etcd_server {
                return Err(tls::TlsError::Config(
                    "--ip and --dns name a server: give them with --server or --etcd-server".into(),
                )
                .into());
            }
            let subject = if let Some(n) = node {
                podnet_control::api::validate_node_name(&n)
                    .map_err(|e| tls::TlsError::Config(format!("--node {n:?}: {e}")))?;
                Subject::Node(n)
            } else if let Some(o) = operator {
                Subject::Operator(o)
            } else if let Some(c) = etcd_client {
                podnet_control::api::validate_node_name(&c)
                    .map_err(|e| tls::TlsError::Config(format!("--etcd-client {c:?}: {e}")))?;
                Subject::EtcdClient(c)
            } else if server {
                Subject::Server { ips: ip, dns }
            } else if etcd_server {
                Subject::EtcdServer { ips: ip, dns }
            } else {
                return Err(tls::TlsError::Config(
                    "say what to issue: --node NAME, --operator NAME, --server --ip ADDR, \
                     --etcd-server --ip ADDR or --etcd-client NAME"
                        .into(),
                )
                .into());
            };
            tls::issue(&dir, &subject, days)?
        }
    };
    println!("{}\n{}", cert.display(), key.display());
    Ok(())
}

/// The contents of `file`, or of standard input for `-`.
fn read_input(file: &std::path::Path) -> Result<String, CliError> {
    if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|source| CliError::ReadFile {
        path: file.to_path_buf(),
        source,
    })
}

/// `NS/NAME` split in two.
fn split_key<'a>(key: &'a str, what: &str) -> Result<(&'a str, &'a str), CliError> {
    key.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{key:?}: name the {what} as NAMESPACE/NAME (default/{key} for the default namespace)"
            ))
        })
}

async fn policy(command: PolicyCommand, client: &Client) -> Result<(), CliError> {
    match command {
        PolicyCommand::Apply { file } => {
            let text = read_input(&file)?;
            let batch = read_policies(&text).map_err(|e| {
                CliError::Usage(format!("{}: {e}; nothing applied", file.display()))
            })?;
            let answer = client.apply_policies(&batch).await?;
            for p in answer["policies"].as_array().into_iter().flatten() {
                let (name, result) = (p["policy"].as_str(), p["result"].as_str());
                println!(
                    "networkpolicy {} {}",
                    name.unwrap_or("?"),
                    result.unwrap_or("?")
                );
            }
        }
        PolicyCommand::Delete { policy } => {
            let (ns, name) = split_key(&policy, "policy")?;
            client.delete_policy(ns, name).await?;
            println!("networkpolicy {policy} deleted");
        }
        PolicyCommand::List => print!("{}", render_policies(&client.policy(None).await?)),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(CliError::Runtime(e)),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                tls,
                listen,
                cluster_cidr,
                node_prefix,
                cluster_cidr_v6,
                node_prefix_v6,
                store,
                state,
                etcd_endpoints,
                etcd_prefix,
                etcd_tls,
                lease_ttl,
                reclaim_after,
                token_file,
                max_watchers,
                max_connections,
            } => {
                let token = token_file.as_deref().map(read_token_file).transpose()?;
                let tls = match (tls.tls_cert, tls.tls_key, tls.client_ca, tls.insecure) {
                    (Some(cert), Some(key), Some(ca), false) => {
                        Some(tls::server_config(&cert, &key, &ca)?)
                    }
                    (None, None, None, true) => None,
                    _ => return Err(CliError::NoTls),
                };
                let config = ServerConfig {
                    tls,
                    cluster_cidr,
                    node_prefix,
                    cluster_cidr_v6,
                    node_prefix_v6,
                    lease_ttl,
                    reclaim_after,
                    token,
                    max_watchers,
                    max_connections,
                    ..ServerConfig::default()
                };
                let store = match store {
                    StoreKind::File => Backing::File(state),
                    StoreKind::Etcd => Backing::Etcd {
                        endpoints: etcd_endpoints,
                        prefix: etcd_prefix,
                        tls: etcd_tls.files(),
                    },
                };
                serve(listen, config, store).await
            }
            Command::Nodes { conn } => {
                let list = conn.client()?.list().await?;
                print!("{}", render_table(&list, now_ms()));
                Ok(())
            }
            Command::Policy { command, conn } => policy(command, &conn.client()?).await,
            Command::Pods { conn } => {
                let state = conn.client()?.policy(None).await?;
                print!("{}", render_pods(&state));
                Ok(())
            }
            Command::Pod {
                command: LabelCommand::Label { target, labels },
                conn,
            } => {
                let (ns, name) = split_key(&target, "pod")?;
                let change = LabelChange::parse(&labels).map_err(CliError::Usage)?;
                let answer = conn.client()?.label_pod(ns, name, &change).await?;
                println!(
                    "pod {target} {}",
                    answer["result"].as_str().unwrap_or("labeled")
                );
                Ok(())
            }
            Command::Namespace {
                command: LabelCommand::Label { target, labels },
                conn,
            } => {
                let change = LabelChange::parse(&labels).map_err(CliError::Usage)?;
                let answer = conn.client()?.label_namespace(&target, &change).await?;
                println!(
                    "namespace {target} {}",
                    answer["result"].as_str().unwrap_or("labeled")
                );
                Ok(())
            }
            Command::Ca { command } => ca(command),
            Command::Store { command, etcd } => store(command, etcd.access()).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: CliError) -> ExitCode {
    eprintln!("podnet-control: error: {e}");
    ExitCode::FAILURE
}

/// Where `serve` keeps the node table.
enum Backing {
    File(PathBuf),
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        tls: Option<EtcdTls>,
    },
}

async fn serve(listen: SocketAddr, config: ServerConfig, store: Backing) -> Result<(), CliError> {
    let cluster = config.cluster_cidr;
    let tls = config.tls.is_some();
    fit_open_file_limit(config.max_connections);
    let (server, state) = match store {
        Backing::File(state) => {
            if let Some(dir) = state.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| CliError::StateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            let store = FileStore::new(&state).lock()?;
            let server = Server::open(config, Arc::new(store)).await?;
            (server, state.display().to_string())
        }
        Backing::Etcd {
            endpoints,
            prefix,
            tls,
        } => {
            let etcd = Etcd::connect(&endpoints, &prefix, config.lease_ttl, tls)
                .await
                .map_err(podnet_control::ServerError::from)?;
            let server = Server::open_etcd(config, etcd).await?;
            (server, format!("etcd {} {prefix}", endpoints.join(",")))
        }
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| CliError::Listen {
            addr: listen,
            source,
        })?;
    let listen = listener.local_addr().unwrap_or(listen);
    if tls {
        tracing::info!(%listen, %cluster, %state, "podnet-control serving (mTLS)");
    } else {
        tracing::warn!(%listen, %cluster, %state,
            "podnet-control serving plain HTTP (--insecure): anyone who reaches {listen} can \
             register nodes and read the topology");
    }
    server.run(listener, shutdown_signal()).await?;
    tracing::info!("podnet-control stopped");
    Ok(())
}

/// `--max-watchers` and `--max-connections`: 1 to a million.
fn limit_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..=1_000_000)
}

/// Descriptors the service holds besides its connections: the listener, the state file and
/// its lock, the runtime's own, standard streams.
const SPARE_FDS: u64 = 64;

/// Raises the open-file limit so `max_connections` connections fit (a common default soft
/// limit is 1024, which would make `accept` fail long before the connection limit answers);
/// warns when that is not allowed.
fn fit_open_file_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = max_connections as u64 + SPARE_FDS;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    // Root may raise the hard limit too; anyone may raise the soft one up to the hard one.
    let now = if setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_ok() {
        want
    } else if setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).is_ok() {
        want.min(hard)
    } else {
        soft
    };
    if now >= want {
        tracing::info!(
            from = soft,
            to = now,
            "raised the open-file limit for --max-connections"
        );
    } else {
        tracing::warn!(
            open_file_limit = now,
            max_connections,
            "the open-file limit is below --max-connections + {SPARE_FDS}: connections past it \
             fail at accept; raise the hard limit (`ulimit -Hn`, LimitNOFILE=) or lower \
             --max-connections"
        );
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM, shutting down"),
    }
}

/// The `nodes` table: one row per node, columns padded to the widest cell. Heartbeat ages are
/// told on the service's clock when it sent it, else on ours (`local_now`).
fn render_table(list: &NodeList, local_now: u64) -> String {
    let now = list.server_time_ms.unwrap_or(local_now);
    let header = [
        "NAME",
        "UNDERLAY IP",
        "POD CIDR",
        "ENCAP",
        "STATE",
        "LAST HEARTBEAT",
    ];
    let rows: Vec<[String; 6]> = list
        .nodes
        .iter()
        .map(|n: &Node| {
            [
                n.name.clone(),
                n.underlay_ip.to_string(),
                n.pod_cidr.to_string(),
                n.encap.to_string(),
                n.state.to_string(),
                age(now.saturating_sub(n.last_heartbeat)),
            ]
        })
        .collect();
    if list.nodes.iter().all(|n| n.pod_cidr_v6.is_none()) {
        return table(header, &rows);
    }
    // Dual-stack: the IPv6 pod CIDR last, so the columns before keep their places.
    let v6 = |n: &Node| {
        n.pod_cidr_v6
            .map_or_else(|| "-".to_string(), |c| c.to_string())
    };
    let [a, b, c, d, e, f] = header;
    let rows: Vec<[String; 7]> = rows
        .into_iter()
        .zip(&list.nodes)
        .map(|([a, b, c, d, e, f], n)| [a, b, c, d, e, f, v6(n)])
        .collect();
    table([a, b, c, d, e, f, "POD CIDR V6"], &rows)
}

/// Rows of cells as an aligned table, the header first.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let mut text = String::new();
        for (cell, w) in cells.iter().zip(widths) {
            text.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

/// `k=v,k=v`, or `<none>` as kubectl writes an empty set.
fn labels_cell(labels: &Labels) -> String {
    if labels.is_empty() {
        return "<none>".into();
    }
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(",")
}

/// The `pods` table.
fn render_pods(state: &PolicyState) -> String {
    let rows: Vec<[String; 5]> = state
        .pods
        .values()
        .map(|p| {
            let ips: Vec<String> = p.ips.iter().map(|ip| ip.to_string()).collect();
            [
                p.namespace.clone(),
                p.name.clone(),
                p.node.clone(),
                ips.join(","),
                labels_cell(&p.labels),
            ]
        })
        .collect();
    table(["NAMESPACE", "NAME", "NODE", "IPS", "LABELS"], &rows)
}

/// The `policy list` table: what each policy selects and which directions it isolates.
fn render_policies(state: &PolicyState) -> String {
    let rows: Vec<[String; 4]> = state
        .policies
        .values()
        .map(|p| {
            let selector = &p.spec.pod_selector;
            let mut select = vec![labels_cell(&selector.match_labels)];
            select.extend(
                selector
                    .match_expressions
                    .iter()
                    .map(|r| format!("{} {} ({})", r.key, r.operator, r.values.join(","))),
            );
            if selector.is_empty() {
                select = vec!["<all>".into()];
            } else if selector.match_labels.is_empty() {
                select.remove(0);
            }
            let types: Vec<&str> = [Direction::Ingress, Direction::Egress]
                .into_iter()
                .filter(|d| p.applies_to(*d))
                .map(|d| d.name())
                .collect();
            [
                p.namespace().to_string(),
                p.metadata.name.clone(),
                select.join(","),
                types.join(","),
            ]
        })
        .collect();
    table(["NAMESPACE", "NAME", "POD-SELECTOR", "ISOLATES"], &rows)
}

/// "850ms ago", "12s ago", "3m ago", "5h ago", "2d ago".
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match () {
        _ if ms < 1000 => format!("{ms}ms ago"),
        _ if s < 120 => format!("{s}s ago"),
        _ if s < 7200 => format!("{}m ago", s / 60),
        _ if s < 172_800 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_control::api::{Encap, NodeState};

    /// The connection flags go before or after a subcommand alike.
    #[test]
    fn connection_flags_follow_subcommands() {
        let tls = [
            "--server",
            "https://198.18.0.1:7800",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "op.pem",
            "--tls-key",
            "op-key.pem",
        ];
        for head in [
            &["policy", "apply", "-f", "p.yaml"][..],
            &["policy", "delete", "x/p"],
            &["policy", "list"],
            &["pod", "label", "x/a", "k=v"],
            &["namespace", "label", "x", "k=v"],
        ] {
            let argv = ["podnet-control"].iter().chain(head).chain(&tls);
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{head:?}: {e}"));
            let conn = match cli.command {
                Command::Policy { conn, .. }
                | Command::Pod { conn, .. }
                | Command::Namespace { conn, .. } => conn,
                _ => unreachable!(),
            };
            assert_eq!(conn.server, "https://198.18.0.1:7800");
            assert_eq!(conn.tls.tls_ca, Some(PathBuf::from("ca.pem")), "{head:?}");
            assert_eq!(
                conn.tls.tls_key,
                Some(PathBuf::from("op-key.pem")),
                "{head:?}"
            );
        }
    }

    #[test]
    fn table_is_aligned_and_readable() {
        let node = |name: &str, ip: &str, cidr: &str, state, hb| Node {
            wireguard_public_key: None,
            name: name.into(),
            underlay_ip: ip.parse().unwrap(),
            encap: Encap::Vxlan,
            vtep_mac: "02:00:c6:12:00:01".parse().unwrap(),
            pod_cidr: cidr.parse().unwrap(),
            pod_cidr_v6: None,
            state,
            last_heartbeat: hb,
            revision: 1,
        };
        let mut list = NodeList {
            server_time_ms: None,
            revision: 3,
            nodes: vec![
                node("h1", "198.18.0.1", "10.244.1.0/24", NodeState::Up, 97_000),
                node(
                    "worker-long",
                    "198.18.0.12",
                    "10.244.2.0/24",
                    NodeState::Down,
                    0,
                ),
            ],
        };
        let text = render_table(&list, 100_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME         UNDERLAY IP  POD CIDR       ENCAP  STATE  LAST HEARTBEAT",
                "h1           198.18.0.1   10.244.1.0/24  vxlan  up     3s ago",
                "worker-long  198.18.0.12  10.244.2.0/24  vxlan  down   100s ago",
            ]
        );
        // The service's clock wins over a local one that is an hour off.
        list.server_time_ms = Some(99_000);
        let text = render_table(&list, 100_000 + 3_600_000);
        assert!(text.lines().nth(1).unwrap().ends_with(" 2s ago"), "{text}");
        // Dual-stack: the IPv6 pod CIDR is the last column, so the others keep their places.
        list.nodes[0].pod_cidr_v6 = Some("fd00:10:244:1::/64".parse().unwrap());
        let text = render_table(&list, 0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME         UNDERLAY IP  POD CIDR       ENCAP  STATE  LAST HEARTBEAT  POD CIDR V6",
                "h1           198.18.0.1   10.244.1.0/24  vxlan  up     2s ago          fd00:10:244:1::/64",
                "worker-long  198.18.0.12  10.244.2.0/24  vxlan  down   99s ago         -",
            ]
        );
    }

    #[test]
    fn the_v6_node_prefix_needs_the_v6_cluster_cidr() {
        let serve = |extra: &[&str]| {
            let argv = ["podnet-control", "serve", "--insecure"]
                .iter()
                .chain(extra);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Command::Serve {
                    cluster_cidr_v6,
                    node_prefix_v6,
                    ..
                } => (cluster_cidr_v6.map(|c| c.to_string()), node_prefix_v6),
                _ => unreachable!(),
            })
        };
        assert_eq!(serve(&[]).unwrap(), (None, 64));
        assert_eq!(
            serve(&["--cluster-cidr-v6", "fd00:10:244::/56"]).unwrap(),
            (Some("fd00:10:244::/56".to_string()), 64)
        );
        let err = serve(&["--node-prefix-v6", "80"]).unwrap_err().to_string();
        assert!(err.contains("--cluster-cidr-v6"), "{err}");
        assert!(serve(&["--cluster-cidr-v6", "10.0.0.0/8"]).is_err());
    }

    #[test]
    fn ages() {
        assert_eq!(age(850), "850ms ago");
        assert_eq!(age(61_000), "61s ago");
        assert_eq!(age(600_000), "10m ago");
        assert_eq!(age(3 * 3_600_000), "3h ago");
        assert_eq!(age(3 * 86_400_000), "3d ago");
    }
}
