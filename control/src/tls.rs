//! Control-plane TLS: the cluster CA behind `podnet-control ca`, the service's and the
//! clients' rustls configurations, and who a client certificate speaks for.
//!
//! A node certificate carries the node's name as its common name and DNS SAN, and the
//! organisation [`NODE_ORG`]; an operator certificate the organisation [`OPERATOR_ORG`]. The
//! service lets a node write only its own record and an operator anything; any certificate of
//! the cluster CA may read. rustls checks the chain and the validity dates, x509-parser reads
//! the name and role. The crypto is ring's, through rustls and rcgen: nothing here is our own.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};

/// Organisation of node certificates.
pub const NODE_ORG: &str = "podnet:nodes";
/// Organisation of operator certificates.
pub const OPERATOR_ORG: &str = "podnet:operators";
/// Organisation of the service's certificate.
pub const SERVER_ORG: &str = "podnet:control";

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
    let (cn, org, sans, usage) = match subject {
        Subject::Node(n) => (
            n.clone(),
            NODE_ORG,
            vec![SanType::DnsName(n.as_str().try_into()?)],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        Subject::Operator(n) => (
            n.clone(),
            OPERATOR_ORG,
            vec![SanType::DnsName(n.as_str().try_into()?)],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        Subject::Server { ips, dns } => {
            if ips.is_empty() && dns.is_empty() {
                return Err(TlsError::NoServerNames);
            }
            let mut sans: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
            for d in dns {
                sans.push(SanType::DnsName(d.as_str().try_into()?));
            }
            (
                "podnet-control".to_string(),
                SERVER_ORG,
                sans,
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        }
    };
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    validity(&mut params, days);
    Ok(params)
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

/// ring, which rustls 0.23.48 deprecated for lacking post-quantum key exchange: the control
/// plane's threat is someone on the underlay today, and ring builds without cmake or a C
/// toolchain, which aws-lc-rs (rustls' default) needs. Revisit when ring gains ML-KEM.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Reads a private key, warning when others may read it.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |reason: String| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "private key {} has mode {mode:o}: others on this host can read it; chmod 600 it",
            path.display()
        );
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| err(format!("no PEM private key in it ({e})")))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
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

/// The files a client presents and trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A client configuration trusting `files.ca` and presenting `files.cert` and `files.key`,
/// read again at each handshake after either file changed: a certificate replaced on disk is
/// used from the next connection on, without a restart.
pub fn client_config(files: &ClientFiles) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let resolver = Reloading::new(cert.clone(), key.clone(), provider)?;
            builder.with_client_cert_resolver(Arc::new(resolver))
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(TlsError::Config(
                "give both --tls-cert and --tls-key, or neither".into(),
            ))
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The client certificate, reloaded when its files' modification times change.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Stamp, Arc<CertifiedKey>)>,
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let stamp = stamp(&cert, &key);
        let loaded = load_certified(&cert, &key, &provider)?;
        Ok(Reloading {
            cert,
            key,
            provider,
            current: Mutex::new((stamp, loaded)),
        })
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    (mtime(cert), mtime(key))
}

fn load_certified(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing = provider
        .key_provider
        .load_private_key(read_key(key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", key.display())))?;
    let certified = CertifiedKey::new(read_certs(cert)?, signing);
    certified.keys_match().map_err(|e| {
        TlsError::Config(format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        ))
    })?;
    Ok(Arc::new(certified))
}

impl ResolvesClientCert for Reloading {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let now = stamp(&self.cert, &self.key);
        if now != current.0 {
            match load_certified(&self.cert, &self.key, &self.provider) {
                Ok(loaded) => {
                    tracing::info!(cert = %self.cert.display(), "client certificate reloaded");
                    *current = (now, loaded);
                }
                // Half-way through a rotation (new certificate, old key): keep the old pair
                // and try again at the next connection.
                Err(e) => {
                    tracing::warn!("client certificate not reloaded, keeping the old one: {e}")
                }
            }
        }
        Some(current.1.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The TLS flags of a client of the service (`podnet-agent run`, `podnet-control nodes`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientArgs {
    /// The cluster CA (`ca.pem` of `podnet-control ca init`), for an https:// --control URL.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (`podnet-control ca issue --node NAME`); reread at each new
    /// connection after it changed on disk.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (mode 0600).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The files to use, if TLS was asked for.
    pub fn files(&self) -> Result<Option<ClientFiles>, TlsError> {
        match (&self.tls_ca, &self.tls_cert) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(TlsError::Config(
                "--tls-cert needs --tls-ca (the cluster CA that signed the service's certificate)"
                    .into(),
            )),
            (Some(ca), _) => Ok(Some(ClientFiles {
                ca: ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
            })),
        }
    }
}

/// What to do about a TLS failure, from the words of rustls' error.
pub fn advice(error: &str) -> Option<&'static str> {
    let e = error.to_ascii_lowercase();
    Some(if e.contains("expired") {
        "a certificate has expired: issue a new one with `podnet-control ca issue`"
    } else if e.contains("notvalidyet")
        || e.contains("not valid yet")
        || e.contains("not yet valid")
    {
        "a certificate is not valid yet: check the clocks of both hosts"
    } else if [
        "unknownissuer",
        "unknown issuer",
        "unknownca",
        "badsignature",
    ]
    .iter()
    .any(|w| e.contains(w))
    {
        "the certificate is not signed by the CA the other side trusts: use the cluster's ca.pem \
         (--tls-ca / --client-ca) and certificates it issued"
    } else if e.contains("notvalidforname") || e.contains("not valid for name") {
        "the server certificate does not carry the address in --control: issue it with \
         `podnet-control ca issue --server --ip ADDR`"
    } else if e.contains("certificaterequired") || e.contains("certificate required") {
        "the service requires a client certificate: give --tls-cert and --tls-key"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn tls_failures_come_with_what_to_do() {
        for (error, says) in [
            ("invalid peer certificate: Expired", "issue a new one"),
            (
                "invalid peer certificate: UnknownIssuer",
                "not signed by the CA",
            ),
            (
                "invalid peer certificate: BadSignature",
                "not signed by the CA",
            ),
            ("received fatal alert: UnknownCA", "not signed by the CA"),
            (
                "invalid peer certificate: NotValidForName",
                "--server --ip ADDR",
            ),
            ("invalid peer certificate: NotValidYet", "clocks"),
            ("received fatal alert: CertificateRequired", "--tls-cert"),
        ] {
            let advice = advice(error).unwrap_or_else(|| panic!("no advice for {error}"));
            assert!(advice.contains(says), "{error}: {advice}");
        }
        assert_eq!(advice("connection refused"), None);
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
