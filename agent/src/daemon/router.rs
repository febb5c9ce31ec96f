//! The router: every record the kernel sends goes to the recorder; held
//! actions and exits also go to the broker, which decides holds and
//! abandons the requests of processes that exit.

use tracing::warn;

use super::handles::{BrokerHandle, RecorderHandle};
use crate::model::{Detail, Record};

pub struct Router {
    pub recorder: RecorderHandle,
    pub broker: BrokerHandle,
}

impl Router {
    /// Hands a batch on: holds and exits to the broker first (a held task
    /// waits), then the whole batch to the recorder.
    pub async fn route(&self, batch: Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        for r in &batch {
            let sent = match (r.hold, &r.detail) {
                (Some(hold), _) => self.broker.held(r.clone(), hold).await,
                (None, Detail::Exit(_)) => self.broker.exited(r.process.tgid).await,
                _ => continue,
            };
            if let Err(e) = sent {
                warn!("{e}: a hold or exit was not handed on");
            }
        }
        if let Err(e) = self.recorder.records(batch).await {
            warn!("{e}: records dropped");
        }
    }
}
