//! TLS to Redis (`rediss://`): which certificates verify the server and,
//! for mutual TLS, which one this client presents.
//!
//! Without any file the system trust store verifies the server (managed
//! Redis offerings with public CAs). A private CA (the usual case inside a
//! cluster, e.g. a cert-manager issuer) is given as a PEM file; so are the
//! client certificate and key when the server requires them
//! (`tls-auth-clients yes`). `rediss://host:port/#insecure` skips
//! verification (redis-rs's own URL syntax), for tests only.

use crate::Error;
use redis::{ClientTlsConfig, ConnectionAddr, ConnectionInfo, TlsCertificates};
use std::fmt;

/// PEM material for `rediss://` connections; empty: the system trust store.
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// CA certificate(s) that sign the server's certificate.
    pub ca: Option<Vec<u8>>,
    /// Client certificate chain and its private key, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsFiles {
    // Never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl TlsFiles {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }

    /// The same material in redis-rs's form (for clients built outside
    /// this crate, e.g. a cluster client); `None` when empty.
    pub fn certificates(&self) -> Option<TlsCertificates> {
        if self.is_empty() {
            return None;
        }
        Some(TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            root_cert: self.ca.clone(),
        })
    }

    /// Applies the files to a parsed URL. Files given for a plain
    /// `redis://` URL are a configuration error: the operator meant TLS.
    pub(crate) fn apply(&self, info: ConnectionInfo, url: &str) -> Result<ConnectionInfo, Error> {
        install_crypto_provider();
        let Some(certs) = self.certificates() else {
            return Ok(info);
        };
        if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(Error::Config(format!(
                "TLS files are configured but {} is not a rediss:// URL",
                crate::topology::redact(url)
            )));
        }
        let client = redis::Client::build_with_tls(info, certs).map_err(|e| {
            Error::Config(format!(
                "TLS files for {}: {e}",
                crate::topology::redact(url)
            ))
        })?;
        Ok(client.get_connection_info().clone())
    }
}

/// rustls needs one process-wide crypto provider; redis-rs asks for the
/// default. Installing ring's (already in the dependency tree) is idempotent:
/// a later call finds it installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
