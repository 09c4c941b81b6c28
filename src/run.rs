//! `switchyard run`: starts the requested roles (router, sinks, ingest) in one
//! process, serves metrics, and shuts everything down cleanly on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::{self, Cluster};

/// How long roles get to finish or hand back in-flight work after SIGTERM.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Router,
    Sink,
    Ingest,
    All,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub role: Role,
    /// Sinks to run; empty = every enabled destination.
    pub destinations: Vec<String>,
    /// Stable id of this process (pod name); becomes each consumer's
    /// `group.instance.id` so a restart reclaims its partitions at once.
    pub instance_id: String,
}

/// What every role gets: the config, where the brokers are, who this process
/// is, and the token that says "stop".
#[derive(Clone)]
pub struct RoleContext {
    pub config: Arc<Config>,
    pub bootstrap: String,
    pub instance_id: String,
    pub shutdown: CancellationToken,
}

impl RoleContext {
    /// `group.instance.id` for one consumer of this process.
    pub fn group_instance_id(&self, consumer: &str) -> String {
        format!("{}-{consumer}", self.instance_id)
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error("unknown destination `{0}` (not in [destinations] or disabled)")]
    UnknownDestination(String),
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    #[error("{role} failed: {message}")]
    Role { role: &'static str, message: String },
}

/// The default instance id: `SWITCHYARD_INSTANCE_ID`, else the host (pod) name.
pub fn default_instance_id() -> String {
    std::env::var("SWITCHYARD_INSTANCE_ID")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "switchyard".into())
}

pub async fn run(config: Arc<Config>, opts: RunOptions) -> Result<(), RunError> {
    let cluster = Cluster::connect(&config)?;
    kafka::topics::ensure(&cluster, &config).await?;
    crate::telemetry::serve_metrics(config.metrics.listen)
        .await
        .map_err(RunError::Metrics)?;

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let ctx = RoleContext {
        config: config.clone(),
        bootstrap: cluster.bootstrap().to_string(),
        instance_id: opts.instance_id.clone(),
        shutdown: shutdown.clone(),
    };

    let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
    let wants = |r: Role| opts.role == r || opts.role == Role::All;
    if wants(Role::Router) {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            crate::router::run(ctx).await.map_err(|e| RunError::Role {
                role: "router",
                message: e.to_string(),
            })
        });
    }
    if wants(Role::Ingest) {
        let ctx = ctx.clone();
        tasks.spawn(async move {
            crate::ingest::run(ctx).await.map_err(|e| RunError::Role {
                role: "ingest",
                message: e.to_string(),
            })
        });
    }
    if wants(Role::Sink) {
        for name in sink_destinations(&config, &opts.destinations)? {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                crate::sink::run(ctx, &name)
                    .await
                    .map_err(|e| RunError::Role {
                        role: "sink",
                        message: format!("{name}: {e}"),
                    })
            });
        }
    }

    // The first role to fail stops the others: a half-running pipeline looks
    // healthy to an orchestrator while it silently stops delivering.
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(RunError::Role {
                role: "task",
                message: e.to_string(),
            })
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "role stopped; shutting down the others");
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    // `cluster` (the embedded broker, if any) outlives every role.
    drop(cluster);
    first_error.map_or(Ok(()), Err)
}

/// The sinks to start: the `--destination`s asked for, or else every
/// enabled destination.
fn sink_destinations(config: &Config, asked: &[String]) -> Result<Vec<String>, RunError> {
    if asked.is_empty() {
        return Ok(config
            .enabled_destinations()
            .map(|d| d.name.clone())
            .collect());
    }
    asked
        .iter()
        .map(|n| match config.destinations.get(n) {
            Some(d) if d.enabled => Ok(n.clone()),
            _ => Err(RunError::UnknownDestination(n.clone())),
        })
        .collect()
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        shutdown.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!(
            deadline_s = SHUTDOWN_DEADLINE.as_secs(),
            "shutdown requested; finishing in-flight work"
        );
        shutdown.cancel();
    });
}
