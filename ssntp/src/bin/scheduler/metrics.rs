//! tenet-scheduler's /metrics, /healthz and /readyz (`--metrics-address`). The ssntp crate
//! depends on nothing of tenet's, so this is the scheduler's own small copy of what
//! `tenet::metrics` serves for the agents. Everything is read from the server's counters
//! and sessions at scrape time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use ssntp::server::ServerHandle;
use tracing::{info, warn};

/// Serves the endpoints on `address` until the task is dropped.
pub async fn serve(address: SocketAddr, server: ServerHandle) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    info!(address = %listener.local_addr()?, "metrics and health endpoints listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        // Its only dependency is its own listener, which this answer proves.
        .route("/readyz", get(|| async { "ready\n" }))
        .with_state(server);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn metrics(State(server): State<ServerHandle>) -> impl IntoResponse {
    let mut registry = Registry::default();
    let sessions = Family::<Vec<(String, String)>, Gauge>::default();
    for peer in server.sessions() {
        for role in peer.role.to_string().split('|').filter(|r| !r.is_empty()) {
            sessions
                .get_or_create(&vec![("role".to_string(), role.trim().to_string())])
                .inc();
        }
    }
    registry.register(
        "tenet_scheduler_sessions",
        "Connected SSNTP sessions, by role (a session with two roles counts in both)",
        sessions,
    );
    let stats = server.stats();
    for (name, help, value) in [
        (
            "tenet_scheduler_frames_forwarded",
            "Frames forwarded to their destination",
            &stats.forwarded,
        ),
        (
            "tenet_scheduler_frames_discarded",
            "Frames dropped by the routing rules (no destination, not the master controller, …)",
            &stats.discarded,
        ),
        (
            "tenet_scheduler_frames_invalid",
            "Frames that could not be decoded",
            &stats.invalid_frames,
        ),
        (
            "tenet_scheduler_connections_refused",
            "Connections refused (certificate, role, handshake)",
            &stats.refused_connections,
        ),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(value.load(Ordering::Relaxed));
        registry.register(name, help, counter);
    }
    let mut text = String::new();
    match encode(&mut text, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
