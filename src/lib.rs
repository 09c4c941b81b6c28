//! switchyard: validate, dedup, enrich and deliver canonical business events from Kafka.

pub mod config;
pub mod delivery;
pub mod demo;
pub mod destinations;
pub mod event;
pub mod kafka;
pub mod run;
pub mod sink;
pub mod telemetry;
