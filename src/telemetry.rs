//! The metrics endpoint (Prometheus text, and the process's health and
//! readiness by role) and tracing setup.
//!
//! Metrics live in the prometheus default registry, each defined next to the
//! code that updates it and named `switchyard_<noun>_<unit>_total` (counters)
//! with a small fixed label set.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;

use crate::run::{RoleState, Roles};

async fn metrics() -> impl IntoResponse {
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = encoder.encode(&prometheus::gather(), &mut buf);
    ([(CONTENT_TYPE, encoder.format_type().to_string())], buf)
}

/// The process is alive (it may be restarting a role).
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// 200 while every role runs; 503 naming the roles that do not.
async fn readyz(State(roles): State<Arc<Roles>>) -> impl IntoResponse {
    let roles = roles.snapshot();
    let ready = roles.iter().all(|r| r.state == RoleState::Running);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"ready": ready, "roles": roles})),
    )
}

/// Binds `/metrics`, `/healthz` and `/readyz` (the state of `roles`) on
/// `addr` and serves them until the runtime stops.
pub async fn serve_metrics(addr: SocketAddr, roles: Arc<Roles>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(roles);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(%bound, "metrics endpoint listening");
    Ok(bound)
}
