//! TLS material for the gateway connection (PEM files read at startup; the client certificate
//! re-read while the service runs) and the loud way out of verification for lab gateways.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::Uri;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    sign::CertifiedKey,
    DigitallySignedStruct, SignatureScheme,
};

use super::SettingsError;
use crate::reload::{ReloadStats, Reloading};

/// A PEM file named by a flag, read once at startup. Errors name the flag and the path; neither
/// they nor `Debug` ever show what the file holds (a private key, or certificates an operator
/// did not mean to publish).
#[derive(Clone)]
pub struct PemFile {
    flag: &'static str,
    path: PathBuf,
    pem: Vec<u8>,
}

impl std::fmt::Debug for PemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PemFile({} {})", self.flag, self.path.display())
    }
}

impl PemFile {
    /// A PEM file's contents as if read from a file (unit tests).
    #[cfg(test)]
    pub(crate) fn from_pem(flag: &'static str, pem: impl Into<Vec<u8>>) -> Self {
        Self {
            flag,
            path: PathBuf::from("(test)"),
            pem: pem.into(),
        }
    }

    pub fn read(flag: &'static str, path: &Path) -> Result<Self, SettingsError> {
        let file = Self {
            flag,
            path: path.to_owned(),
            pem: Vec::new(),
        };
        match std::fs::read(path) {
            Ok(pem) => Ok(Self { pem, ..file }),
            Err(error) => Err(file.problem(format!("cannot read it: {error}"))),
        }
    }

    pub(crate) fn path(&self) -> String {
        self.path.display().to_string()
    }

    /// An error about this file.
    pub(crate) fn problem(&self, problem: impl Into<String>) -> SettingsError {
        SettingsError::File {
            flag: self.flag,
            path: self.path(),
            problem: problem.into(),
        }
    }

    /// Every certificate in the file; at least one.
    pub(crate) fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, SettingsError> {
        let certs = CertificateDer::pem_slice_iter(&self.pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| self.problem(describe_pem_error(&error)))?;
        if certs.is_empty() {
            return Err(self.problem("no PEM certificate (BEGIN CERTIFICATE) in the file"));
        }
        Ok(certs)
    }

    /// The file's first private key (PKCS#8, PKCS#1 or SEC1).
    pub(crate) fn private_key(&self) -> Result<PrivateKeyDer<'static>, SettingsError> {
        PrivateKeyDer::from_pem_slice(&self.pem).map_err(|error| match error {
            rustls::pki_types::pem::Error::NoItemsFound => self.problem(
                "no PEM private key (BEGIN PRIVATE KEY, RSA or EC PRIVATE KEY) in the file",
            ),
            error => self.problem(describe_pem_error(&error)),
        })
    }
}

/// What is wrong with a PEM file, without quoting any of it (some of the parser's errors carry
/// the offending line).
fn describe_pem_error(error: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error;
    match error {
        Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        Error::Base64Decode(_) => "a PEM section is not valid base64",
        Error::Io(_) => "cannot read the PEM",
        Error::NoItemsFound => "nothing usable in the file",
        _ => "not a usable PEM file",
    }
}

/// How often, at most, connections made without verification are reported again.
const SKIP_VERIFY_REMINDER: Duration = Duration::from_secs(3600);

/// `--gateway-insecure-skip-verify`: accepts any certificate for any name, but still checks
/// that the handshake is signed by the key of the certificate presented (so the connection is
/// encrypted to whoever answered, just not authenticated). Each new connection is a reminder
/// at WARN, at most once an hour: loud in every log window, yet no flood when thousands of
/// poll connections open at once.
#[derive(Debug)]
pub(crate) struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
    last_reminder: Mutex<Option<Instant>>,
}

impl AcceptAnyCertificate {
    pub(crate) fn new(provider: &Arc<CryptoProvider>) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
            last_reminder: Mutex::new(None),
        }
    }

    fn remind(&self) {
        let mut last = crate::lock(&self.last_reminder);
        if last.is_none_or(|at| at.elapsed() >= SKIP_VERIFY_REMINDER) {
            *last = Some(Instant::now());
            tracing::warn!(
                "connected to the gateway without verifying its certificate \
                 (--gateway-insecure-skip-verify); repeated at most hourly"
            );
        }
    }
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.remind();
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client certificate presented to the gateway, re-read from its files (`--reload-secs`)
/// so that a rotated certificate (cert-manager renews it in place) is used by new connections
/// without a restart; connections already open keep the one they were made with.
#[derive(Debug, Clone)]
pub(crate) struct ClientIdentity(Reloading<CertifiedKey>);

impl ClientIdentity {
    /// Loads the certificate chain and its key (checked at startup as [`PemFile`]s, which name
    /// what is wrong with them).
    pub(crate) fn load(cert: &PemFile, key: &PemFile) -> Result<Self, SettingsError> {
        Reloading::load(
            "the gateway client certificate and key",
            vec![cert.path.clone(), key.path.clone()],
            parse_identity,
            Arc::default(),
        )
        .map(Self)
        .map_err(|e| key.problem(format!("unusable with {}: {e}", cert.path())))
    }

    pub(crate) fn reload(&self) {
        self.0.reload();
    }

    pub(crate) fn reload_stats(&self) -> Arc<ReloadStats> {
        self.0.stats()
    }
}

/// A certificate chain (PEM, leaf first) and its private key (PEM), checked to go together.
fn parse_identity(files: &[Vec<u8>]) -> Result<CertifiedKey, String> {
    let [cert, key] = files else {
        return Err("a certificate file and a key file".into());
    };
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {}", describe_pem_error(&e)))?;
    if chain.is_empty() {
        return Err("no PEM certificate (BEGIN CERTIFICATE) in the certificate file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("key: {}", describe_pem_error(&e)))?;
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| e.to_string())
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Whether `error` (or a cause of it) is the gateway's TLS alert refusing the facade's client
/// certificate (missing, unknown CA, expired, revoked...). Such an alert ends the handshake:
/// the gateway sends it before it reads any request on the connection.
pub(crate) fn refused_client_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as Alert;
    let mut current = Some(error);
    while let Some(err) = current {
        let tls_error = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = tls_error {
            return matches!(
                alert,
                Alert::CertificateRequired
                    | Alert::BadCertificate
                    | Alert::UnsupportedCertificate
                    | Alert::CertificateRevoked
                    | Alert::CertificateExpired
                    | Alert::CertificateUnknown
                    | Alert::UnknownCA
            );
        }
        current = err.source();
    }
    false
}

/// Says at startup, at WARN, when the gateway connection exposes the agents' sessions: Guids
/// and cookies in clear text over `http://` to another host, or TLS without verification.
pub(crate) fn warn_about_exposure(base: &str, insecure_skip_verify: bool) {
    let Ok(uri) = base.parse::<Uri>() else {
        return;
    };
    let host = uri.host().unwrap_or_default();
    if uri.scheme_str() == Some("http") && !is_loopback(host) {
        tracing::warn!(
            gateway_host = host,
            "the gateway URL is http://: agents' Guids and cookies cross the network in clear \
             text; use https:// outside a lab"
        );
    }
    if insecure_skip_verify {
        tracing::warn!(
            gateway_host = host,
            "--gateway-insecure-skip-verify: the gateway's certificate is NOT verified (no \
             chain, no host name); anyone on the path can impersonate the gateway and take the \
             agents' sessions. For lab gateways only"
        );
    }
}

/// Whether `host` (a name, an IP address, or an IPv6 address in brackets) is this machine.
pub(crate) fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_told_apart() {
        for host in ["127.0.0.1", "localhost", "[::1]", "127.3.2.1"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "ccgw.example", "[2001:db8::1]"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    /// Errors name the flag and the file, and never quote what is in it.
    #[test]
    fn pem_errors_name_the_file_not_its_contents() {
        let dir = std::env::temp_dir().join(format!("ccgw-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.pem");
        let secret =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==!!\n-----END PRIVATE KEY-----\n";
        std::fs::write(&path, secret).unwrap();
        let file = PemFile::read("--gateway-client-key", &path).unwrap();
        let error = file.private_key().unwrap_err().to_string();
        assert!(error.starts_with("--gateway-client-key "), "{error}");
        assert!(error.contains("key.pem"), "{error}");
        assert!(!error.contains("c2VjcmV0"), "{error}");
        assert!(!format!("{file:?}").contains("c2VjcmV0"));
        std::fs::write(&path, "not PEM\n").unwrap();
        let no_cert = PemFile::read("--gateway-client-cert", &path)
            .unwrap()
            .certificates()
            .unwrap_err()
            .to_string();
        assert!(no_cert.contains("no PEM certificate"), "{no_cert}");
        let missing = PemFile::read("--gateway-ca-bundle", &dir.join("absent.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("--gateway-ca-bundle") && missing.contains("absent.pem"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The WARN lines `action` logs.
    fn warnings(action: impl FnOnce()) -> Vec<String> {
        let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let lines = lines.clone();
            move || CaptureWriter(lines.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(subscriber, action);
        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for CaptureWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Clear text to another host and skipped verification are each said at startup; a
    /// loopback simulator over http, or verified TLS, is not worth a warning.
    #[test]
    fn exposure_is_warned_about_at_startup() {
        let quiet = warnings(|| {
            warn_about_exposure("http://127.0.0.1:8043/agentgateway/resource", false);
            warn_about_exposure("https://ccgw.example:8043/agentgateway/resource", false);
        });
        assert!(quiet.is_empty(), "{quiet:?}");
        let clear = warnings(|| warn_about_exposure("http://10.1.2.3:8043/x", false));
        assert!(
            clear.len() == 1 && clear[0].contains("clear text"),
            "{clear:?}"
        );
        let skip = warnings(|| warn_about_exposure("https://lab-gw:8043/x", true));
        assert!(
            skip.len() == 1 && skip[0].contains("NOT verified"),
            "{skip:?}"
        );
    }

    /// Every connection made without verification would be a line per poll connection; the
    /// reminder comes once, then not again within the hour.
    #[test]
    fn skipped_verification_is_repeated_at_most_hourly() {
        crate::install_crypto_provider();
        let provider = CryptoProvider::get_default().unwrap().clone();
        let verifier = AcceptAnyCertificate::new(&provider);
        let name = ServerName::try_from("lab-gw").unwrap();
        let lines = warnings(|| {
            for _ in 0..3 {
                let cert = CertificateDer::from(vec![0u8; 4]);
                assert!(verifier
                    .verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                    .is_ok());
            }
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("without verifying"), "{lines:?}");
    }
}
