//! Control-plane TLS: the cluster CA behind `podnet-control ca`, the service's rustls
//! configuration, and who a client certificate speaks for. The clients' side is
//! `podnet_control_client::tls`, which this module re-exports.
//!
//! A node certificate carries the node's name as its common name and DNS SAN, and the
//! organisation [`NODE_ORG`]; an operator certificate the organisation [`OPERATOR_ORG`]. The
//! service lets a node write only its own record and an operator anything; any certificate of
//! the cluster CA may read. rustls checks the chain and the validity dates, x509-parser reads
//! the name and role. The crypto is ring's, through rustls and rcgen: nothing here is our own.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

pub use podnet_control_client::tls::{advice, client_config, ClientArgs, ClientFiles};
use podnet_control_client::tls::{provider, read_certs, read_key, roots};

/// Organisation of node certificates.
pub const NODE_ORG: &str = "podnet:nodes";
/// Organisation of operator certificates.
pub const OPERATOR_ORG: &str = "podnet:operators";
/// Organisation of the service's certificate.
pub const SERVER_ORG: &str = "podnet:control";
/// Organisation of etcd members' certificates and of replicas' etcd client certificates.
pub const ETCD_ORG: &str = "podnet:etcd";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{0} already exists: `ca init` never overwrites a CA (every certificate it issued would \
         stop working); use another --dir, or remove the old CA yourself"
    )]
    CaExists(PathBuf),
    #[error("no CA in {0}: run `podnet-control ca init --dir {0}` first")]
    NoCa(PathBuf),
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("a server certificate needs at least one --ip or --dns (the addresses clients dial)")]
    NoServerNames,
}

impl From<podnet_control_client::tls::TlsError> for TlsError {
    fn from(e: podnet_control_client::tls::TlsError) -> Self {
        use podnet_control_client::tls::TlsError as Client;
        match e {
            Client::Read { path, reason } => TlsError::Read { path, reason },
            Client::Config(reason) => TlsError::Config(reason),
        }
    }
}

/// What a certificate lets its holder do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Node,
    Operator,
    Server,
    /// Signed by the cluster CA, but with none of podnet's organisations.
    Other,
}

/// Who a verified client certificate names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match self.role {
            Role::Node => "node",
            Role::Operator => "operator",
            Role::Server => "server",
            Role::Other => "unknown-role",
        };
        write!(f, "{role} {}", self.name)
    }
}

/// Reads the name and role out of a certificate the handshake already verified.
pub fn identity(der: &CertificateDer<'_>) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let role = match subject
        .iter_organization()
        .next()
        .and_then(|o| o.as_str().ok())
    {
        Some(NODE_ORG) => Role::Node,
        Some(OPERATOR_ORG) => Role::Operator,
        Some(SERVER_ORG) => Role::Server,
        _ => Role::Other,
    };
    Some(Identity { name, role })
}

/// What `ca issue` makes.
#[derive(Clone, Debug)]
pub enum Subject {
    Node(String),
    Operator(String),
    /// The service: the addresses and names clients dial.
    Server {
        ips: Vec<IpAddr>,
        dns: Vec<String>,
    },
    /// etcd's members, for their client and peer ports: the addresses they serve on. It is a
    /// client certificate too, since members dial each other with it.
    EtcdServer {
        ips: Vec<IpAddr>,
        dns: Vec<String>,
    },
    /// A podnet-control replica's certificate for etcd's `--client-cert-auth`.
    EtcdClient(String),
}

/// Paths of the CA in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca-key.pem"))
}

/// Paths of an issued certificate and its key in `dir`.
pub fn issued_paths(dir: &Path, subject: &Subject) -> (PathBuf, PathBuf) {
    let stem = match subject {
        Subject::Node(n) => format!("node-{n}"),
        Subject::Operator(n) => format!("operator-{n}"),
        Subject::Server { .. } => "server".to_string(),
        Subject::EtcdServer { .. } => "etcd-server".to_string(),
        Subject::EtcdClient(n) => format!("etcd-client-{n}"),
    };
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // Five minutes back, so a host whose clock is a little behind accepts it at once.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Makes a cluster CA in `dir` (`ca.pem`, and `ca-key.pem` with mode 0600). Refuses to
/// replace an existing one.
pub fn ca_init(dir: &Path, days: u32) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_path, key_path) = ca_paths(dir);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(TlsError::CaExists(p.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    // The creation time in the name tells two clusters' CAs apart, so a certificate of the
    // other one fails as "unknown issuer" rather than as a bad signature under a same-named CA.
    let created = time::OffsetDateTime::now_utc().unix_timestamp();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("podnet cluster CA {created}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    // The key first, with create_new: two `ca init` racing cannot both win.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// Issues a certificate signed by the CA in `dir`; replaces an earlier one of the same
/// subject (that is how a certificate is rotated), atomically.
pub fn issue(dir: &Path, subject: &Subject, days: u32) -> Result<(PathBuf, PathBuf), TlsError> {
    let (ca_cert, ca_key) = ca_paths(dir);
    if !ca_cert.exists() || !ca_key.exists() {
        return Err(TlsError::NoCa(dir.to_path_buf()));
    }
    let ca_key = KeyPair::from_pem(&read_text(&ca_key)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read_text(&ca_cert)?, ca_key)?;
    let key = KeyPair::generate()?;
    let params = params_for(subject, days)?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = issued_paths(dir, subject);
    write_replace(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_replace(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok((cert_path, key_path))
}

/// The parameters of a certificate for `subject`, valid from five minutes ago for `days`.
pub fn params_for(subject: &Subject, days: u32) -> Result<CertificateParams, TlsError> {
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let (cn, org, sans, usages) = match subject {
        Subject::Node(n) => (
            n.clone(),
            NODE_ORG,
            dns_sans(std::slice::from_ref(n))?,
            vec![ClientAuth],
        ),
        Subject::Operator(n) => (
            n.clone(),
            OPERATOR_ORG,
            dns_sans(std::slice::from_ref(n))?,
            vec![ClientAuth],
        ),
        Subject::EtcdClient(n) => (
            n.clone(),
            ETCD_ORG,
            dns_sans(std::slice::from_ref(n))?,
            vec![ClientAuth],
        ),
        Subject::Server { ips, dns } => (
            "podnet-control".to_string(),
            SERVER_ORG,
            server_sans(ips, dns)?,
            vec![ServerAuth],
        ),
        Subject::EtcdServer { ips, dns } => (
            "etcd".to_string(),
            ETCD_ORG,
            server_sans(ips, dns)?,
            vec![ServerAuth, ClientAuth],
        ),
    };
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    validity(&mut params, days);
    Ok(params)
}

fn dns_sans(names: &[String]) -> Result<Vec<SanType>, TlsError> {
    names
        .iter()
        .map(|n| Ok(SanType::DnsName(n.as_str().try_into()?)))
        .collect()
}

/// A server certificate's names: the addresses and DNS names its clients dial.
fn server_sans(ips: &[IpAddr], dns: &[String]) -> Result<Vec<SanType>, TlsError> {
    if ips.is_empty() && dns.is_empty() {
        return Err(TlsError::NoServerNames);
    }
    let mut sans: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    sans.extend(dns_sans(dns)?);
    Ok(sans)
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)
}

/// Writes `path` through a temporary file and a rename, so a reader (an agent reconnecting)
/// sees the old file or the new one, never half of one.
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, data, mode)?;
    fs::rename(&tmp, path).map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The service's TLS configuration: its certificate, and client certificates checked against
/// `client_ca` when presented. A client without one still completes the handshake, so it can
/// be told in HTTP what it lacks (401), and can read with a bearer token when one is set.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert)?, read_key(key)?)
        .map_err(|e| TlsError::Config(format!("{} and {}: {e}", cert.display(), key.display())))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn ca_init_writes_a_private_key_and_never_overwrites() {
        let d = dir();
        let (cert, key) = ca_init(d.path(), 30).unwrap();
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let before = fs::read(&cert).unwrap();
        let e = ca_init(d.path(), 30).unwrap_err();
        assert!(matches!(e, TlsError::CaExists(_)), "{e}");
        assert!(e.to_string().contains("never overwrites"), "{e}");
        assert_eq!(fs::read(&cert).unwrap(), before);
    }

    #[test]
    fn issued_certificates_name_their_holder_and_role() {
        let d = dir();
        ca_init(d.path(), 30).unwrap();
        for (subject, want) in [
            (Subject::Node("h2".into()), Some(("h2", Role::Node))),
            (
                Subject::Operator("alice".into()),
                Some(("alice", Role::Operator)),
            ),
            (
                Subject::Server {
                    ips: vec!["198.18.0.1".parse().unwrap()],
                    dns: vec![],
                },
                Some(("podnet-control", Role::Server)),
            ),
        ] {
            let (cert, key) = issue(d.path(), &subject, 30).unwrap();
            assert_eq!(
                fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let der = read_certs(&cert).unwrap().remove(0);
            let id = identity(&der).unwrap();
            let (name, role) = want.unwrap();
            assert_eq!((id.name.as_str(), id.role), (name, role));
        }
    }

    #[test]
    fn issuing_without_a_ca_says_how_to_make_one() {
        let d = dir();
        let e = issue(d.path(), &Subject::Node("h1".into()), 30).unwrap_err();
        assert!(e.to_string().contains("ca init --dir"), "{e}");
        let e = ca_init(d.path(), 30)
            .and_then(|_| {
                issue(
                    d.path(),
                    &Subject::Server {
                        ips: vec![],
                        dns: vec![],
                    },
                    30,
                )
            })
            .unwrap_err();
        assert!(matches!(e, TlsError::NoServerNames), "{e}");
    }

    #[test]
    fn configurations_load_and_a_mismatched_key_is_refused() {
        let d = dir();
        let (ca, _) = ca_init(d.path(), 30).unwrap();
        let server = Subject::Server {
            ips: vec!["198.18.0.1".parse().unwrap()],
            dns: vec![],
        };
        let (scert, skey) = issue(d.path(), &server, 30).unwrap();
        server_config(&scert, &skey, &ca).unwrap();
        let (ncert, _) = issue(d.path(), &Subject::Node("h1".into()), 30).unwrap();
        let files = ClientFiles {
            ca: ca.clone(),
            cert: Some(ncert.clone()),
            key: Some(skey.clone()),
        };
        let e = client_config(&files).unwrap_err();
        assert!(e.to_string().contains("does not belong to"), "{e}");
        let e = server_config(&scert, &d.path().join("missing.pem"), &ca).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
