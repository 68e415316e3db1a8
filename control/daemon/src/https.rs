//! HTTPS listeners for axum: a TLS accept loop that runs each handshake in its own task (a slow
//! client holds up nobody else) under the listener's connection limits, feeding finished
//! connections to `axum::serve`. The cluster API and the web console both sit on it.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::limits::{ConnLimiter, ConnPermit};

/// A client must finish its TLS handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose TLS handshake finished, for `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsConn, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener`; the accept loop's task must be aborted with the server.
    pub fn start(
        listener: TcpListener,
        local: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        limiter: Arc<ConnLimiter<IpAddr>>,
        what: &'static str,
    ) -> (TlsListener, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64);
        let accept = tokio::spawn(accept_tls(listener, tls, limiter, tx, what));
        (TlsListener { rx, local }, accept)
    }
}

async fn accept_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limiter: Arc<ConnLimiter<IpAddr>>,
    tx: mpsc::Sender<(TlsConn, SocketAddr)>,
    what: &'static str,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match limiter.admit(peer.ip()) {
            Ok(p) => p,
            Err(hit) => {
                info!(listener = what, client = %peer, reason = hit.label(), "connection refused");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((TlsConn { tls, _permit: permit }, peer)).await;
                }
                Ok(Err(e)) => info!(listener = what, client = %peer, error = %e, "TLS handshake failed"),
                Err(_) => info!(listener = what, client = %peer, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop ended (aborted with the server): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// A TLS connection that holds its place under the listener's limits while it lives.
pub struct TlsConn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    _permit: ConnPermit<IpAddr>,
}

impl TlsConn {
    /// The client's certificate chain, if it presented one (verified in the handshake).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.tls.get_ref().1.peer_certificates()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}
