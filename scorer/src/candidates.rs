//! Which endpoints a request may go to: a static list, DNS names re-resolved
//! periodically (a headless Service lists every pod), narrowed per request by
//! the subset hint Envoy sends; and how index pod ids map onto them (a pod id
//! may be a bare IP in older deployments, or carry a data-parallel rank).

use parking_lot::RwLock;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The configured candidate set.
#[derive(Debug, Default)]
pub struct Candidates {
    /// `ip:port` entries given literally.
    fixed: Vec<String>,
    /// `name:port` entries to resolve.
    names: Vec<(String, u16)>,
    /// The current set: fixed plus the last resolution of the names.
    current: RwLock<Arc<Vec<String>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid endpoint {0:?}: expected IP:PORT or NAME:PORT")]
pub struct EndpointError(String);

impl Candidates {
    /// Parses `ip:port` and `name:port` entries.
    pub fn new(entries: &[String]) -> Result<Self, EndpointError> {
        let mut fixed = Vec::new();
        let mut names = Vec::new();
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(addr) = e.parse::<SocketAddr>() {
                fixed.push(addr.to_string());
                continue;
            }
            let (host, port) = e.rsplit_once(':').ok_or_else(|| EndpointError(e.into()))?;
            let port: u16 = port.parse().map_err(|_| EndpointError(e.into()))?;
            if host.is_empty() || host.contains(['/', '@', ' ']) {
                return Err(EndpointError(e.into()));
            }
            names.push((host.to_string(), port));
        }
        let current = RwLock::new(Arc::new(dedup(fixed.clone())));
        Ok(Candidates {
            fixed,
            names,
            current,
        })
    }

    /// Whether any DNS names need resolving.
    pub fn has_names(&self) -> bool {
        !self.names.is_empty()
    }

    /// The candidate endpoints now.
    pub fn current(&self) -> Arc<Vec<String>> {
        self.current.read().clone()
    }

    /// The endpoints for one request: the subset hint when Envoy sent one
    /// (Envoy's pool view wins: it may know a pod our DNS view has not seen
    /// yet), else the configured set.
    pub fn for_request(&self, subset: Option<&[String]>) -> Arc<Vec<String>> {
        match subset {
            Some(s) if !s.is_empty() => Arc::new(dedup(
                s.iter()
                    .filter_map(|e| e.trim().parse::<SocketAddr>().ok())
                    .map(|a| a.to_string())
                    .collect(),
            )),
            _ => self.current(),
        }
    }

    /// Resolves the names once and updates the set. A name that fails to
    /// resolve keeps its previous addresses out of the set (its pods are gone
    /// or DNS is down; the fixed entries and other names still route).
    pub async fn refresh(&self) {
        let mut all = self.fixed.clone();
        for (host, port) in &self.names {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => all.extend(addrs.map(|a| a.to_string())),
                Err(e) => tracing::warn!(host, error = %e, "candidate DNS name did not resolve"),
            }
        }
        *self.current.write() = Arc::new(dedup(all));
    }

    /// Re-resolves every `interval` until cancelled.
    pub async fn run_refresh(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        if !self.has_names() {
            return;
        }
        loop {
            self.refresh().await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
        }
        tracing::debug!("candidate refresher stopped: shutdown");
    }
}

fn dedup(v: Vec<String>) -> Vec<String> {
    v.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

/// Maps an index pod id (`ip:port`, bare `ip`, `ip:port#dpN`) to one of
/// `endpoints`: the endpoint itself, or for a bare IP the only endpoint with
/// that IP (ambiguous bare IPs match nothing: guessing would misroute).
pub fn endpoint_for<'a>(pod_endpoint: &str, endpoints: &'a [String]) -> Option<&'a String> {
    if let Some(e) = endpoints.iter().find(|e| e.as_str() == pod_endpoint) {
        return Some(e);
    }
    let ip: std::net::IpAddr = pod_endpoint.parse().ok()?;
    let mut matching = endpoints
        .iter()
        .filter(|e| e.parse::<SocketAddr>().is_ok_and(|a| a.ip() == ip));
    let first = matching.next()?;
    matching.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[tokio::test]
    async fn static_names_and_subset() {
        let c = Candidates::new(&s(&[
            "127.0.0.12:8000",
            "127.0.0.11:8000",
            "localhost:8001",
        ]))
        .expect("valid");
        assert_eq!(*c.current(), s(&["127.0.0.11:8000", "127.0.0.12:8000"]));
        c.refresh().await;
        assert!(c.current().contains(&"127.0.0.1:8001".to_string()));
        let subset = s(&["127.0.0.13:8000", "junk"]);
        assert_eq!(*c.for_request(Some(&subset)), s(&["127.0.0.13:8000"]));
        assert_eq!(c.for_request(None).len(), c.current().len());
        assert!(Candidates::new(&s(&["nope"])).is_err());
        assert!(Candidates::new(&s(&["a:b"])).is_err());
    }

    #[test]
    fn bare_ip_maps_only_when_unambiguous() {
        let eps = s(&["127.0.0.11:8000", "127.0.0.12:8000", "127.0.0.12:8001"]);
        assert_eq!(endpoint_for("127.0.0.11:8000", &eps), Some(&eps[0]));
        assert_eq!(endpoint_for("127.0.0.11", &eps), Some(&eps[0]));
        assert_eq!(endpoint_for("127.0.0.12", &eps), None);
        assert_eq!(endpoint_for("127.0.0.13:8000", &eps), None);
    }
}
