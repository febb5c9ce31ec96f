//! The sensor task: owns the loaded kernel programs ([`Bpf`]), drains
//! their ring buffer into the [`Router`], turns loss counters into loss
//! records, and serves [`SensorMsg`]s (session membership, verdicts,
//! candidate maps, loss totals).

use std::{sync::Arc, time::Duration};

use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::{handles::SensorMsg, router::Router, stats::Stats};
use crate::bpf::{Bpf, Drained};

/// How often the ring buffer is drained without a wakeup from the kernel.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// Runs until `shutdown` turns true, then drains what the kernel still
/// holds and the loss counters, so nothing recorded is left behind.
pub async fn run(
    mut bpf: Bpf,
    mut messages: mpsc::Receiver<SensorMsg>,
    router: Router,
    stats: Arc<Stats>,
    loss_poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let ring = bpf
        .take_ring()
        .ok_or_else(|| std::io::Error::other("the ring buffer was taken already"))?;
    // SAFETY: the AsyncFd owns the RingBuf, whose map fd stays open (and is
    // not closed behind tokio's back) for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    let mut tick = tokio::time::interval(loss_poll);
    // The kernel batches wakeups (see AgentConfig::wakeup_bytes): drain
    // on this timer too, so a quiet session's events still arrive fast.
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = drain.tick() => {
                let batch = bpf.drain(ring.get_mut());
                deliver(&router, &stats, batch).await;
            }
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let batch = bpf.drain(guard.get_inner_mut());
                guard.clear_ready();
                deliver(&router, &stats, batch).await;
            }
            Some(msg) = messages.recv() => serve(&mut bpf, msg),
            _ = tick.tick() => router.route(bpf.poll_losses()).await,
            _ = shutdown.changed() => break,
        }
    }
    let batch = bpf.drain(ring.get_mut());
    deliver(&router, &stats, batch).await;
    router.route(bpf.poll_losses()).await;
    Ok(())
}

async fn deliver(router: &Router, stats: &Stats, batch: Drained) {
    stats.count_undecodable(batch.undecodable);
    for r in &batch.records {
        stats.count_event(r.kind);
    }
    router.route(batch.records).await;
}

fn serve(bpf: &mut Bpf, msg: SensorMsg) {
    // A caller that stopped waiting lost interest in the answer.
    match msg {
        SensorMsg::Watch {
            tgid,
            session_id,
            reply,
        } => {
            let r = bpf.watch(tgid, session_id);
            tracing::debug!(tgid, session_id, ok = r.is_ok(), "watch");
            let _ = reply.send(r);
        }
        SensorMsg::Verdict {
            pid,
            digest,
            allow,
            reply,
        } => {
            let _ = reply.send(bpf.set_verdict(pid, digest, allow));
        }
        SensorMsg::Candidates { candidates, reply } => {
            let _ = reply.send(bpf.apply_candidates(&candidates));
        }
        SensorMsg::LossTotals { reply } => {
            let _ = reply.send(bpf.loss_totals());
        }
    }
}
