//! The router: validate → dedup → identity → consent → per-destination
//! delivery topics.

pub mod dedup;
pub mod identity;
mod metrics;
pub mod pipeline;
pub mod route;
mod runner;

pub use runner::{RouterError, run};
