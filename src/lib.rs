//! switchyard: validate, dedup, enrich and deliver canonical business events from Kafka.

pub mod config;
pub mod delivery;
#[cfg(feature = "demo")]
pub mod demo;
pub mod destinations;
pub mod event;
pub mod ingest;
pub mod kafka;
pub mod parity;
pub mod redact;
pub mod replay;
pub mod router;
pub mod run;
pub mod settings;
pub mod sink;
pub mod tail;
pub mod telemetry;
pub mod trace;
