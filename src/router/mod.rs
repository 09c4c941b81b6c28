//! The router: validate → dedup → identity → consent → per-destination
//! delivery topics.

pub mod dedup;
pub mod identity;
pub mod pipeline;
pub mod route;
