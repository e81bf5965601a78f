//! TLS to etcd: the files `--etcd-ca`, `--etcd-cert` and `--etcd-key` name, checked before the
//! first call and read again whenever a call fails, so a certificate replaced on disk is used
//! at the next reconnect; and advice for a failed handshake in terms of those flags.
//!
//! The handshake is tonic's rustls on ring, as for the rest of podnet; the checks here only
//! turn what a mistake looks like into what to do about it.

use std::path::{Path, PathBuf};

use etcd_client::{Certificate, Identity, TlsOptions};
use podnet_control_client::tls::{read_certs, read_key, Fault};

/// The TLS files of the etcd connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificate (etcd's `--cert-file`).
    pub ca: PathBuf,
    /// A client certificate and its key, for etcd's `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// What the files held when they were read.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    ca: Vec<u8>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// Reads and checks the files: PEM that parses, and a client certificate valid now.
    pub fn read(&self) -> Result<Material, String> {
        read_certs(&self.ca).map_err(|e| format!("--etcd-ca: {e}"))?;
        let client = match &self.client {
            None => None,
            Some((cert, key)) => {
                let certs = read_certs(cert).map_err(|e| format!("--etcd-cert: {e}"))?;
                read_key(key).map_err(|e| format!("--etcd-key: {e}"))?;
                check_validity(cert, &certs[0])?;
                Some((bytes(cert)?, bytes(key)?))
            }
        };
        Ok(Material {
            ca: bytes(&self.ca)?,
            client,
        })
    }
}

impl Material {
    /// tonic's TLS settings for these files; the server name is each endpoint's host.
    pub fn options(&self) -> TlsOptions {
        let options = TlsOptions::new().ca_certificate(Certificate::from_pem(&self.ca));
        match &self.client {
            Some((cert, key)) => options.identity(Identity::from_pem(cert, key)),
            None => options,
        }
    }
}

fn bytes(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A client certificate out of its dates is refused here, with its dates, rather than by etcd
/// with a bare "bad certificate".
fn check_validity(path: &Path, der: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("--etcd-cert {}: not a certificate: {e}", path.display()))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(format!(
            "--etcd-cert {} expired on {}: issue a new one with `podnet-control ca issue \
             --etcd-client NAME` (the replica reads it again at its next reconnect)",
            path.display(),
            validity.not_after
        ));
    }
    if now < validity.not_before {
        return Err(format!(
            "--etcd-cert {} is valid only from {}: check this host's clock",
            path.display(),
            validity.not_before
        ));
    }
    Ok(())
}

/// Refuses endpoints and flags that do not go together: all endpoints `https://` with
/// `--etcd-ca`, or all `http://` without any `--etcd-*` file.
pub fn check_endpoints(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<(), String> {
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    if https != 0 && https != endpoints.len() {
        return Err(format!(
            "{} mixes http:// and https:// endpoints: every member of one etcd cluster serves \
             its clients the same way",
            endpoints.join(",")
        ));
    }
    match (https != 0, tls) {
        (true, None) => Err(
            "https:// endpoints need --etcd-ca (the CA that signed etcd's certificate), and \
             --etcd-cert and --etcd-key when etcd runs with --client-cert-auth"
                .to_string(),
        ),
        (false, Some(_)) => Err(
            "--etcd-ca, --etcd-cert and --etcd-key are for https:// endpoints, but these are \
             plain http://: give etcd's https:// client URLs, or drop the --etcd-* flags"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

/// How this replica dials etcd, for advice on a failed call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dial {
    /// The endpoints are `https://`.
    pub https: bool,
    /// A client certificate is given (`--etcd-cert`).
    pub client_cert: bool,
}

/// What to do about a failed call, from the words of its error chain: a TLS fault, or TLS on
/// one side only.
pub fn advice(error: &str, dial: Dial) -> Option<&'static str> {
    if let Some(fault) = Fault::of(error) {
        return Some(match fault {
            Fault::Expired => {
                "a certificate has expired: issue a new --etcd-cert with `podnet-control ca issue \
                 --etcd-client NAME` (or etcd's own with --etcd-server); it is read again at the \
                 next reconnect"
            }
            Fault::NotValidYet => "a certificate is not valid yet: check the clocks of both hosts",
            Fault::UnknownIssuer => {
                "the certificates are not from one CA: --etcd-ca must be the CA that signed \
                 etcd's --cert-file, and --etcd-cert must be signed by etcd's --trusted-ca-file"
            }
            Fault::WrongName => {
                "etcd's certificate does not carry the address in --etcd-endpoints: issue it \
                 with `podnet-control ca issue --etcd-server --ip ADDR`"
            }
            // Go's TLS answers a missing client certificate with "bad certificate" too.
            Fault::CertificateRequired | Fault::BadCertificate if !dial.client_cert => {
                "etcd requires a client certificate (--client-cert-auth): give --etcd-cert and \
                 --etcd-key (`podnet-control ca issue --etcd-client NAME`)"
            }
            Fault::CertificateRequired | Fault::BadCertificate => {
                "etcd refused the client certificate in --etcd-cert: it must be signed by etcd's \
                 --trusted-ca-file (the cluster CA: `podnet-control ca issue --etcd-client NAME`)"
            }
        });
    }
    let e = error.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| e.contains(w));
    if dial.https
        && any(&[
            "invalidcontenttype",
            "corrupt message",
            "invalid content type",
        ])
    {
        Some(
            "etcd answers plain HTTP on an https:// endpoint: give its http:// URLs without the \
             --etcd-* flags, or start etcd with TLS (--cert-file, --key-file)",
        )
    } else if !closed_by_peer(&e) {
        None
    } else if !dial.https {
        // A TLS port closes a plain HTTP/2 connection without a word.
        Some(
            "etcd closed the connection: if it serves TLS (its log says \"first record does not \
             look like a TLS handshake\"), give its https:// URLs with --etcd-ca, and \
             --etcd-cert and --etcd-key for --client-cert-auth",
        )
    } else if dial.client_cert {
        // In TLS 1.3 the server checks the client's certificate after the client finished
        // the handshake: a refusal often arrives as a closed connection, not as an alert.
        Some(
            "etcd closed the connection: if its log says \"failed to verify client \
             certificate\", --etcd-cert is not signed by etcd's --trusted-ca-file (issue one \
             with `podnet-control ca issue --etcd-client NAME` from that CA)",
        )
    } else {
        Some(
            "etcd closed the connection: if its log says \"client didn't provide a \
             certificate\", give --etcd-cert and --etcd-key",
        )
    }
}

/// Whether a failed call's error (lower case) is etcd ending a connection it had accepted:
/// what a refused handshake, or TLS on one side only, looks like when no alert got through.
/// hyper words it as closed, canceled, not ready, reset or a broken pipe, depending on when it
/// noticed, so this goes by what it is not: no connection at all, or no answer in time.
fn closed_by_peer(e: &str) -> bool {
    let any = |words: &[&str]| words.iter().any(|w| e.contains(w));
    let transport = any(&[
        "transport error",
        "operation was canceled",
        "connection closed",
    ]);
    let unreached = any(&[
        "connection refused",
        "connectionrefused",
        "timed out",
        "timedout",
        "deadline",
        "no route",
        "unreachable",
        "dns error",
        "failed to lookup",
    ]);
    transport && !unreached
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &str) -> Vec<String> {
        list.split(',').map(str::to_string).collect()
    }

    #[test]
    fn endpoints_and_flags_must_agree() {
        let tls = EtcdTls {
            ca: "ca.pem".into(),
            client: None,
        };
        assert!(check_endpoints(&urls("http://a:2379,http://b:2379"), None).is_ok());
        assert!(check_endpoints(&urls("https://a:2379,https://b:2379"), Some(&tls)).is_ok());
        let mixed = check_endpoints(&urls("http://a:2379,https://b:2379"), Some(&tls));
        assert!(mixed.unwrap_err().contains("mixes"));
        let no_ca = check_endpoints(&urls("https://a:2379"), None).unwrap_err();
        assert!(no_ca.contains("need --etcd-ca"), "{no_ca}");
        let plain = check_endpoints(&urls("http://a:2379"), Some(&tls)).unwrap_err();
        assert!(plain.contains("plain http://"), "{plain}");
    }

    #[test]
    fn failures_come_with_the_etcd_flags_to_change() {
        let tls = Dial {
            https: true,
            client_cert: true,
        };
        let no_cert = Dial {
            client_cert: false,
            ..tls
        };
        let plain = Dial {
            https: false,
            client_cert: false,
        };
        let closed = "operation was canceled: hyper::Error(Canceled, \"connection closed\")";
        for (error, dial, says) in [
            (
                "invalid peer certificate: UnknownIssuer",
                tls,
                "--etcd-ca must be",
            ),
            (
                "invalid peer certificate: BadSignature",
                tls,
                "--etcd-ca must be",
            ),
            (
                "received fatal alert: BadCertificate",
                tls,
                "--trusted-ca-file",
            ),
            (
                "received fatal alert: BadCertificate",
                no_cert,
                "give --etcd-cert",
            ),
            (
                "received fatal alert: CertificateRequired",
                no_cert,
                "give --etcd-cert",
            ),
            (
                "invalid peer certificate: NotValidForName",
                tls,
                "--etcd-server",
            ),
            ("invalid peer certificate: Expired", tls, "--etcd-client"),
            (
                "received corrupt message of type InvalidContentType",
                tls,
                "plain HTTP",
            ),
            (closed, plain, "https://"),
            (
                "transport error: hyper::Error(Io, Kind(ConnectionReset))",
                plain,
                "https://",
            ),
            (
                "transport error: hyper::Error(Io, Custom { kind: BrokenPipe })",
                plain,
                "https://",
            ),
            (
                "operation was canceled: hyper::Error(Canceled, \"connection was not ready\")",
                tls,
                "failed to verify client certificate",
            ),
            (closed, tls, "failed to verify client certificate"),
            (closed, no_cert, "give --etcd-cert"),
        ] {
            let advice = advice(error, dial).unwrap_or_else(|| panic!("no advice for {error}"));
            assert!(advice.contains(says), "{error} ({dial:?}): {advice}");
        }
        assert_eq!(advice("connection refused", tls), None);
        for unreached in [
            "transport error: tcp connect error: Connection refused (os error 111)",
            "transport error: tcp connect error: deadline has elapsed",
            "transport error: No route to host (os error 113)",
        ] {
            assert_eq!(advice(unreached, plain), None, "{unreached}");
        }
    }

    #[test]
    fn an_expired_client_certificate_is_refused_with_its_date() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::ca_init(dir.path(), 1).unwrap();
        let client = crate::tls::Subject::EtcdClient("r1".into());
        let (cert, key) = crate::tls::issue(dir.path(), &client, 0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let tls = EtcdTls {
            ca: dir.path().join("ca.pem"),
            client: Some((cert, key)),
        };
        let e = tls
            .read()
            .err()
            .expect("an expired certificate was accepted");
        assert!(
            e.contains("expired on") && e.contains("--etcd-client"),
            "{e}"
        );
        let (cert, key) = crate::tls::issue(dir.path(), &client, 1).unwrap();
        let tls = EtcdTls {
            client: Some((cert, key)),
            ..tls
        };
        assert!(tls.read().is_ok());
    }
}
