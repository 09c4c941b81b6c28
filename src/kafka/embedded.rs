//! The embedded broker: librdkafka's in-process mock cluster, used when no
//! brokers are configured so the whole pipeline runs with zero setup.
//!
//! The mock cluster handle is not `Send`, so a dedicated thread owns it and
//! serves topic creation over a channel; `EmbeddedBroker` itself can then be
//! moved between tasks.

use std::sync::mpsc;
use std::thread;

use rdkafka::mocking::MockCluster;

use super::Error;

enum Request {
    CreateTopic {
        name: String,
        partitions: i32,
        reply: mpsc::Sender<Result<(), String>>,
    },
}

pub struct EmbeddedBroker {
    bootstrap: String,
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    pub fn start() -> Result<EmbeddedBroker, Error> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
        let (req_tx, req_rx) = mpsc::channel::<Request>();
        let thread = thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Runs until every sender is dropped, then drops (stops) the cluster.
                for req in req_rx {
                    match req {
                        Request::CreateTopic {
                            name,
                            partitions,
                            reply,
                        } => {
                            let r = cluster
                                .create_topic(&name, partitions, 1)
                                .map_err(|e| e.to_string());
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .map_err(|e| Error::Embedded(e.to_string()))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| Error::Embedded("mock cluster thread exited".into()))?
            .map_err(Error::Embedded)?;
        tracing::warn!(
            bootstrap = %bootstrap,
            "no kafka.brokers configured: using the EMBEDDED in-process broker; it is NOT durable and everything is lost when switchyard exits"
        );
        Ok(EmbeddedBroker {
            bootstrap,
            requests: Some(req_tx),
            thread: Some(thread),
        })
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic (the mock cluster does not implement the CreateTopics admin API).
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), Error> {
        let (reply, rx) = mpsc::channel();
        let dead = || Error::Embedded("mock cluster thread exited".into());
        self.requests
            .as_ref()
            .ok_or_else(dead)?
            .send(Request::CreateTopic {
                name: name.to_string(),
                partitions,
                reply,
            })
            .map_err(|_| dead())?;
        rx.recv().map_err(|_| dead())?.map_err(|e| Error::Admin {
            topic: name.to_string(),
            source: rdkafka::error::KafkaError::AdminOpCreation(e),
        })
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Closing the channel ends the owner thread's loop, which drops the cluster.
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
