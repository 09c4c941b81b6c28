//! `switchyard run`: starts the requested roles (router, sinks, ingest) in one
//! process, serves metrics and health, restarts a failed sink on its own, and
//! shuts everything down cleanly on SIGTERM.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use prometheus::{IntCounterVec, IntGaugeVec, register_int_counter_vec, register_int_gauge_vec};
use serde::Serialize;
use thiserror::Error;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::{self, Cluster};

/// How long roles get to finish or hand back in-flight work after SIGTERM.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);
/// A failed sink is started again after 1 s, doubling up to this (with
/// jitter); one that ran this long before failing starts over at 1 s.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);

static RESTARTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_role_restarts_total",
        "Roles started again after they failed, by role and destination (sinks)",
        &["role", "destination"]
    )
    .expect("metric registers once")
});

static UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "switchyard_role_up",
        "1 while a role runs, 0 while it waits to be restarted or has failed",
        &["role", "destination"]
    )
    .expect("metric registers once")
});

/// What `/readyz` says about one role.
#[derive(Debug, Clone, Serialize)]
pub struct RoleStatus {
    pub role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    pub state: RoleState,
    pub restarts: u64,
    /// Why it last failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleState {
    /// Started (or started again) and not yet up: a sink is up once it has
    /// checked its topics and subscribed.
    Starting,
    Running,
    /// Failed; started again after a backoff.
    Restarting,
    /// Failed for good (the process is stopping).
    Failed,
}

/// The roles of this process and how they are doing.
#[derive(Debug, Default)]
pub struct Roles(Mutex<Vec<RoleStatus>>);

impl Roles {
    fn register(&self, role: &'static str, destination: Option<&str>, state: RoleState) -> usize {
        let mut roles = self.0.lock().expect("roles lock");
        roles.push(RoleStatus {
            role,
            destination: destination.map(str::to_string),
            state,
            restarts: 0,
            error: None,
        });
        UP.with_label_values(&[role, destination.unwrap_or("")])
            .set(i64::from(state == RoleState::Running));
        roles.len() - 1
    }

    fn set(&self, id: usize, state: RoleState, error: Option<String>) {
        let mut roles = self.0.lock().expect("roles lock");
        let r = &mut roles[id];
        let labels = [r.role, r.destination.as_deref().unwrap_or("")];
        if state == RoleState::Restarting {
            r.restarts += 1;
            RESTARTS.with_label_values(&labels).inc();
        }
        UP.with_label_values(&labels)
            .set(i64::from(state == RoleState::Running));
        r.state = state;
        if error.is_some() {
            r.error = error;
        }
    }

    pub fn snapshot(&self) -> Vec<RoleStatus> {
        self.0.lock().expect("roles lock").clone()
    }
}

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
    let roles = Arc::new(Roles::default());
    crate::telemetry::serve_metrics(config.metrics.listen, roles.clone())
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
        let (roles, id) = (
            roles.clone(),
            roles.register("router", None, RoleState::Running),
        );
        tasks.spawn(async move {
            let result = crate::router::run(ctx).await.map_err(|e| RunError::Role {
                role: "router",
                message: e.to_string(),
            });
            failed_for_good(&roles, id, &result);
            result
        });
    }
    if wants(Role::Ingest) {
        let ctx = ctx.clone();
        let (roles, id) = (
            roles.clone(),
            roles.register("ingest", None, RoleState::Running),
        );
        tasks.spawn(async move {
            let result = crate::ingest::run(ctx).await.map_err(|e| RunError::Role {
                role: "ingest",
                message: e.to_string(),
            });
            failed_for_good(&roles, id, &result);
            result
        });
    }
    if wants(Role::Sink) {
        for name in sink_destinations(&config, &opts.destinations)? {
            tasks.spawn(supervise_sink(ctx.clone(), name, roles.clone()));
        }
    }

    // A failed router or ingest stops the others, and the process ends for
    // the orchestrator to restart: a half-running pipeline would look
    // healthy while it silently stops delivering. A sink restarts on its own
    // instead (one vendor's trouble must not stop the intake), and
    // `/readyz` names it meanwhile.
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

fn failed_for_good(roles: &Roles, id: usize, result: &Result<(), RunError>) {
    if let Err(e) = result {
        roles.set(id, RoleState::Failed, Some(e.to_string()));
    }
}

/// Runs one destination's sink until shutdown, starting it again with
/// backoff whenever it fails (or panics).
async fn supervise_sink(ctx: RoleContext, name: String, roles: Arc<Roles>) -> Result<(), RunError> {
    let id = roles.register("sink", Some(&name), RoleState::Starting);
    let mut delays = restart_delays();
    loop {
        let started = Instant::now();
        let attempt = {
            let (ctx, name, up) = (ctx.clone(), name.clone(), roles.clone());
            tokio::spawn(async move {
                crate::sink::run(ctx, &name, move || up.set(id, RoleState::Running, None)).await
            })
        };
        let message = match attempt.await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("task ended: {e}"),
        };
        if ctx.shutdown.is_cancelled() {
            roles.set(id, RoleState::Failed, Some(message.clone()));
            return Err(RunError::Role {
                role: "sink",
                message: format!("{name}: {message}"),
            });
        }
        if started.elapsed() >= MAX_RESTART_DELAY {
            delays = restart_delays();
        }
        let delay = delays.next().unwrap_or(MAX_RESTART_DELAY);
        tracing::error!(
            role = "sink",
            destination = %name,
            error = %message,
            restart_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "sink failed; starting it again (the other roles carry on)"
        );
        roles.set(id, RoleState::Restarting, Some(message));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.shutdown.cancelled() => return Ok(()),
        }
        roles.set(id, RoleState::Starting, None);
    }
}

fn restart_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(MAX_RESTART_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
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
