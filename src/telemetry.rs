//! Prometheus metrics endpoint and tracing setup.
//!
//! Metrics live in the prometheus default registry, each defined next to the
//! code that updates it and named `switchyard_<noun>_<unit>_total` (counters)
//! with a small fixed label set.

use std::net::SocketAddr;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;

async fn metrics() -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = encoder.encode(&prometheus::gather(), &mut buf);
    ([(CONTENT_TYPE, encoder.format_type().to_string())], buf)
}

/// Binds `/metrics` on `addr` and serves it until the runtime stops.
pub async fn serve_metrics(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(metrics));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(%bound, "metrics endpoint listening");
    Ok(bound)
}
