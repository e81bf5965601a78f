//! Connection limits below HTTP, which `axum::serve` has no settings for: a cap on open
//! connections, a deadline for each request's headers, an idle timeout, and a write-stall
//! timeout. Slow or silent clients lose their connection; everyone else keeps being served.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, Instant, Sleep};

use super::shared::Shared;
use crate::tls::Identity;

/// End of an HTTP/1 header block.
const HEADERS_END: &[u8; 4] = b"\r\n\r\n";

/// What is sent to a connection over the limit before closing it.
pub(super) const FULL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\nretry-after: 5\r\ncontent-length: 88\r\n\r\n\
{\"error\":\"too_many_connections\",\"detail\":\"the server has reached its connection limit\"}\n";

/// A connection as the router sees it: the client's address and, under mTLS, who its
/// certificate names.
#[derive(Clone, Debug)]
pub(super) struct Peer {
    pub(super) addr: SocketAddr,
    pub(super) identity: Option<Arc<Identity>>,
}

impl Connected<IncomingStream<'_, Guarded>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Guarded>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// Connections ready for HTTP: counted against the limit and, under TLS, past their
/// handshake. Accepting and handshaking run in tasks of their own, so a slow handshake
/// never holds up the next client.
pub(super) struct Guarded {
    ready: mpsc::Receiver<(GuardedStream, Peer)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Guarded {
    pub(super) fn new(inner: TcpListener, shared: Arc<Shared>) -> Guarded {
        let local = inner
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(shared.config.max_connections));
        let acceptor = tokio::spawn(accept_loop(inner, slots, shared, tx));
        Guarded {
            ready,
            local,
            acceptor,
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(
    inner: TcpListener,
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
    ready: mpsc::Sender<(GuardedStream, Peer)>,
) {
    loop {
        let (stream, addr) = match inner.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the kernel keeps
                // the backlog meanwhile.
                tracing::warn!("accept failed: {e}");
                sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = &shared.metrics;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let refused = metrics
                .connections_closed
                .get_or_create(&[("reason", "limit")])
                .inc()
                + 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    limit = shared.config.max_connections,
                    "connection refused: the connection limit is reached; raise \
                     --max-connections if these are agents"
                );
            }
            tokio::spawn(answer_and_close(stream, FULL));
            continue;
        };
        metrics.connections.inc();
        let shared = shared.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let Some((io, identity)) = handshake(stream, addr, &shared).await else {
                shared.metrics.connections.dec();
                return;
            };
            let conn = GuardedStream::new(io, permit, shared);
            let _ = ready.send((conn, Peer { addr, identity })).await;
        });
    }
}

/// Writes a whole answer to a connection that will not be served, and closes it.
async fn answer_and_close(mut stream: TcpStream, answer: &'static [u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The TLS handshake, if the service speaks TLS, within the header timeout. A client that
/// speaks plain HTTP to it gets a plain-HTTP answer that says to use https.
async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    shared: &Shared,
) -> Option<(Conn, Option<Arc<Identity>>)> {
    let Some(config) = &shared.config.tls else {
        return Some((Conn::Plain(stream), None));
    };
    let deadline = shared.config.header_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {}
        Ok(Ok(1)) => {
            tracing::debug!(%addr, "plain HTTP on the TLS port: answered 400");
            answer_and_close(stream, PLAIN_ON_TLS).await;
            return None;
        }
        _ => return None,
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
    let tls = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let e = e.to_string();
            let advice = crate::tls::advice(&e).unwrap_or("");
            tracing::warn!(%addr, "TLS handshake refused: {e}. {advice}");
            return None;
        }
        Err(_) => return None,
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(crate::tls::identity)
        .map(Arc::new);
    Some((Conn::Tls(Box::new(tls)), identity))
}

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What a plain-HTTP client on the TLS port is told.
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 114\r\n\r\n\
{\"error\":\"tls_required\",\"detail\":\"this service speaks HTTPS with client certificates: use https:// and --tls-ca\"}\n";

impl axum::serve::Listener for Guarded {
    type Io = GuardedStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (GuardedStream, Peer) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task only ends with the listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            identity: None,
        })
    }
}

/// The bytes under HTTP: plain TCP, or TLS over it.
pub(super) enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, data),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where a connection is in its request/response cycle, as far as the bytes tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the end of a header block; `matched` bytes of `\r\n\r\n` seen.
    Headers { matched: usize },
    /// Headers done: reading a body or answering. `responded` once the server wrote,
    /// so the next bytes from the client start a new request.
    Request { responded: bool },
}

pub(super) struct GuardedStream {
    io: Conn,
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    phase: Phase,
    /// Header deadline in `Headers`, idle deadline in `Request`.
    deadline: Pin<Box<Sleep>>,
    /// Running while a write is pending.
    stall: Option<Pin<Box<Sleep>>>,
}

impl GuardedStream {
    fn new(io: Conn, permit: OwnedSemaphorePermit, shared: Arc<Shared>) -> Self {
        let deadline = Box::pin(sleep(shared.config.header_timeout));
        GuardedStream {
            io,
            _permit: permit,
            shared,
            phase: Phase::Headers { matched: 0 },
            deadline,
            stall: None,
        }
    }

    fn rearm(&mut self, after: Duration) {
        self.deadline.as_mut().reset(Instant::now() + after);
    }

    fn timed_out(&self, what: &str) -> io::Error {
        self.shared
            .metrics
            .connections_closed
            .get_or_create(&[("reason", "timeout")])
            .inc();
        tracing::debug!("closing connection: {what}");
        io::Error::new(io::ErrorKind::TimedOut, what.to_string())
    }

    /// Follows the request cycle through bytes the client sent.
    fn saw(&mut self, bytes: &[u8]) {
        let shared = self.shared.clone();
        let config = &shared.config;
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.phase {
                Phase::Request { responded: false } => return,
                Phase::Request { responded: true } => {
                    self.phase = Phase::Headers { matched: 0 };
                    let timeout = config.header_timeout;
                    self.rearm(timeout);
                }
                Phase::Headers { matched } => {
                    let mut m = matched;
                    let mut done = None;
                    for (i, &b) in rest.iter().enumerate() {
                        m = if b == HEADERS_END[m] {
                            m + 1
                        } else if b == HEADERS_END[0] {
                            1
                        } else {
                            0
                        };
                        if m == HEADERS_END.len() {
                            done = Some(i + 1);
                            break;
                        }
                    }
                    match done {
                        Some(n) => {
                            self.phase = Phase::Request { responded: false };
                            let timeout = config.idle_timeout;
                            self.rearm(timeout);
                            rest = &rest[n..];
                        }
                        None => {
                            self.phase = Phase::Headers { matched: m };
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.deadline.as_mut().poll(cx).is_ready() {
            let what = match this.phase {
                Phase::Headers { .. } => "request headers not received in time",
                Phase::Request { .. } => "connection idle",
            };
            return Poll::Ready(Err(this.timed_out(what)));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let new = buf.filled()[before..].to_vec();
            this.saw(&new);
        }
        result
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(cx, data) {
            Poll::Pending => {
                let timeout = this.shared.config.write_stall_timeout;
                let stall = this.stall.get_or_insert_with(|| Box::pin(sleep(timeout)));
                if stall.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.timed_out("client stopped reading")));
                }
                Poll::Pending
            }
            Poll::Ready(Ok(n)) => {
                this.stall = None;
                if n > 0 {
                    if let Phase::Request { .. } = this.phase {
                        this.phase = Phase::Request { responded: true };
                        let timeout = this.shared.config.idle_timeout;
                        this.rearm(timeout);
                    }
                }
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.shared.metrics.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn connection_limit_answer_is_well_formed_json() {
        let text = std::str::from_utf8(FULL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), len);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "too_many_connections");
    }
}
