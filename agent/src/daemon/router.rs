//! The router: every record the kernel sends goes to the recorder; held
//! actions and exits also go to the broker, which decides holds and
//! abandons the requests of processes that exit.
//!
//! It is a queue the sensor task fills and empties without ever waiting
//! on the recorder or the broker: the broker's decisions need the sensor
//! (to store verdicts), so a sensor blocked on a full broker queue would
//! wait for a broker waiting for it. When the queue is full the sensor
//! stops draining the ring buffer, and the kernel counts what it cannot
//! hand over (`ringbuf_full` losses) instead.

use std::collections::VecDeque;

use super::handles::{BrokerHandle, BrokerPermit, HandleError, RecorderHandle, RecorderPermit};
use crate::model::{Detail, HoldInfo, Record};

/// Records queued at most before the sensor stops draining the kernel.
const QUEUE_RECORDS: usize = 16 * 1024;

pub struct Router {
    pub recorder: RecorderHandle,
    pub broker: BrokerHandle,
}

/// Where the front of the queue goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Recorder,
    Broker,
}

/// Room reserved at one destination.
pub enum Permit {
    Recorder(RecorderPermit),
    Broker(BrokerPermit),
}

enum Item {
    Records(Vec<Record>),
    Held(Box<Record>, HoldInfo),
    Exited(u32),
}

/// What waits to be handed on, in order: a batch's records, then its holds
/// and exits (so a held action's own record is queued at the recorder
/// before the request the broker files for it).
#[derive(Default)]
pub struct Outbox {
    items: VecDeque<Item>,
    records: usize,
}

impl Outbox {
    /// Queues a batch.
    pub fn push(&mut self, batch: Vec<Record>) {
        if batch.is_empty() {
            return;
        }
        let to_broker: Vec<Item> = batch
            .iter()
            .filter_map(|r| match (r.hold, &r.detail) {
                (Some(hold), _) => Some(Item::Held(Box::new(r.clone()), hold)),
                (None, Detail::Exit(_)) => Some(Item::Exited(r.process.tgid)),
                _ => None,
            })
            .collect();
        self.records += batch.len();
        self.items.push_back(Item::Records(batch));
        self.items.extend(to_broker);
    }

    /// Full: the sensor leaves the rest in the kernel's ring buffer.
    pub fn full(&self) -> bool {
        self.records >= QUEUE_RECORDS
    }

    /// Where the front item goes, if there is one.
    pub fn next(&self) -> Option<Dest> {
        self.items.front().map(|i| match i {
            Item::Records(_) => Dest::Recorder,
            Item::Held(..) | Item::Exited(_) => Dest::Broker,
        })
    }

    /// Hands the front item on through room reserved for it.
    pub fn send_front(&mut self, permit: Permit) {
        match (self.items.pop_front(), permit) {
            (Some(Item::Records(batch)), Permit::Recorder(p)) => {
                self.records -= batch.len();
                p.records(batch);
            }
            (Some(Item::Held(record, hold)), Permit::Broker(p)) => p.held(*record, hold),
            (Some(Item::Exited(tgid)), Permit::Broker(p)) => p.exited(tgid),
            (Some(item), _) => self.items.push_front(item),
            (None, _) => {}
        }
    }

    /// Drops the front item (its destination has stopped); how many
    /// records that was.
    pub fn drop_front(&mut self) -> usize {
        match self.items.pop_front() {
            Some(Item::Records(batch)) => {
                self.records -= batch.len();
                batch.len()
            }
            Some(_) => 1,
            None => 0,
        }
    }

    /// Records still queued.
    pub fn records(&self) -> usize {
        self.records
    }
}

impl Router {
    /// Room at `dest`.
    pub async fn reserve(&self, dest: Dest) -> Result<Permit, HandleError> {
        Ok(match dest {
            Dest::Recorder => Permit::Recorder(self.recorder.reserve().await?),
            Dest::Broker => Permit::Broker(self.broker.reserve().await?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExitStatus, Process};

    fn record(tgid: u32, detail: Detail, hold: Option<HoldInfo>) -> Record {
        Record {
            session_id: 1,
            ts_ns: 1,
            kind: airlock_common::EventKind::Exit,
            process: Process {
                tgid,
                ..Process::default()
            },
            detail,
            hold,
        }
    }

    #[test]
    fn a_batch_goes_to_the_recorder_before_its_holds_and_exits_go_to_the_broker() {
        let mut o = Outbox::default();
        assert_eq!(o.next(), None);
        let held = HoldInfo {
            digest: 7,
            in_syscall: true,
        };
        o.push(vec![
            record(1, Detail::Fork { child_tgid: 2 }, None),
            record(2, Detail::Fork { child_tgid: 3 }, Some(held)),
            record(3, Detail::Exit(ExitStatus::from_wait_status(0)), None),
        ]);
        assert_eq!(o.records(), 3);
        assert_eq!(o.next(), Some(Dest::Recorder));
        assert_eq!(o.drop_front(), 3);
        assert_eq!((o.next(), o.records()), (Some(Dest::Broker), 0));
        assert_eq!(o.drop_front(), 1, "the hold");
        assert_eq!(o.drop_front(), 1, "the exit");
        assert_eq!(o.next(), None);
    }

    #[test]
    fn the_outbox_is_full_at_its_record_limit() {
        let mut o = Outbox::default();
        let batch: Vec<Record> = (0..QUEUE_RECORDS as u32)
            .map(|i| record(i, Detail::Fork { child_tgid: i }, None))
            .collect();
        o.push(batch);
        assert!(o.full());
        o.drop_front();
        assert!(!o.full());
    }
}
