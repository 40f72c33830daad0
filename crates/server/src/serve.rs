//! Serving one listener over HTTP/1.1 with limits, so a client that sends slowly or not at all
//! cannot hold the server: a cap on concurrent connections, a deadline for a request's headers,
//! one for its body, and an idle timeout. Long responses (node watch streams) are not cut while
//! they keep writing (they ping). With TLS, the handshake counts against the first request's
//! header deadline, so a client that connects and never says hello is cut as one that never
//! sends headers.

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// The limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A new connection must deliver its first request's headers within this; later requests
    /// on a kept-alive connection within this from their first byte.
    pub header_read: Duration,
    /// A request's body must arrive within this from the end of its headers.
    pub body_read: Duration,
    /// A connection with no request running that reads and writes nothing for this long is
    /// closed (kept-alive connections between requests, responses nobody reads).
    pub idle: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

/// Renders the answer to a request whose body did not arrive in time, in the API's error shape.
pub type TimeoutResponse = fn() -> Response;

/// Accepts and serves connections until `shutdown` turns true, then lets open connections
/// finish (dropping the returned future closes them all).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    on_body_timeout: TimeoutResponse,
    mut shutdown: watch::Receiver<bool>,
    name: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Owned here, so aborting this task drops (closes) every connection.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopping(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: keep serving.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopping(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            serve_connection(stream, router, limits, on_body_timeout, shutdown, tls).await;
            drop(permit);
        });
    }
    // Refuse new connections while the open ones finish.
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    on_body_timeout: TimeoutResponse,
    shutdown: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let activity = Arc::new(Activity::new());
    let tracked = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    let Some(acceptor) = tls else {
        let io = TokioIo::new(tracked);
        return serve_http(io, activity, router, limits, on_body_timeout, shutdown).await;
    };
    let deadline = activity.epoch + limits.header_read;
    match tokio::time::timeout_at(deadline.into(), acceptor.accept(tracked)).await {
        Ok(Ok(tls_stream)) => {
            let io = TokioIo::new(tls_stream);
            serve_http(io, activity, router, limits, on_body_timeout, shutdown).await;
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("no TLS handshake within the header timeout: closing"),
    }
}

async fn serve_http<I>(
    io: TokioIo<I>,
    activity: Arc<Activity>,
    router: Router,
    limits: Limits,
    on_body_timeout: TimeoutResponse,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let act = activity.clone();
    // Each request runs in a task of its own, started as soon as hyper has its head (the
    // closure runs then; the future it returns is polled later, if at all). A client that
    // sends a request and goes away at once makes hyper see the end of its stream and drop
    // that future, sometimes before its first poll: the task still runs the request to its
    // end, so a bulk create completes or rolls back and a write the client will never hear
    // about finishes cleanly, as Neutron and Keystone finish theirs. A streaming answer's body
    // still belongs to the connection and stops with it.
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        let act = act.clone();
        act.served.store(true, Ordering::Relaxed);
        let running = Running::new(&act);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let task = tokio::spawn(async move {
            let _running = running;
            let timed_out = Arc::new(AtomicBool::new(false));
            let req: Request = req.map(|b| Body::new(TimedBody::new(b, limits.body_read, timed_out.clone())));
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if timed_out.load(Ordering::Relaxed) {
                let mut r = on_body_timeout();
                r.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
                return r;
            }
            resp
        });
        async move {
            match task.await {
                Ok(resp) => Ok::<_, Infallible>(resp),
                Err(e) => {
                    tracing::error!(%method, %path, error = %e, "request handler panicked");
                    Ok(axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
                }
            }
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(HeadTimer {
            activity: activity.clone(),
            limits,
        })
        .header_read_timeout(limits.header_read);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stopping(&mut shutdown), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = idle(&activity, limits.idle) => {
                tracing::debug!("closing an idle connection");
                return;
            }
        }
    }
}

async fn stopping(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Resolves once the connection has had no request running and no traffic for `idle`.
async fn idle(activity: &Activity, idle: Duration) {
    loop {
        let deadline = activity.last_io() + idle;
        let now = Instant::now();
        if now >= deadline {
            if activity.running.load(Ordering::Relaxed) == 0 {
                return;
            }
            // A handler is working (e.g. waiting for the store): look again later.
            tokio::time::sleep(idle).await;
        } else {
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// What a connection has been doing, shared by its socket, its timer and its service.
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_io_ms: AtomicU64,
    /// Reads that returned data, to see the first byte of a request.
    reads: AtomicU64,
    /// Requests whose handler has not answered yet.
    running: AtomicUsize,
    /// Whether a request has been received on this connection.
    served: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            served: AtomicBool::new(false),
        }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }
    fn last_io(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed))
    }
}

/// Counts a running request for as long as its handler runs (also when it is cancelled).
struct Running(Arc<Activity>);

impl Running {
    fn new(a: &Arc<Activity>) -> Self {
        a.running.fetch_add(1, Ordering::Relaxed);
        Running(a.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket, noting when bytes move.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.reads.fetch_add(1, Ordering::Relaxed);
            this.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// hyper's header timer, made to tell a slow request from an idle connection: hyper starts it
/// whenever it waits for a request head, kept-alive connections included. Here the first
/// request must arrive within `header_read` of the connection; a later one within `header_read`
/// of its first byte, and until that byte the connection may stay quiet for `idle`.
struct HeadTimer {
    activity: Arc<Activity>,
    limits: Limits,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(FixedSleep(Box::pin(tokio::time::sleep(duration))))
    }
    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let started = Instant::now();
        let deadline = started + self.limits.header_read;
        Box::pin(HeadSleep {
            activity: self.activity.clone(),
            limits: self.limits,
            started,
            reads_at_start: self.activity.reads.load(Ordering::Relaxed),
            kept_alive: self.activity.served.load(Ordering::Relaxed),
            first_byte: None,
            inner: Box::pin(tokio::time::sleep_until(deadline.into())),
        })
    }
}

struct FixedSleep(Pin<Box<tokio::time::Sleep>>);

impl Future for FixedSleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for FixedSleep {}

struct HeadSleep {
    activity: Arc<Activity>,
    limits: Limits,
    started: Instant,
    reads_at_start: u64,
    kept_alive: bool,
    first_byte: Option<Instant>,
    inner: Pin<Box<tokio::time::Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this after every read that leaves the head incomplete.
        if self.first_byte.is_none() && self.activity.reads.load(Ordering::Relaxed) > self.reads_at_start {
            self.first_byte = Some(Instant::now());
        }
        let deadline = match (self.kept_alive, self.first_byte) {
            // From the connection's start: a TLS handshake spends the same budget.
            (false, _) => self.activity.epoch + self.limits.header_read,
            (true, Some(t)) => t + self.limits.header_read,
            (true, None) => self.started + self.limits.idle,
        };
        if self.inner.deadline() != deadline.into() {
            self.inner.as_mut().reset(deadline.into());
        }
        self.inner.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// A request body that fails once `limit` has passed without it arriving in full.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration, timed_out: Arc<AtomicBool>) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            timed_out,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.timed_out.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(BodyTimeout.into())))
                } else {
                    Poll::Pending
                }
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
