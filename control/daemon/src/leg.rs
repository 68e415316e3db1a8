//! One side of a session as control holds it before the handoff: a TLS stream, or a plain
//! socket (a local client on a Unix socket, a `tls.mode: disable` upstream) that the data plane
//! splices without any record layer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub enum Leg<T, P> {
    Tls(T),
    Plain(P),
}

impl<T, P> Leg<T, P> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Leg::Tls(_))
    }
}

impl<T: AsyncRead + Unpin, P: AsyncRead + Unpin> AsyncRead for Leg<T, P> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Leg::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin, P: AsyncWrite + Unpin> AsyncWrite for Leg<T, P> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Leg::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Leg::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Tls(s) => Pin::new(s).poll_flush(cx),
            Leg::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Leg::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Leg::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn both_variants_carry_bytes() {
        let (a, b) = tokio::io::duplex(64);
        let mut plain: Leg<tokio::io::DuplexStream, tokio::io::DuplexStream> = Leg::Plain(a);
        let mut tls: Leg<tokio::io::DuplexStream, tokio::io::DuplexStream> = Leg::Tls(b);
        assert!(!plain.is_tls() && tls.is_tls());
        plain.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        tls.shutdown().await.unwrap();
        assert_eq!(plain.read(&mut got).await.unwrap(), 0);
    }
}
