//! The sensor task: owns the loaded kernel programs ([`Bpf`]), drains
//! their ring buffer into the router's [`Outbox`], turns loss counters into
//! loss records, and serves [`SensorMsg`]s (session membership, verdicts,
//! candidate maps, loss totals).

use std::{sync::Arc, time::Duration};

use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use aya::maps::{MapData, RingBuf};

use super::{
    handles::{HandleError, SensorMsg},
    router::{Dest, Outbox, Permit, Router},
    stats::Stats,
};
use crate::{
    bpf::{Bpf, Drained},
    model::Record,
};

/// How often the ring buffer is drained without a wakeup from the kernel.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// How long the last records may wait for room at the recorder and the
/// broker once the daemon stops.
const FLUSH_LIMIT: Duration = Duration::from_secs(8);

/// Runs until `shutdown` turns true, then drains what the kernel still
/// holds and the loss counters, so nothing recorded is left behind. It
/// never waits on the recorder or the broker while it could serve a
/// message (see [`Outbox`]).
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
    let mut outbox = Outbox::default();
    loop {
        let next = outbox.next();
        let room = !outbox.full();
        tokio::select! {
            _ = drain.tick(), if room => {
                outbox.push(take(&bpf, ring.get_mut(), &stats));
            }
            guard = ring.readable_mut(), if room => {
                let mut guard = guard?;
                outbox.push(take(&bpf, guard.get_inner_mut(), &stats));
                guard.clear_ready();
            }
            Some(msg) = messages.recv() => serve(&mut bpf, msg),
            _ = tick.tick() => outbox.push(bpf.poll_losses()),
            permit = reserve(&router, next), if next.is_some() => match permit {
                Ok(p) => outbox.send_front(p),
                Err(e) => {
                    let n = outbox.drop_front();
                    tracing::error!("{e}: {n} record(s) or hold(s) dropped");
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    outbox.push(take(&bpf, ring.get_mut(), &stats));
    outbox.push(bpf.poll_losses());
    flush(&router, &mut outbox).await;
    Ok(())
}

/// Room at the front item's destination.
async fn reserve(router: &Router, next: Option<Dest>) -> Result<Permit, HandleError> {
    match next {
        Some(dest) => router.reserve(dest).await,
        // Not polled: the branch is disabled without a front item.
        None => std::future::pending().await,
    }
}

/// Hands on what is left, within [`FLUSH_LIMIT`]; says what could not be.
async fn flush(router: &Router, outbox: &mut Outbox) {
    let deadline = tokio::time::Instant::now() + FLUSH_LIMIT;
    while let Some(dest) = outbox.next() {
        match tokio::time::timeout_at(deadline, router.reserve(dest)).await {
            Ok(Ok(p)) => outbox.send_front(p),
            Ok(Err(e)) => {
                let n = outbox.drop_front();
                tracing::error!("{e}: {n} record(s) or hold(s) dropped at shutdown");
            }
            Err(_) => {
                tracing::error!(
                    records = outbox.records(),
                    "records not handed on within {FLUSH_LIMIT:?} of the stop: lost"
                );
                return;
            }
        }
    }
}

/// What the ring buffer holds now, counted.
fn take(bpf: &Bpf, ring: &mut RingBuf<MapData>, stats: &Stats) -> Vec<Record> {
    let batch: Drained = bpf.drain(ring);
    stats.count_undecodable(batch.undecodable);
    for r in &batch.records {
        stats.count_event(r.kind);
    }
    batch.records
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
            tgid,
            pid,
            kind,
            digest,
            allow,
            env,
            reply,
        } => {
            let _ = reply.send(bpf.set_verdict((tgid, pid), (kind, digest), allow, env));
        }
        SensorMsg::ForgetVerdict {
            tgid,
            pid,
            kind,
            digest,
            reply,
        } => {
            let _ = reply.send(bpf.forget_verdict((tgid, pid), (kind, digest)));
        }
        SensorMsg::Candidates { in_force, reply } => {
            let _ = reply.send(bpf.apply_candidates(&in_force.candidates, &in_force.exes));
        }
        SensorMsg::LossTotals { reply } => {
            let _ = reply.send(bpf.loss_totals());
        }
    }
}
