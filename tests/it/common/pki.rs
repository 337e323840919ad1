//! Certificates made in the test with rcgen (a CA and certificates it signs), the files the
//! facade reads them from, and TLS clients of the facade.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: String,
}

/// A certificate with its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// A certificate with subject CN `cn` and SANs `sans` (IP addresses, URIs when they hold "://",
/// else DNS names), good for servers and clients.
fn leaf_params(cn: &str, sans: &[&str], serial: u64) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans
        .iter()
        .map(|name| {
            if let Ok(ip) = name.parse() {
                return SanType::IpAddress(ip);
            }
            let ia5 = (*name).to_owned().try_into().unwrap();
            if name.contains("://") {
                SanType::URI(ia5)
            } else {
                SanType::DnsName(ia5)
            }
        })
        .collect();
    params.serial_number = Some(SerialNumber::from(serial));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self {
            pem: issuer.pem(),
            issuer,
        }
    }

    /// A certificate with subject CN `cn` and SANs `sans` (URI SANs when they hold "://",
    /// else DNS), good for servers and clients.
    pub fn issue(&self, cn: &str, sans: &[&str], serial: u64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = leaf_params(cn, sans, serial)
            .signed_by(&key, &self.issuer)
            .unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for `localhost`.
    pub fn server(&self, serial: u64) -> Leaf {
        self.issue("ccgw-callcontrol", &["localhost"], serial)
    }

    /// A certificate for `names` (its subject CN is the first).
    pub fn issue_for(&self, names: &[&str]) -> Leaf {
        self.issue(names[0], names, next_serial())
    }
}

/// A self-signed certificate for `names`: no CA vouches for it.
pub fn self_signed(names: &[&str]) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let params = leaf_params(names[0], names, next_serial());
    let cert = params.self_signed(&key).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes `contents` as `name` in a directory of its own that outlives the test's values (the
/// facade may read it after they are gone); returns its path, as the facade's flags take it.
pub fn pem_file(name: &str, contents: &str) -> PathBuf {
    let files = std::mem::ManuallyDrop::new(Files::new());
    PathBuf::from(files.write(name, contents))
}

/// A directory of files the facade reads, removed when dropped.
pub struct Files {
    pub dir: PathBuf,
}

impl Files {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ccgw-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// Writes `name` the way a Secret or ConfigMap update lands: whole, in one rename, so the
    /// facade never reads half a file.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.join(name);
        let staged = self.dir.join(format!(".{name}.new"));
        std::fs::write(&staged, contents).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        path_str(&path)
    }

    /// Writes a server certificate and key as `tls.crt` and `tls.key`; returns their paths.
    pub fn write_server(&self, leaf: &Leaf) -> (String, String) {
        (
            self.write("tls.crt", &leaf.cert_pem),
            self.write("tls.key", &leaf.key_pem),
        )
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_owned()
}

/// A TLS channel to the facade at `addr` trusting `ca`, with `identity` as client certificate.
pub async fn tls_channel(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
}

/// The certificate a new TLS connection to `addr` is served (DER), trusting `roots`.
pub async fn served_certificate(addr: SocketAddr, roots: &[&Ca]) -> Vec<u8> {
    use tokio_rustls::rustls::{
        pki_types::{pem::PemObject, CertificateDer, ServerName},
        ClientConfig, RootCertStore,
    };
    ccgw_callcontrol::install_crypto_provider();
    let mut store = RootCertStore::empty();
    for ca in roots {
        store
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
            .unwrap();
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    tokio::time::timeout(Duration::from_secs(20), handshake)
        .await
        .expect("the TLS handshake finished within 20 s")
}
