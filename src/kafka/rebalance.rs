//! Group consumers that rebalance and close without hanging.
//!
//! librdkafka answers a rebalance call (`rd_kafka_assign`,
//! `rd_kafka_rebalance_protocol`, …) through its group thread, and waits for
//! the answer with no timeout. A rebalance event that is still queued when
//! the consumer starts to close can be served after the group has
//! terminated; the call then never returns, and neither does the close
//! (librdkafka issues #4041 and #4884; `tests/group_close.rs` reproduces it
//! with the bundled librdkafka). switchyard hit it when a router task was
//! aborted while busy: rdkafka's `Drop` closed the consumer and the worker
//! thread blocked forever. Two things keep it out:
//! - [`apply`] never asks librdkafka for the protocol: the configuration
//!   decides it, since librdkafka refuses to mix eager and cooperative
//!   assignors;
//! - [`GroupConsumer`] serves every queued event while the group is still
//!   alive, before the close begins.
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures::Stream;
use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};

/// Whether a group consumer built from `config` rebalances incrementally.
pub fn is_cooperative(config: &ClientConfig) -> bool {
    cooperative(
        config.get("group.protocol"),
        config.get("partition.assignment.strategy"),
    )
}

/// The next-generation protocol (KIP-848) is always incremental; the classic
/// one is incremental only with the cooperative-sticky assignor, and
/// librdkafka's default list (`range,roundrobin`) is eager.
fn cooperative(group_protocol: Option<&str>, strategy: Option<&str>) -> bool {
    if group_protocol.is_some_and(|p| p.trim().eq_ignore_ascii_case("consumer")) {
        return true;
    }
    strategy.is_some_and(|s| {
        s.split(',')
            .any(|a| a.trim().eq_ignore_ascii_case("cooperative-sticky"))
    })
}

/// What the default `rebalance` does (pre hook, assign or unassign, post hook),
/// with the protocol known up front.
pub fn apply<C: ConsumerContext>(
    context: &C,
    consumer: &BaseConsumer<C>,
    cooperative: bool,
    err: RDKafkaRespErr,
    tpl: &TopicPartitionList,
) {
    let rebalance = match err {
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
        RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
        _ => Rebalance::Error(KafkaError::Rebalance(RDKafkaErrorCode::from(err))),
    };
    context.pre_rebalance(consumer, &rebalance);
    let outcome = match (&rebalance, cooperative) {
        (Rebalance::Assign(tpl), true) => consumer.incremental_assign(tpl),
        (Rebalance::Assign(tpl), false) => consumer.assign(tpl),
        (Rebalance::Revoke(tpl), true) => consumer.incremental_unassign(tpl),
        // An error leaves the assignment unknown; like the default, give it up.
        (Rebalance::Error(_), true) => consumer.incremental_unassign(tpl),
        (_, false) => consumer.unassign(),
    };
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "applying a rebalance failed");
    }
    context.post_rebalance(consumer, &rebalance);
}

/// A subscribed consumer that, when dropped, first serves what is queued for
/// it (a pending assignment or revocation above all) and only then lets
/// rdkafka close it. Records taken while draining are dropped unprocessed:
/// nothing of them was committed, so the group reads them again.
pub struct GroupConsumer<C: ConsumerContext + 'static>(StreamConsumer<C>);

impl<C: ConsumerContext + 'static> GroupConsumer<C> {
    pub fn new(consumer: StreamConsumer<C>) -> Self {
        Self(consumer)
    }
}

impl<C: ConsumerContext + 'static> Deref for GroupConsumer<C> {
    type Target = StreamConsumer<C>;
    fn deref(&self) -> &StreamConsumer<C> {
        &self.0
    }
}

/// A queue holds at most `queued.max.messages.kbytes` (64 MiB by default);
/// taking a record costs about a microsecond, so this is ample.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

impl<C: ConsumerContext + 'static> Drop for GroupConsumer<C> {
    fn drop(&mut self) {
        let served = drain(&self.0, DRAIN_LIMIT);
        tracing::debug!(served, "consumer queue drained before close");
    }
}

/// Set when rdkafka's stream asks to be polled again: it served an event
/// (a rebalance) rather than returning a record.
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Polls `consumer` without waiting until its queue is empty (or `limit`
/// passes), so that queued rebalance events run their callbacks now.
/// Returns how many records and events it took.
fn drain<C: ConsumerContext + 'static>(consumer: &StreamConsumer<C>, limit: Duration) -> usize {
    let woken = Arc::new(Woken(AtomicBool::new(false)));
    let waker = Waker::from(woken.clone());
    let mut cx = Context::from_waker(&waker);
    let mut stream = consumer.stream();
    let deadline = Instant::now() + limit;
    let mut served = 0;
    while Instant::now() < deadline {
        woken.0.store(false, Ordering::Relaxed);
        match Pin::new(&mut stream).poll_next(&mut cx) {
            Poll::Ready(_) => {}
            Poll::Pending if woken.0.load(Ordering::Relaxed) => {}
            Poll::Pending => break,
        }
        served += 1;
    }
    served
}

#[cfg(test)]
mod tests {
    use super::cooperative;

    #[test]
    fn the_protocol_follows_the_configured_assignors() {
        assert!(
            !cooperative(None, None),
            "librdkafka's default list is eager"
        );
        assert!(cooperative(None, Some("cooperative-sticky")));
        assert!(cooperative(None, Some(" Cooperative-Sticky ")));
        assert!(!cooperative(None, Some("range,roundrobin")));
        assert!(!cooperative(None, Some("roundrobin")));
        assert!(cooperative(Some("consumer"), None));
        assert!(!cooperative(Some("classic"), Some("range")));
    }
}
