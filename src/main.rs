//! The `switchyard` command line.

use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

// The router allocates per record (JSON trees, per-destination copies);
// mimalloc's thread-local free lists cut that cost several-fold against glibc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (the Rust bindings
/// leave it unnamed).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc hands freed memory back to the kernel 10 ms after it is freed, and
/// the kernel zeroes it again when it is reused. The router frees and reuses
/// a batch's worth of memory every few milliseconds, and that round trip cost
/// 12–15% of the step chain (`bench router`, figure (a)). A one-second delay
/// keeps the steady churn resident and still returns memory after a burst.
fn tune_allocator() {
    // SAFETY: mi_option_set stores one option value; it is thread-safe and
    // valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
}

use switchyard::config::{Config, ConfigError};
#[cfg(feature = "demo")]
use switchyard::demo;
use switchyard::kafka::{self, Cluster, topics};
use switchyard::replay;
use switchyard::run::{Role, RunOptions, default_instance_id};
use switchyard::sink::dlq;
use switchyard::{event, ingest};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Validate, dedup, enrich and deliver canonical business events from Kafka"
)]
struct Cli {
    /// More log lines on stderr: -v info, -vv debug (RUST_LOG overrides).
    /// Without it a command logs warnings and errors only; `run` logs info.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish sample events to the (embedded by default) broker and show what happened to each.
    Demo {
        /// Config file; without one the embedded broker is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// NDJSON events to publish instead of the built-in sample.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Publish events with their own times; by default they are shifted so
        /// the latest is a minute old, because vendors refuse old events.
        #[arg(long)]
        keep_times: bool,
    },
    /// Run the pipeline: router, sinks and/or the ingest gateway.
    Run {
        /// Config file; `kafka.brokers` names the cluster.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Without `kafka.brokers`, run on the embedded in-process broker: it
        /// is not durable, so only for trying switchyard out.
        #[arg(long)]
        embedded_broker: bool,
        #[arg(long, value_enum, default_value = "all")]
        role: Role,
        /// Sink destination to run (repeatable); default: every enabled one.
        #[arg(long = "destination")]
        destinations: Vec<String>,
        /// Stable id for static group membership (default: $SWITCHYARD_INSTANCE_ID or the host name).
        #[arg(long)]
        instance_id: Option<String>,
    },
    /// Validate NDJSON canonical events (one per line; `-` reads stdin).
    /// A malformed identity hint (email, phone, ...) is a warning: the router
    /// drops the hint and routes the event.
    /// Exit 0: all valid, 1: any invalid (or, with --strict, any warning),
    /// 2: the file cannot be read.
    Validate {
        file: PathBuf,
        /// Count events with warnings as invalid, e.g. to hold a publisher
        /// to clean identifiers in CI.
        #[arg(long)]
        strict: bool,
    },
    /// Check a config file: print every problem (exit 1) or a summary (exit 0).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Manage the topics switchyard needs.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Deliver a time range again (a backfill): from the canonical topic
    /// through the router's rules for the chosen destinations only, or from
    /// deliver topics as they are. Events the delivery ledger shows as
    /// delivered are skipped unless --force. Ctrl-C stops after the records
    /// in flight are written and prints the command that resumes.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        /// Start of the range (records with timestamps at or after it): RFC 3339 or an age like "2h ago".
        #[arg(long)]
        from: String,
        /// End of the range (records before it): RFC 3339, an age, or "now".
        #[arg(long, default_value = "now")]
        to: String,
        /// Destination to replay to (repeatable); default: every enabled one.
        #[arg(long = "destination")]
        destinations: Vec<String>,
        /// `canonical` (routed again) or `deliver` (each destination's deliveries as they are).
        #[arg(long, default_value = "canonical")]
        source: replay::Source,
        /// Count what would be replayed; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many records read per second.
        #[arg(long)]
        rate: Option<u32>,
        /// Replay events already delivered too, and have the sinks send them again.
        #[arg(long)]
        force: bool,
        /// Go on from where a stopped replay got to (it prints this value).
        #[arg(long)]
        resume: Option<replay::Resume>,
    },
    /// Revenue parity over a time range: per destination and currency, the
    /// canonical value against the delivered value, and the events that
    /// explain the difference. Exit 1 when part of it is unexplained.
    Parity {
        #[arg(long, short)]
        config: PathBuf,
        /// Start of the range: RFC 3339 or an age like "24h ago".
        #[arg(long)]
        from: String,
        /// End of the range: RFC 3339, an age, or "now".
        #[arg(long, default_value = "now")]
        to: String,
        /// Only this destination (repeatable); default: every enabled one.
        #[arg(long = "destination")]
        destinations: Vec<String>,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Follow outcomes live, one line each: deliveries (from the ledger),
    /// rejections (dead letters, with the vendor's reason) and retries
    /// (events parked to wait). Ctrl-C stops.
    Tail {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this destination (repeatable).
        #[arg(long = "destination")]
        destinations: Vec<String>,
        /// Only this outcome: delivered, rejected or retrying (repeatable).
        #[arg(long = "outcome")]
        outcomes: Vec<switchyard::tail::Kind>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One event's path as a timeline: its canonical copies and validation,
    /// dedup, identity added, each destination's route or skip, delivery
    /// records, retries, outcomes, dead letters, redrives and replays.
    /// Found through the delivery ledger and the DLQ (read from --since),
    /// then bounded windows of the canonical, deliver and retry topics.
    /// Exit 0: found, 1: error, 3: no record of it since --since.
    Trace {
        #[arg(long, short)]
        config: PathBuf,
        event_id: String,
        /// One JSON object instead of the timeline.
        #[arg(long)]
        json: bool,
        /// How far back to look: RFC 3339 or an age like "2h ago".
        #[arg(long, default_value = switchyard::trace::DEFAULT_SINCE)]
        since: String,
    },
    /// Inspect and redrive dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Measure a component and print its figures (the last line is one JSON object).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The router: step-chain events/s per core, end-to-end vs a raw copy
    /// through `--brokers`, dedup bytes/key and restore time, identity bytes/person and load time.
    /// The last line printed is one JSON object with every figure.
    Router {
        /// The broker for the end-to-end, copy and restore figures (e.g. a local tansu).
        #[arg(long)]
        brokers: Option<String>,
        #[arg(long, default_value_t = 200_000)]
        chain_events: usize,
        #[arg(long, default_value_t = 50_000)]
        broker_events: usize,
        #[arg(long, default_value_t = 1_000_000)]
        dedup_keys: usize,
        /// People (ten events each) for the identity memory and load figures.
        #[arg(long, default_value_t = 200_000)]
        identity_people: usize,
        /// Alternating end-to-end / raw-copy rounds on fresh topics; the
        /// medians are reported (tansu's multi-second write stalls make one
        /// round a coin toss, but each round adds about a minute).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Accepted events/s per core and latency of `POST /v1/events` batches,
    /// against the embedded mock cluster (and `--brokers` for reference).
    /// The last line printed is one JSON object with every figure.
    Ingest {
        /// A real broker to measure against as well, e.g. a local tansu.
        #[arg(long)]
        brokers: Option<String>,
        /// Measured seconds per broker (after the warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        warmup_seconds: u64,
        /// Events per request.
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// (a) the sink's own cost per core fed from memory, and with
    /// `kafka.brokers` set (b) the end-to-end rate from a deliver topic and
    /// (c) the added latency at 2k events/s. Creates `switchyard-bench-*` topics.
    Sink {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Events for (a); (b) uses at most 50k of them.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Count dead letters by day, destination, stage and error class.
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Re-publish a destination's sink dead letters to its deliver topic
    /// (unchanged, so each keeps its event_id and idempotency key).
    Redrive {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        destination: String,
        /// Only letters written at or after this time: RFC 3339 or an age like "2h".
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        error_class: Option<String>,
        /// Show what would be redriven without publishing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create every missing topic and check the existing ones (safe to run again).
    Create {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // A command's report is its stdout; a service's log is what it reports.
    let service = matches!(cli.command, Command::Run { .. });
    let level = match (cli.verbose, service) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    // The demo's terminal is its report (routes and the delivery table); its
    // log, at info like a service's, goes to a file whose path it prints.
    let demo_log = if matches!(cli.command, Command::Demo { .. }) {
        match demo_log_file() {
            Ok((path, file)) => {
                init_tracing_to_file(if cli.verbose > 1 { "debug" } else { "info" }, file);
                Some(path)
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        init_tracing(level);
        None
    };
    let result = match cli.command {
        Command::Validate { file, strict } => return validate(&file, strict),
        Command::Check { config } => return check(&config),
        Command::Run {
            config,
            embedded_broker,
            role,
            destinations,
            instance_id,
        } => runtime().and_then(|rt| {
            rt.block_on(run(
                config,
                embedded_broker,
                RunOptions {
                    role,
                    destinations,
                    instance_id: instance_id.unwrap_or_else(default_instance_id),
                },
            ))
        }),
        Command::Demo {
            config,
            file,
            keep_times,
        } => {
            #[cfg(feature = "demo")]
            let ran = runtime().and_then(|rt| {
                rt.block_on(run_demo(config, file, demo::DemoOptions { keep_times }))
            });
            if let Some(path) = &demo_log {
                println!("Log of this run: {}", path.display());
            }
            // Production images leave the stand-ins out (no `demo` feature).
            #[cfg(not(feature = "demo"))]
            let ran = {
                let _ = (config, file, keep_times);
                Err(anyhow::anyhow!(
                    "this switchyard was built without the `demo` feature (no vendor stand-ins); build with default features to run the demo"
                ))
            };
            ran
        }
        Command::Topics {
            command: TopicsCommand::Create { config },
        } => runtime().and_then(|rt| rt.block_on(topics_create(&config))),
        Command::Dlq { command } => runtime().and_then(|rt| rt.block_on(dlq(command))),
        Command::Parity {
            config,
            from,
            to,
            destinations,
            json,
        } => (|| {
            let (from, to) = (parse_time("--from", &from)?, parse_time("--to", &to)?);
            runtime()?.block_on(parity(&config, from, to, destinations, json))
        })(),
        Command::Tail {
            config,
            destinations,
            outcomes,
            json,
        } => runtime().and_then(|rt| {
            rt.block_on(tail(
                &config,
                switchyard::tail::Filter {
                    destinations,
                    outcomes,
                },
                json,
            ))
        }),
        Command::Replay {
            config,
            from,
            to,
            destinations,
            source,
            dry_run,
            rate,
            force,
            resume,
        } => (|| {
            let opts = replay::Options {
                from: parse_time("--from", &from)?,
                to: parse_time("--to", &to)?,
                destinations,
                source,
                dry_run,
                rate: rate.filter(|r| *r > 0),
                force,
                resume: resume.unwrap_or_default(),
            };
            runtime()?.block_on(replay_command(&config, opts))
        })(),
        Command::Trace {
            config,
            event_id,
            json,
            since,
        } => parse_time("--since", &since)
            .and_then(|since| runtime()?.block_on(trace_command(&config, &event_id, since, json))),
        Command::Bench {
            command: BenchCommand::Sink { config, events },
        } => runtime().and_then(|rt| rt.block_on(bench_sink(config, events))),
        Command::Bench {
            command:
                BenchCommand::Router {
                    brokers,
                    chain_events,
                    broker_events,
                    dedup_keys,
                    identity_people,
                    rounds,
                },
        } => runtime().and_then(|rt| {
            rt.block_on(bench_router(switchyard::router::bench::BenchOptions {
                brokers,
                chain_events: chain_events.max(1),
                broker_events: broker_events.max(1),
                dedup_keys: dedup_keys.max(1),
                identity_people: identity_people.max(1),
                rounds: rounds.max(1),
            }))
        }),
        Command::Bench {
            command:
                BenchCommand::Ingest {
                    brokers,
                    seconds,
                    warmup_seconds,
                    batch,
                    concurrency,
                },
        } => bench_ingest(&ingest::bench::BenchOptions {
            brokers,
            duration: Duration::from_secs(seconds),
            warmup: Duration::from_secs(warmup_seconds),
            batch: batch.max(1),
            concurrency: concurrency.max(1),
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<ConfigError>() {
                Some(ce) => ce.lines().iter().for_each(|l| eprintln!("error: {l}")),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Where `demo` writes its log: a fresh file in the temporary directory.
fn demo_log_file() -> anyhow::Result<(PathBuf, std::fs::File)> {
    let path = std::env::temp_dir().join(format!("switchyard-demo-{}.log", std::process::id()));
    let file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create the demo's log file {}", path.display()))?;
    Ok((path, file))
}

fn init_tracing_to_file(default: &str, file: std::fs::File) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .init();
}

mod progress {
    use std::io::IsTerminal;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// A long command's progress on stderr (stdout is its report): a bar on
    /// a terminal, otherwise a plain line every few seconds.
    pub struct Bar {
        what: &'static str,
        bar: Option<indicatif::ProgressBar>,
        last_line: Mutex<Option<Instant>>,
    }

    const LINE_EVERY: Duration = Duration::from_secs(5);

    impl Bar {
        pub fn new(what: &'static str) -> Bar {
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:40}] {pos}/{len} records, {per_sec}, ETA {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                );
                bar.set_message(what);
                bar
            });
            Bar {
                what,
                bar,
                last_line: Mutex::new(None),
            }
        }

        pub fn show(&self, done: u64, total: u64, elapsed: Duration) {
            if let Some(bar) = &self.bar {
                bar.set_length(total);
                bar.set_position(done);
                return;
            }
            let mut last = self.last_line.lock().expect("progress lock");
            if last.is_some_and(|t| t.elapsed() < LINE_EVERY) && done < total {
                return;
            }
            *last = Some(Instant::now());
            let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
            let eta = if rate > 0.0 {
                format!("{:.0}s", total.saturating_sub(done) as f64 / rate)
            } else {
                "?".into()
            };
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            eprintln!(
                "{}: {done}/{total} records ({pct}%), {rate:.0}/s, ETA {eta}",
                self.what
            );
        }
    }

    impl Drop for Bar {
        fn drop(&mut self) {
            if let Some(bar) = &self.bar {
                bar.finish_and_clear();
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

fn validate(file: &Path, strict: bool) -> ExitCode {
    let input: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(file) {
            Ok(f) => Box::new(BufReader::new(f)),
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        }
    };
    match event::check_ndjson(input, std::io::stdout().lock()) {
        Ok(s) => {
            println!("{}", s.line(strict));
            if s.passes(strict) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for l in e.lines() {
                eprintln!("error: {l}");
            }
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = kafka::client::check_properties(&config.kafka) {
        eprintln!("error: {}: kafka properties: {e}", path.display());
        return ExitCode::FAILURE;
    }
    print!("{}", topics::summary(&config));
    ExitCode::SUCCESS
}

async fn run(
    config: Option<PathBuf>,
    embedded_broker: bool,
    opts: RunOptions,
) -> anyhow::Result<ExitCode> {
    let config = std::sync::Arc::new(load(config.as_deref())?);
    // Ingest acknowledges events it would lose on exit with the embedded
    // broker: that must be asked for, never fallen into by a missing key.
    if config.kafka.brokers.is_none() && !embedded_broker {
        anyhow::bail!(
            "kafka.brokers is not set: `run` needs a Kafka cluster (the embedded broker \
             loses every event when the process exits; pass --embedded-broker to try it anyway)"
        );
    }
    switchyard::run::run(config, opts).await?;
    Ok(ExitCode::SUCCESS)
}

async fn bench_router(opts: switchyard::router::bench::BenchOptions) -> anyhow::Result<ExitCode> {
    let figures = switchyard::router::bench::run(&opts).await?;
    println!("{}", serde_json::to_string(&figures)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "demo")]
async fn run_demo(
    config: Option<PathBuf>,
    file: Option<PathBuf>,
    opts: demo::DemoOptions,
) -> anyhow::Result<ExitCode> {
    let config = match config {
        Some(p) => Config::load(&p)?,
        None => demo::demo_config(),
    };
    let input = match &file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
        }
        None => demo::SAMPLE_EVENTS.to_string(),
    };
    let cluster = Cluster::connect(&config)?;
    demo::run(
        config,
        &cluster,
        &input,
        opts,
        &mut std::io::stdout().lock(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn topics_create(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    if config.kafka.brokers.is_none() {
        anyhow::bail!(
            "{}: `kafka.brokers` is not set; the embedded broker lives only inside a running switchyard, so there is nothing to create",
            path.display()
        );
    }
    let cluster = Cluster::connect(&config)?;
    let reports = topics::ensure(&cluster, &config).await?;
    for r in &reports {
        println!(
            "{:<8} {:<40} partitions={:<4} cleanup.policy={:<8} {}",
            match r.action {
                topics::Action::Created => "created",
                topics::Action::Existed => "exists",
            },
            r.spec.name,
            r.partitions,
            r.spec.cleanup.as_str(),
            r.spec.purpose
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_ingest(opts: &ingest::bench::BenchOptions) -> anyhow::Result<ExitCode> {
    let figures = ingest::bench::run(opts)?;
    for f in &figures {
        println!(
            "ingest via {}: {:.0} events/s ({:.0} events/s per gateway core, {:.2} CPU-s for {} events), batch {} x {} in flight, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            f.broker,
            f.events_per_s,
            f.events_per_s_per_core,
            f.gateway_cpu_s,
            f.events,
            f.batch,
            f.concurrency,
            f.p50_ms,
            f.p99_ms,
            f.max_ms
        );
    }
    let embedded = &figures[0];
    let summary = serde_json::json!({
        "bench": "ingest",
        "batch": opts.batch,
        "concurrency": opts.concurrency,
        "target_events_per_s_per_core": 50_000,
        "events_per_s_per_core": embedded.events_per_s_per_core.round(),
        "events_per_s": embedded.events_per_s.round(),
        "p99_ms": embedded.p99_ms,
        "meets_target": embedded.events_per_s_per_core >= 50_000.0,
        "runs": figures,
    });
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

fn parse_since(s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    parse_time("--since", s)
}

/// A time on the command line: RFC 3339, "now", or an age like "2h" or
/// "90m ago".
fn parse_time(flag: &str, s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_utc());
    }
    if s.trim() == "now" {
        return Ok(chrono::Utc::now());
    }
    let age = s.trim().strip_suffix("ago").unwrap_or(s).trim();
    let age = humantime::parse_duration(age)
        .with_context(|| format!("{flag} `{s}` is neither RFC 3339 nor an age like \"2h ago\""))?;
    Ok(chrono::Utc::now() - chrono::Duration::from_std(age)?)
}

/// The config at `path` and its cluster; the embedded broker holds nothing
/// for a command that reads what a pipeline wrote, so `what` is refused.
fn on_a_cluster(path: &Path, what: &str) -> anyhow::Result<(Config, Cluster)> {
    let config = Config::load(path)?;
    if config.kafka.brokers.is_none() {
        anyhow::bail!(
            "{}: `kafka.brokers` is not set; there is nothing to {what} on the embedded broker",
            path.display()
        );
    }
    let cluster = Cluster::connect(&config)?;
    Ok((config, cluster))
}

/// Cancelled at the first Ctrl-C (saying `note` on stderr, if given).
fn stop_on_ctrl_c(note: Option<&'static str>) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            if let Some(note) = note {
                eprintln!("{note}");
            }
            on_signal.cancel();
        }
    });
    stop
}

async fn replay_command(path: &Path, opts: replay::Options) -> anyhow::Result<ExitCode> {
    let (config, cluster) = on_a_cluster(path, "replay")?;
    let stop = stop_on_ctrl_c(Some("stopping after the records in flight are written…"));
    let shown = opts.clone();
    let bar = progress::Bar::new(if opts.dry_run {
        "counting"
    } else {
        "replaying"
    });
    let report = replay::run(
        std::sync::Arc::new(config),
        cluster.bootstrap(),
        opts,
        stop,
        move |p| bar.show(p.read, p.total, p.elapsed),
    )
    .await?;
    print!("{}", replay_table(&report));
    if let Some(resume) = &report.stopped {
        println!("\nStopped. To go on from here:");
        println!("  {}", resume_command(path, &shown, resume));
    }
    Ok(ExitCode::SUCCESS)
}

async fn tail(
    path: &Path,
    filter: switchyard::tail::Filter,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (config, cluster) = on_a_cluster(path, "follow")?;
    let stop = stop_on_ctrl_c(None);
    switchyard::tail::follow(
        &config,
        cluster.bootstrap(),
        filter,
        stop,
        |topics| eprintln!("following {topics} topics from their ends; Ctrl-C stops"),
        move |line| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(line).expect("a line serialises")
                )
            } else {
                writeln!(out, "{}", line.human())
            };
            let _ = out.flush();
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn parity(
    path: &Path,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
    destinations: Vec<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use switchyard::parity::Why;
    let (config, cluster) = on_a_cluster(path, "compare")?;
    let report = switchyard::parity::run(
        std::sync::Arc::new(config),
        cluster.bootstrap(),
        from,
        to,
        destinations,
    )
    .await?;
    if json {
        let rows: Vec<serde_json::Value> = report
            .rows
            .iter()
            .map(|((d, c), row)| serde_json::json!({"destination": d, "currency": c, "row": row}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "from": from, "to": to, "events": report.events,
                "with_value": report.with_value, "unexplained": report.unexplained(),
                "rows": rows
            })
        );
    } else {
        println!(
            "{} event(s) from {} to {}, {} with a value and a currency",
            report.events,
            from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            report.with_value
        );
        let mut head = format!(
            "{:<16} {:<8} {:>14} {:>14} {:>12}",
            "destination", "currency", "canonical", "delivered", "difference"
        );
        for why in Why::ALL {
            head.push_str(&format!(" {:>14}", why.as_str()));
        }
        println!("{head}");
        for ((dest, currency), row) in &report.rows {
            let mut line = format!(
                "{dest:<16} {currency:<8} {:>14.2} {:>14.2} {:>12.2}",
                row.canonical.value,
                row.delivered.value,
                row.canonical.value - row.delivered.value
            );
            for why in Why::ALL {
                let s = row.why.get(&why).copied().unwrap_or_default();
                line.push_str(&format!(
                    " {:>14}",
                    format!("{} ({:.2})", s.events, s.value)
                ));
            }
            println!("{line}");
        }
        for ((dest, currency), row) in &report.rows {
            for (why, ids) in &row.examples {
                let n = row.why.get(why).map_or(0, |s| s.events);
                let more = n.saturating_sub(ids.len() as u64);
                let tail = if more > 0 {
                    format!(" … and {more} more")
                } else {
                    String::new()
                };
                println!(
                    "{dest} {currency} {}: {}{tail}",
                    why.as_str(),
                    ids.join(", ")
                );
            }
        }
    }
    Ok(if report.unexplained() > 0 {
        if !json {
            eprintln!(
                "{} event(s) routed by the rules have no delivery record, dead letter or outcome",
                report.unexplained()
            );
        }
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The summary table of a replay, per destination.
fn replay_table(r: &replay::Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let head = if r.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    let _ = writeln!(
        out,
        "{:<20} {:>12} {:>18} {:>14} {:>16} {:>9}",
        "destination", head, "already delivered", "consent", "allowlist/name", "too large"
    );
    for (name, row) in &r.rows {
        let _ = writeln!(
            out,
            "{name:<20} {:>12} {:>18} {:>14} {:>16} {:>9}",
            row.replayed, row.delivered_before, row.consent, row.not_routed, row.oversize
        );
    }
    let _ = writeln!(
        out,
        "{} record(s) read: {} invalid (dead-lettered when routed), {} further cop(ies) of an event_id, {} moved to their event_id's partition (replayed from there)",
        r.records, r.invalid, r.duplicates, r.moved
    );
    if r.outside > 0 {
        let _ = writeln!(
            out,
            "{} record(s) between the range's offsets carry a timestamp outside it: passed over",
            r.outside
        );
    }
    out
}

/// The command that goes on with a stopped replay.
fn resume_command(path: &Path, o: &replay::Options, resume: &replay::Resume) -> String {
    let time =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut c = format!(
        "switchyard replay --config {} --from {} --to {} --source {}",
        path.display(),
        time(o.from),
        time(o.to),
        o.source
    );
    for d in &o.destinations {
        c.push_str(&format!(" --destination {d}"));
    }
    if let Some(rate) = o.rate {
        c.push_str(&format!(" --rate {rate}"));
    }
    if o.force {
        c.push_str(" --force");
    }
    c.push_str(&format!(" --resume {resume}"));
    c
}

/// `trace`'s exit code when it finds no record of the event (2 is clap's
/// for a usage error, so a mistyped flag never reads as "not found").
const TRACE_NOT_FOUND: u8 = 3;

async fn trace_command(
    path: &Path,
    event_id: &str,
    since: chrono::DateTime<chrono::Utc>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (config, cluster) = on_a_cluster(path, "trace")?;
    let trace = switchyard::trace::trace(
        std::sync::Arc::new(config),
        cluster.bootstrap(),
        event_id,
        since,
    )
    .await?;
    if json {
        println!("{}", serde_json::to_string(&trace)?);
    } else {
        print!("{}", trace.text());
    }
    Ok(if trace.found {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(TRACE_NOT_FOUND)
    })
}

async fn dlq(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List { config } => {
            let config = Config::load(&config)?;
            let cluster = Cluster::connect(&config)?;
            let letters = dlq::read_all(&config, cluster.bootstrap()).await?;
            println!(
                "{:<10} {:<24} {:<7} {:<24} {:>8}",
                "day", "destination", "stage", "error_class", "count"
            );
            for ((day, destination, stage, class), n) in dlq::counts(&letters) {
                println!("{day:<10} {destination:<24} {stage:<7} {class:<24} {n:>8}");
            }
            println!("{} dead letter(s)", letters.len());
        }
        DlqCommand::Redrive {
            config: path,
            destination,
            since,
            error_class,
            dry_run,
        } => {
            let config = Config::load(&path)?;
            if !config.destinations.contains_key(&destination) {
                anyhow::bail!(
                    "{}: no destination `{destination}` in [destinations]",
                    path.display()
                );
            }
            let filter = dlq::RedriveFilter {
                destination,
                since: since.as_deref().map(parse_since).transpose()?,
                error_class,
            };
            let cluster = Cluster::connect(&config)?;
            let matched = dlq::redrive(&config, cluster.bootstrap(), &filter, dry_run).await?;
            let verb = if dry_run { "would redrive" } else { "redriven" };
            for l in &matched {
                println!(
                    "{verb} {}/{}/{} {}",
                    config.topics.dlq(),
                    l.partition,
                    l.offset,
                    l.error_class
                );
            }
            println!(
                "{} dead letter(s) {verb} to {}",
                matched.len(),
                config.topics.deliver(&filter.destination)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn bench_sink(config: Option<PathBuf>, events: usize) -> anyhow::Result<ExitCode> {
    let config = load(config.as_deref())?;
    let mut out = std::io::stdout().lock();
    let figures = switchyard::sink::bench::run(&config, events, &mut out).await?;
    use std::io::Write;
    writeln!(out, "{}", serde_json::to_string(&figures)?)?;
    Ok(ExitCode::SUCCESS)
}
