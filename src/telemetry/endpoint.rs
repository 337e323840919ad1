//! `GET /metrics` on `--metrics-listen`: the registry as OpenMetrics text when the scraper asks
//! for it (Prometheus does), else as the classic Prometheus text format (curl, promtool).
//! Served over HTTP/1 by hyper, whose header read timeout closes a connection that sends no
//! complete request head in time, first request or the next on a kept-alive connection.
use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use futures_util::{Stream, StreamExt};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use prometheus_client::{encoding, metrics::counter::Counter, registry::Registry};
use tokio::io::{AsyncRead, AsyncWrite};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on the `incoming` connections until `shutdown` resolves, then lets the
/// requests under way finish. A connection without a complete request head within
/// `header_read_timeout` is closed and counted in `header_timeouts`.
pub async fn serve<IO>(
    incoming: impl Stream<Item = IO>,
    registry: Arc<Registry>,
    header_read_timeout: Duration,
    header_timeouts: Counter,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(registry);
    let service = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = GracefulShutdown::new();
    tokio::pin!(incoming, shutdown);
    loop {
        let io = tokio::select! {
            () = &mut shutdown => break,
            io = incoming.next() => match io {
                Some(io) => io,
                None => break,
            },
        };
        let connection =
            connections.watch(http.serve_connection(TokioIo::new(io), service.clone()));
        let header_timeouts = header_timeouts.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                if error.is_timeout() {
                    header_timeouts.inc();
                }
            }
        });
    }
    connections.shutdown().await;
    Ok(())
}

async fn scrape(State(registry): State<Arc<Registry>>, request: HeaderMap) -> Response {
    let openmetrics = request
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut text = String::with_capacity(16 * 1024);
    let (encoded, content_type) = if openmetrics {
        (encoding::text::encode(&mut text, &registry), OPENMETRICS)
    } else {
        (
            encoding::prometheus_text::encode(&mut text, &registry),
            PROMETHEUS_TEXT,
        )
    };
    match encoded {
        Ok(()) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
            .into_response(),
    }
}
