//! The client side of control-plane TLS: the rustls configuration an agent or an operator's
//! `podnet-control` dials the service with, the PEM reading the service shares, and advice for
//! a failed handshake. The CA and the service's own configuration are `podnet_control::tls`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// ring, which rustls 0.23.48 deprecated for lacking post-quantum key exchange: the control
/// plane's threat is someone on the underlay today, and ring builds without cmake or a C
/// toolchain, which aws-lc-rs (rustls' default) needs. Revisit when ring gains ML-KEM.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
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

pub fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("{}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
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
    // Global, so a command with subcommands (`podnet-control policy apply`) takes them after
    // its subcommand too, as it does --server.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (`podnet-control ca issue --node NAME`); reread at each new
    /// connection after it changed on disk.
    #[arg(long, global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (mode 0600).
    #[arg(long, global = true, requires = "tls_cert")]
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

/// What went wrong in a TLS handshake, as rustls' error or the peer's alert words it. The
/// podnet API and the etcd connection each turn it into advice that names their own flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Expired,
    NotValidYet,
    /// Signed by a CA the other side does not trust.
    UnknownIssuer,
    /// The server's certificate does not name the address dialled.
    WrongName,
    /// The server wants a client certificate and got none.
    CertificateRequired,
    /// The server refused the client certificate without saying why (Go's `bad certificate`).
    BadCertificate,
}

impl Fault {
    /// The fault `error` (an error chain's text) describes, if it is a TLS one.
    pub fn of(error: &str) -> Option<Fault> {
        let e = error.to_ascii_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| e.contains(w));
        Some(if any(&["expired"]) {
            Fault::Expired
        } else if any(&["notvalidyet", "not valid yet", "not yet valid"]) {
            Fault::NotValidYet
        } else if any(&[
            "unknownissuer",
            "unknown issuer",
            "unknownca",
            "badsignature",
        ]) {
            Fault::UnknownIssuer
        } else if any(&["notvalidforname", "not valid for name"]) {
            Fault::WrongName
        } else if any(&["certificaterequired", "certificate required"]) {
            Fault::CertificateRequired
        } else if any(&["badcertificate", "bad certificate", "certificateunknown"]) {
            Fault::BadCertificate
        } else {
            return None;
        })
    }
}

/// What to do about a TLS failure with the podnet API, from the words of rustls' error.
pub fn advice(error: &str) -> Option<&'static str> {
    Some(match Fault::of(error)? {
        Fault::Expired => {
            "a certificate has expired: issue a new one with `podnet-control ca issue`"
        }
        Fault::NotValidYet => "a certificate is not valid yet: check the clocks of both hosts",
        Fault::UnknownIssuer | Fault::BadCertificate => {
            "the certificate is not signed by the CA the other side trusts: use the cluster's \
             ca.pem (--tls-ca / --client-ca) and certificates it issued"
        }
        Fault::WrongName => {
            "the server certificate does not carry the address in --control: issue it with \
             `podnet-control ca issue --server --ip ADDR`"
        }
        Fault::CertificateRequired => {
            "the service requires a client certificate: give --tls-cert and --tls-key"
        }
    })
}

/// An error with its causes, e.g. "error sending request: ...: Connection refused" (a cause
/// whose words are already in the text is left out).
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
