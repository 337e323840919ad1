//! The simulator's side of gateway TLS, with certificates of [`super::pki`].
use std::sync::Arc;

use super::pki::{Ca, Leaf};

/// The simulator's TLS configuration with `server`'s certificate, requiring client certificates
/// from `client_ca` when given.
pub fn sim_tls(server: &Leaf, client_ca: Option<&Ca>) -> Arc<rustls::ServerConfig> {
    ccgw_sim::tls::server_config(
        server.cert_pem.as_bytes(),
        server.key_pem.as_bytes(),
        client_ca.map(|ca| ca.pem.as_bytes()),
    )
    .expect("simulator TLS configuration")
}
