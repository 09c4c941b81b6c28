//! Publishing accepted events: an idempotent producer whose every send is
//! awaited until the broker acked it, within a bounded time, plus a
//! background probe of broker connectivity for `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureRecord, Producer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::kafka::client::ProducerGuard;

/// How often `/readyz` re-checks that the broker answers.
const PROBE_EVERY: Duration = Duration::from_secs(1);

pub struct Publisher {
    /// Replaced after failed records (tansu 0.6 panics on an epoch bump).
    producer: Arc<ProducerGuard>,
    timeout: Duration,
    ready: Arc<AtomicBool>,
}

/// Why an event was not acknowledged.
#[derive(Debug, Clone)]
pub struct NotAcked(pub String);

impl Publisher {
    pub fn new(
        kafka: &KafkaConfig,
        bootstrap: &str,
        timeout: Duration,
    ) -> Result<Publisher, KafkaError> {
        let mut c = crate::kafka::client::idempotent_producer(kafka, bootstrap);
        // librdkafka gives up on a record after this long, so a request never
        // waits longer than the configured produce timeout for its answer.
        c.set("message.timeout.ms", timeout.as_millis().to_string());
        Ok(Publisher {
            producer: Arc::new(ProducerGuard::new(c, "ingest")?),
            timeout,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Sends every `(key, payload)` and waits for each ack; results are in order.
    pub async fn publish(
        &self,
        topic: &str,
        records: &[(String, Vec<u8>)],
    ) -> Vec<Result<(), NotAcked>> {
        let (generation, producer) = self.producer.current();
        let deadline = Instant::now() + self.timeout;
        let mut pending = Vec::with_capacity(records.len());
        for (key, payload) in records {
            let mut record = FutureRecord::to(topic).key(key).payload(payload);
            let sent = loop {
                match producer.send_result(record) {
                    Ok(delivery) => break Ok(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        // Back-pressure: the local queue drains as the broker acks.
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => break Err(NotAcked(e.to_string())),
                }
            };
            pending.push(sent);
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Err(e) => Err(e),
                // librdkafka's message timeout fails the record first; the outer
                // bound only guards against a lost callback.
                Ok(delivery) => {
                    match tokio::time::timeout_at(deadline + Duration::from_secs(1), delivery).await
                    {
                        Ok(Ok(Ok(_))) => Ok(()),
                        Ok(Ok(Err((e, _)))) => Err(NotAcked(e.to_string())),
                        Ok(Err(_)) => Err(NotAcked("producer dropped the record".into())),
                        Err(_) => Err(NotAcked("no broker answer in time".into())),
                    }
                }
            });
        }
        if out.iter().any(Result::is_err) {
            self.ready.store(false, Ordering::Relaxed);
            self.producer.replace(generation);
        }
        out
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Probes the broker for `topic`'s metadata until `shutdown`.
    pub fn spawn_probe(&self, topic: String, shutdown: CancellationToken) {
        let ready = Arc::clone(&self.ready);
        let guard = Arc::clone(&self.producer);
        tokio::spawn(async move {
            loop {
                let producer = guard.current().1;
                let t = topic.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    producer
                        .client()
                        .fetch_metadata(Some(&t), Duration::from_secs(2))
                        .is_ok_and(|md| {
                            md.topics()
                                .iter()
                                .any(|x| x.error().is_none() && !x.partitions().is_empty())
                        })
                })
                .await
                .unwrap_or(false);
                if ok != ready.swap(ok, Ordering::Relaxed) {
                    tracing::info!(ready = ok, topic = %topic, "broker readiness changed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                }
            }
        });
    }

    /// Waits for records still queued (after the server stopped taking requests).
    pub fn flush(&self) {
        if let Err(e) = self.producer.flush(self.timeout) {
            tracing::warn!(error = %e, "ingest producer did not flush before shutdown");
        }
    }
}
