//! The router: every record the kernel sends goes to the recorder; held
//! actions and exits also go to the broker, which decides holds and
//! abandons the requests of processes that exit.

use tracing::warn;

use super::handles::{BrokerHandle, RecorderHandle};
use crate::model::{Detail, HoldInfo, Record};

pub struct Router {
    pub recorder: RecorderHandle,
    pub broker: BrokerHandle,
}

/// What the broker is told of a record.
enum ToBroker {
    Held(Box<Record>, HoldInfo),
    Exited(u32),
}

impl Router {
    /// Hands a batch on: the whole batch to the recorder first (so a held
    /// action's own record is queued before the request the broker files
    /// for it), then holds and exits to the broker.
    pub async fn route(&self, batch: Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let to_broker: Vec<ToBroker> = batch
            .iter()
            .filter_map(|r| match (r.hold, &r.detail) {
                (Some(hold), _) => Some(ToBroker::Held(Box::new(r.clone()), hold)),
                (None, Detail::Exit(_)) => Some(ToBroker::Exited(r.process.tgid)),
                _ => None,
            })
            .collect();
        if let Err(e) = self.recorder.records(batch).await {
            warn!("{e}: records dropped");
        }
        for m in to_broker {
            let sent = match m {
                ToBroker::Held(record, hold) => self.broker.held(*record, hold).await,
                ToBroker::Exited(tgid) => self.broker.exited(tgid).await,
            };
            if let Err(e) = sent {
                warn!("{e}: a hold or exit was not handed on");
            }
        }
    }
}
