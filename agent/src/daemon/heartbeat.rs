//! The heartbeat: a thread that writes CLOCK_MONOTONIC into the pinned
//! control array every `timeout / 5`. The kernel side holds flagged
//! actions only while the last beat is fresh; with no beat, the fail mode
//! answers instead of a human nobody would reach.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{Array, MapData};
use tracing::warn;

use crate::bpf::pins;

/// Beats until dropped; dropping it stops and joins the thread.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(mut control: Array<MapData, u64>, period: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("airlock-heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if let Err(e) = pins::beat(&mut control) {
                        warn!("heartbeat: {e}");
                    }
                    std::thread::park_timeout(period);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
