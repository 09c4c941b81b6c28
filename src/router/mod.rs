//! The router: validate → dedup → identity → consent → per-destination
//! delivery topics.

pub mod bench;
pub mod dedup;
pub mod identity;
mod metrics;
pub mod pipeline;
pub mod route;
mod runner;

pub use runner::{RouterError, replay_pipeline, run};

/// Records in batches this process's router has committed (all roles in one
/// process share it): lets an in-process caller wait for the router.
pub fn records_committed() -> u64 {
    metrics::CONSUMED.get()
}

/// Records this process's router re-published to their event_id's
/// partition, for `reason` (`wrong_key`, `wrong_partition`).
pub fn records_rerouted(reason: &str) -> u64 {
    metrics::REROUTED.with_label_values(&[reason]).get()
}
