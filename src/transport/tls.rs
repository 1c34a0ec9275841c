//! TLS set-up with rustls: the server's certificate and the client's trust.

use std::path::{Path, PathBuf};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// What can go wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("cannot load {what} from {path}: {message}")]
    Load {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The remote host is not a valid TLS server name.
    #[error("'{0}' is not a valid TLS server name")]
    BadServerName(String),
    /// No trusted root could be found.
    #[error("no trusted root certificates found: {0}")]
    NoRoots(String),
    /// A TLS listener was asked for without a certificate and key.
    #[error("no certificate configured: give cert-file and key-file")]
    NoCertificate,
    /// The TLS configuration does not suit QUIC (it needs TLS 1.3).
    #[error("QUIC: {0}")]
    Quic(String),
}

/// How the client decides to trust the server's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RemoteTrust {
    /// The operating system's root certificates.
    #[default]
    System,
    /// Only the certificates in this PEM file (`--remote-cert`): CA certificates the
    /// server's chain must lead to, or the server's own certificate (for example a plain
    /// self-signed one), which is then pinned: exactly that certificate is accepted,
    /// whatever its name, dates or CA flag.
    CaFile(PathBuf),
    /// Any certificate (`--remote-cert-insecure`): encrypted but not authenticated.
    Insecure,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Load { what: "certificate", path: path.to_owned(), message };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Load {
        what: "private key",
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The oldest TLS version the server accepts from visitors and clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "tls1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "tls1.3")]
    Tls13,
}

impl std::str::FromStr for TlsVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tls1.2" => Ok(TlsVersion::Tls12),
            "tls1.3" => Ok(TlsVersion::Tls13),
            other => Err(format!("'{other}' is not a TLS version (use tls1.2 or tls1.3)")),
        }
    }
}

/// Builds the acceptor for the server's TLS listener from PEM certificate/key pairs.
///
/// With several pairs, each handshake gets the first certificate valid for the server
/// name the visitor asked for (wildcards included), or the first pair when none is.
pub fn server_tls_acceptor(
    pairs: &[(PathBuf, PathBuf)],
    min: TlsVersion,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(server_tls_config(pairs, min)?))
}

/// The server's TLS configuration from PEM certificate/key pairs (see [`server_tls_acceptor`]).
pub fn server_tls_config(
    pairs: &[(PathBuf, PathBuf)],
    min: TlsVersion,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let mut keys = Vec::with_capacity(pairs.len());
    for (cert_file, key_file) in pairs {
        let signing = provider.key_provider.load_private_key(load_key(key_file)?)?;
        keys.push(Arc::new(CertifiedKey::new(load_certs(cert_file)?, signing)));
    }
    if keys.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match min {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CertBySni { keys }));
    Ok(Arc::new(config))
}

/// Picks the certificate for the server name of each handshake.
#[derive(Debug)]
struct CertBySni {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertBySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let wanted = hello.server_name().and_then(|name| ServerName::try_from(name.to_owned()).ok());
        let fits = |key: &&Arc<CertifiedKey>| {
            let (Some(name), Some(leaf)) = (&wanted, key.cert.first()) else { return false };
            webpki::EndEntityCert::try_from(leaf)
                .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
        };
        self.keys.iter().find(fits).or(self.keys.first()).cloned()
    }
}

/// Builds the client's TLS configuration; one per client, so sessions resume.
pub fn client_tls_config(trust: &RemoteTrust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder =
        rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let config = match trust {
        RemoteTrust::Insecure => {
            tracing::warn!(
                "remote-cert-insecure: the server's certificate is not checked; \
                 the link is encrypted, but anyone in the path can pose as the server"
            );
            let verifier = CertVerifier { trust: Trusted::Anything, signatures: Signatures(provider()) };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
        RemoteTrust::CaFile(path) => {
            let pinned = load_certs(path)?;
            let roots = Arc::new(roots_from(pinned.clone())?);
            let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| TlsError::NoRoots(e.to_string()))?;
            let verifier = CertVerifier {
                trust: Trusted::PinnedOrChain { pinned, chain },
                signatures: Signatures(provider()),
            };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
        RemoteTrust::System => {
            // The operating system's roots, as rustls-platform-verifier reads them (on Linux:
            // the system's CA bundle, loaded at the first handshake).
            use rustls_platform_verifier::BuilderVerifierExt;
            builder.with_platform_verifier()?.with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

fn roots_from(certs: Vec<CertificateDer<'static>>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::NoRoots("no usable CA certificate".into()));
    }
    Ok(roots)
}

/// Which server certificates a [`CertVerifier`] accepts.
#[derive(Debug)]
enum Trusted {
    /// Any (`remote-cert-insecure`).
    Anything,
    /// One of the certificates of `remote-cert` itself, byte for byte, or else a chain
    /// that leads to one of them as a CA.
    ///
    /// A pinned certificate is accepted whatever its names, dates or CA flag: `openssl
    /// req -x509` marks a plain self-signed certificate as a CA, which the chain check
    /// refuses as a server's own certificate (`CaUsedAsEndEntity`).
    PinnedOrChain { pinned: Vec<CertificateDer<'static>>, chain: Arc<rustls::client::WebPkiServerVerifier> },
    /// The one certificate whose SHA-256 is this (a peer's, as the server relayed it),
    /// and with `chain`, only if it also chains to that CA for the name asked for
    /// (cluster nodes with `cluster-ca`).
    Fingerprint([u8; 32], Option<Arc<rustls::client::WebPkiServerVerifier>>),
}

/// The CA of `path` (PEM), for certificates that must chain to it.
pub(crate) fn load_ca(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Load {
            what: "CA certificate",
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// A certificate chain and its key from PEM files.
pub(crate) fn load_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    Ok((load_certs(cert)?, load_key(key)?))
}

/// SHA-256 of a certificate's DER bytes.
pub(crate) fn fingerprint(cert: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(cert).into()
}

/// A TLS 1.3 client configuration that shows `identity` and accepts only the server
/// certificate of SHA-256 `pinned` (direct connections between clients), which must also
/// chain to `ca` when given (cluster nodes).
pub(crate) fn pinned_client_config(
    pinned: [u8; 32],
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    ca: Option<Arc<rustls::RootCertStore>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let chain = ca
        .map(|roots| rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider()).build())
        .transpose()
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let verifier =
        CertVerifier { trust: Trusted::Fingerprint(pinned, chain), signatures: Signatures(provider()) };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(identity.0, identity.1)?;
    Ok(config)
}

/// Says whether a certificate, by its SHA-256, is let in.
pub(crate) type AcceptsFingerprint = Arc<dyn Fn(&[u8; 32]) -> bool + Send + Sync>;

/// A TLS 1.3 server configuration that shows `identity` and asks every client for a
/// certificate whose SHA-256 `accepts` (direct connections between clients), which must
/// also chain to `ca` when given (cluster nodes).
pub(crate) fn fingerprint_server_config(
    identity: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    accepts: AcceptsFingerprint,
    ca: Option<Arc<rustls::RootCertStore>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain = ca
        .map(|roots| rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider()).build())
        .transpose()
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let verifier = ClientFingerprints { accepts, chain, signatures: Signatures(provider()) };
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(identity.0, identity.1)?;
    Ok(config)
}

/// Accepts a client certificate by its SHA-256; handshake signatures are checked, so the
/// client holds the certificate's key.
struct ClientFingerprints {
    accepts: AcceptsFingerprint,
    /// The CA the certificate must also chain to, if any.
    chain: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    signatures: Signatures,
}

/// Checks handshake signatures with the provider's algorithms: whoever signed holds the
/// certificate's key. Every verifier here checks them so.
#[derive(Debug)]
struct Signatures(Arc<CryptoProvider>);

impl Signatures {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl std::fmt::Debug for ClientFingerprints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientFingerprints")
    }
}

impl rustls::server::danger::ClientCertVerifier for ClientFingerprints {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if let Some(chain) = &self.chain {
            chain.verify_client_cert(end_entity, intermediates, now)?;
        }
        if (self.accepts)(&fingerprint(end_entity)) {
            Ok(rustls::server::danger::ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// Checks the server's certificate as `trust` says; handshake signatures are always
/// checked, so whoever answers holds the certificate's key.
#[derive(Debug)]
struct CertVerifier {
    trust: Trusted,
    signatures: Signatures,
}

impl ServerCertVerifier for CertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.trust {
            Trusted::Anything => Ok(ServerCertVerified::assertion()),
            Trusted::PinnedOrChain { pinned, .. } if pinned.iter().any(|cert| cert == end_entity) => {
                Ok(ServerCertVerified::assertion())
            }
            Trusted::PinnedOrChain { chain, .. } => {
                chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            Trusted::Fingerprint(pinned, chain) if fingerprint(end_entity) == *pinned => {
                if let Some(chain) = chain {
                    chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
                }
                Ok(ServerCertVerified::assertion())
            }
            Trusted::Fingerprint(..) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.schemes()
    }
}

/// A sentence for a failed TLS handshake with `host`, when `err` carries a rustls error;
/// `None` leaves the error as it is.
pub(crate) fn explain_tls_failure(err: &std::io::Error, host: &str) -> Option<String> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    use rustls::{CertificateError as Cert, Error as Tls};
    let pin_hint = "give its CA, or the certificate itself, with --remote-cert";
    Some(match tls {
        Tls::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer => {
                format!("the server's certificate is not signed by a CA this client trusts ({pin_hint})")
            }
            Cert::Expired | Cert::ExpiredContext { .. } => "the server's certificate has expired".into(),
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet (is a clock wrong?)".into()
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for the name '{host}'")
            }
            Cert::BadSignature => "the server's certificate has a bad signature".into(),
            Cert::Revoked => "the server's certificate has been revoked".into(),
            Cert::InvalidPurpose | Cert::InvalidPurposeContext { .. } => {
                "the server's certificate is not meant for a TLS server".into()
            }
            Cert::Other(other) if is_ca_used_as_end_entity(other) => format!(
                "the server's certificate is a CA certificate, which is not accepted as a server's own \
                 unless pinned ({pin_hint})"
            ),
            _ => "the server's certificate was refused".into(),
        },
        Tls::AlertReceived(alert) => format!("the server refused the TLS handshake (alert: {alert:?})"),
        Tls::InvalidMessage(_)
        | Tls::InappropriateMessage { .. }
        | Tls::InappropriateHandshakeMessage { .. } => {
            "the server did not answer in TLS (is this its tls-addr, and not its plain addr?)".into()
        }
        Tls::PeerIncompatible(_) => {
            "the server and this client have no TLS version or cipher in common".into()
        }
        Tls::NoCertificatesPresented => "the server sent no certificate".into(),
        Tls::DecryptError | Tls::PeerMisbehaved(_) => {
            "the TLS handshake failed: the server misbehaved".into()
        }
        other => format!("the TLS handshake failed: {other}"),
    })
}

/// Whether webpki refused a CA certificate as the server's own.
fn is_ca_used_as_end_entity(other: &rustls::OtherError) -> bool {
    other.0.downcast_ref::<webpki::Error>().is_some_and(|e| matches!(e, webpki::Error::CaUsedAsEndEntity))
}
