//! The `/health` and `/metrics` endpoint: hyper's HTTP/1 server on the writer's runtime, with a
//! bounded number of connections, a whole-request timeout and an accept loop that backs off.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::metrics::{self, Metrics};

/// Limits of the endpoint. It is meant for a local scraper and a health checker: a handful of
/// connections at a time, each answered at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// The whole life of a connection, from accept to the last byte of the response (slow
    /// request heads included). Each connection serves one request.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Request heads beyond this are refused: the two endpoints take no input.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A running endpoint; dropping it stops the server and closes its connections.
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `/health` and `/metrics` on `addr` with the default [`Limits`].
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Server> {
    serve_with(addr, metrics, Limits::default()).await
}

pub async fn serve_with(addr: SocketAddr, metrics: Arc<Metrics>, limits: Limits) -> Result<Server> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    let local = listener.local_addr()?;
    let registry = Arc::new(metrics::registry(&metrics));
    let task = tokio::spawn(accept_loop(listener, metrics, registry, limits));
    Ok(Server { addr: local, task })
}

async fn accept_loop(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Owned here so that aborting this task (dropping the server) also ends every connection.
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_START;
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_START;
                stream
            }
            Err(e) => {
                // EMFILE/ENFILE persist until descriptors are released: retrying at once
                // would spin a core and flood the log.
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "metrics endpoint: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let (metrics, registry) = (metrics.clone(), registry.clone());
        connections.spawn(async move {
            let _slot = slot;
            serve_connection(stream, metrics, registry, limits.request_timeout).await;
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    timeout: Duration,
) {
    let service = hyper::service::service_fn(move |request| {
        let response = respond(&request, &metrics, &registry);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(timeout, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "metrics endpoint: connection failed"),
        Err(_) => debug!(
            timeout_ms = timeout.as_millis() as u64,
            "metrics endpoint: request timed out; connection closed"
        ),
    }
}

fn respond(
    request: &Request<Incoming>,
    metrics: &Metrics,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/health" => {
            let health = metrics.health();
            let status = if health.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut response = Response::new(Full::new(Bytes::from(health.json.to_string())));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        "/metrics" => {
            let mut body = String::new();
            if let Err(e) = prometheus_text::encode(&mut body, registry) {
                warn!(error = %e, "encoding /metrics failed");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                );
            }
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /health or /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
