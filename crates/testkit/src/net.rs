//! Loopback ports and the one-request HTTP/1.1 client the fixtures poll
//! readiness and metrics with (admin endpoints, Envoy's admin, `/readyz`).
//!
//! A port from [`free_port`] is released before the caller's process binds
//! it, so another process may take it first: launchers that use one retry
//! on "address in use". Code that binds in this process binds `127.0.0.1:0`
//! itself and reads the address back instead.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback port nothing listens on right now (the OS picks it).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `127.0.0.1:<port>`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How long one fixture request may take, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(5);

fn request_bytes(method: &str, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// `(status, body)` of a whole `Connection: close` response.
fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad HTTP response {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// One request without a body on a fresh connection: `(status, body)`.
pub async fn http(method: &str, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_with_headers(method, addr, path, &[]).await
}

/// [`http`] with extra request headers (`("Authorization", "Bearer t")`).
pub async fn http_with_headers(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request_bytes(method, addr, path, headers).as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, io::Error>(buf)
    };
    let buf = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{method} {path}: timed out"),
            )
        })??;
    parse_response(&buf)
}

/// [`http`] `GET`, for synchronous callers (a launcher waiting for a
/// process it started; never one whose server runs on the caller's runtime).
pub fn get_blocking(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(request_bytes("GET", addr, path, &[]).as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse_response(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let (code, body) =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\nindex: down\n")
                .expect("parse");
        assert_eq!((code, body.as_str()), (503, "index: down\n"));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port().expect("port");
        assert_ne!(port, 0);
        TcpListener::bind(loopback(port)).expect("bind the port just picked");
    }
}
