//! TLS for QUIC: the server's identity (loaded, or generated self-signed on
//! first start) and the client's trust in it — a pinned certificate or
//! SHA-256 fingerprint, or a CA.

use crate::proto::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A TLS setup problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read or written.
    #[error("{action} {}: {error}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{}: {problem}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Only one of certificate and key exists.
    #[error(
        "{} exists but {} does not: give both a certificate and its key, \
         or neither (a self-signed pair is then generated)",
        present.display(), absent.display()
    )]
    HalfPair {
        /// The file that exists.
        present: PathBuf,
        /// The one that does not.
        absent: PathBuf,
    },
    /// Generating a certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
    /// `--server-cert` is neither a file nor a fingerprint.
    #[error(
        "{0:?} is neither a readable PEM file nor a SHA-256 fingerprint \
         (sha256:64 hex digits)"
    )]
    BadTrust(String),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
    move |error| TlsError::Io {
        action,
        path: path.to_path_buf(),
        error,
    }
}

/// The crypto provider used on both sides (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:<hex>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", store::id::to_hex(&Sha256::digest(der)))
}

/// Parses `sha256:<hex>`, bare hex, or hex with colons (as `openssl x509
/// -fingerprint -sha256` prints it).
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .or_else(|| t.strip_prefix("sha256 Fingerprint="))
        .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    crate::auth::parse_hex32(&hex)
}

/// The server's certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    /// Certificate chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// Whether it was generated just now.
    pub generated: bool,
}

impl Identity {
    /// The leaf certificate's fingerprint.
    pub fn fingerprint(&self) -> String {
        self.certs
            .first()
            .map(|c| fingerprint(c))
            .unwrap_or_default()
    }
}

/// What a server needs to tell clients of a previous run (same key file)
/// that their connection is gone: the key it signs stateless resets with,
/// and the key of its connection-id generator (so that it recognises the
/// ids it handed out before the restart and answers packets for them with
/// a reset instead of dropping them). A client then reconnects the moment
/// it sends anything (its keep-alive) instead of waiting for its idle
/// timeout. Both are derived from the private key, which never leaves the
/// server; QUIC requires the reset key to stay secret.
pub struct RestartKeys {
    /// Signs stateless resets.
    pub reset: Arc<dyn quinn::crypto::HmacKey>,
    /// Keys the connection-id generator.
    pub cid: u64,
}

impl RestartKeys {
    /// The keys for `id`'s private key.
    pub fn of(id: &Identity) -> RestartKeys {
        let derive = |label: &[u8]| {
            let mut h = Sha256::new();
            h.update(label);
            h.update(id.key.secret_der());
            h.finalize()
        };
        let reset = derive(b"ferry: QUIC stateless reset key, v1\0");
        let cid = derive(b"ferry: QUIC connection id key, v1\0");
        RestartKeys {
            reset: Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset)),
            cid: u64::from_le_bytes(cid[..8].try_into().expect("8 of 32 bytes")),
        }
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(io("cannot read", path))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            problem: format!("not a PEM certificate file ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            problem: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

/// Loads the certificate and key, or — when neither file exists —
/// generates a self-signed pair for `names` and writes them (the key
/// readable by its owner only).
pub fn load_or_generate(cert: &Path, key: &Path, names: &[String]) -> Result<Identity, TlsError> {
    match (cert.exists(), key.exists()) {
        (true, true) => {
            let certs = read_certs(cert)?;
            let bytes = std::fs::read(key).map_err(io("cannot read", key))?;
            let key_der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
                path: key.to_path_buf(),
                problem: format!("holds no usable private key ({e})"),
            })?;
            Ok(Identity {
                certs,
                key: key_der,
                generated: false,
            })
        }
        (true, false) => Err(TlsError::HalfPair {
            present: cert.to_path_buf(),
            absent: key.to_path_buf(),
        }),
        (false, true) => Err(TlsError::HalfPair {
            present: key.to_path_buf(),
            absent: cert.to_path_buf(),
        }),
        (false, false) => {
            let ck = rcgen::generate_simple_self_signed(names.to_vec())
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            write_new(key, ck.signing_key.serialize_pem().as_bytes(), 0o600)?;
            write_new(cert, ck.cert.pem().as_bytes(), 0o644)?;
            Ok(Identity {
                certs: vec![ck.cert.der().clone()],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
                generated: true,
            })
        }
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("cannot create the directory of", path))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io("cannot create", path))?;
    f.write_all(bytes).map_err(io("cannot write", path))?;
    f.sync_all().map_err(io("cannot sync", path))
}

/// The rustls server configuration: TLS 1.3 only, ALPN `ferry/1`.
pub fn server_config(id: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.certs.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Rustls(format!("the certificate and key do not fit: {e}")))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// What a client trusts: pinned certificates (by SHA-256) and/or CAs.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Accepted leaf certificate fingerprints.
    pub pins: Vec<[u8; 32]>,
    /// CA certificates (a leaf chaining to one, for the server's name, is accepted).
    pub roots: Vec<CertificateDer<'static>>,
}

impl Trust {
    /// From `--server-cert`: a PEM file (each certificate in it is pinned,
    /// and used as a CA) or a fingerprint `sha256:<hex>`.
    pub fn from_arg(arg: &str) -> Result<Trust, TlsError> {
        if let Some(fp) = parse_fingerprint(arg) {
            if !Path::new(arg).exists() {
                return Ok(Trust {
                    pins: vec![fp],
                    roots: Vec::new(),
                });
            }
        }
        let path = Path::new(arg);
        if !path.exists() {
            return Err(TlsError::BadTrust(arg.to_string()));
        }
        let certs = read_certs(path)?;
        Ok(Trust {
            pins: certs.iter().map(|c| Sha256::digest(c).into()).collect(),
            roots: certs,
        })
    }

    /// Trust exactly this certificate.
    pub fn pinned(der: &[u8]) -> Trust {
        Trust {
            pins: vec![Sha256::digest(der).into()],
            roots: Vec::new(),
        }
    }
}

/// Checks the server's certificate against a [`Trust`], and remembers why
/// it refused one (so the client can say "certificate mismatch" instead of
/// a TLS alert code).
#[derive(Debug)]
pub struct Verifier {
    pins: Vec<[u8; 32]>,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
    refused: Mutex<Option<String>>,
}

impl Verifier {
    /// A verifier for `trust`.
    pub fn new(trust: &Trust) -> Result<Verifier, TlsError> {
        let provider = provider();
        let webpki = if trust.roots.is_empty() {
            None
        } else {
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(trust.roots.iter().cloned());
            if added == 0 {
                None
            } else {
                Some(
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::Rustls(e.to_string()))?,
                )
            }
        };
        Ok(Verifier {
            pins: trust.pins.clone(),
            webpki,
            provider,
            refused: Mutex::new(None),
        })
    }

    /// Why the last certificate was refused, if one was.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|g| g.clone())
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity).into();
        if self.pins.contains(&got) {
            return Ok(ServerCertVerified::assertion());
        }
        let detail = match &self.webpki {
            Some(v) => match v.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Ok(ok) => return Ok(ok),
                Err(e) => format!(
                    "the server's certificate ({}) is not pinned and does not verify \
                     against the given CA: {e}",
                    fingerprint(end_entity)
                ),
            },
            None => format!(
                "the server presented certificate {}, which is not the pinned one",
                fingerprint(end_entity)
            ),
        };
        if let Ok(mut g) = self.refused.lock() {
            *g = Some(detail);
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls client configuration for `verifier`: TLS 1.3, ALPN `ferry/1`.
pub fn client_config(verifier: Arc<Verifier>) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_common_spellings() {
        let der = b"not really a certificate";
        let fp = fingerprint(der);
        let raw: [u8; 32] = Sha256::digest(der).into();
        assert_eq!(parse_fingerprint(&fp), Some(raw));
        let hex = fp.trim_start_matches("sha256:");
        assert_eq!(parse_fingerprint(hex), Some(raw));
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).to_uppercase())
            .collect();
        assert_eq!(
            parse_fingerprint(&format!("SHA256 Fingerprint={}", colons.join(":"))),
            Some(raw)
        );
        assert_eq!(parse_fingerprint("sha256:abc"), None);
    }

    #[test]
    fn generates_once_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (
            dir.path().join("tls/cert.pem"),
            dir.path().join("tls/key.pem"),
        );
        let a = load_or_generate(&c, &k, &["localhost".into()]).unwrap();
        assert!(a.generated);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = load_or_generate(&c, &k, &["localhost".into()]).unwrap();
        assert!(!b.generated);
        assert_eq!(a.fingerprint(), b.fingerprint());
        server_config(&b).unwrap();
        let t = Trust::from_arg(c.to_str().unwrap()).unwrap();
        assert_eq!(t.pins.len(), 1);
        assert_eq!(fingerprint(&t.roots[0]), a.fingerprint());
        let t = Trust::from_arg(&a.fingerprint()).unwrap();
        assert!(t.roots.is_empty());
        assert!(Trust::from_arg("/no/such/file").is_err());
        std::fs::remove_file(&k).unwrap();
        assert!(matches!(
            load_or_generate(&c, &k, &[]),
            Err(TlsError::HalfPair { .. })
        ));
    }
}
