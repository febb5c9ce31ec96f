//! The unwatched loops must leave nothing behind: in every "on" round (and
//! the diagnostic pass) the guest prints what `airlock sessions --json`
//! reads from the store and what `airlock status --json` counts, and both
//! must be empty.

use anyhow::{Context, bail};

/// What the guest printed for one round: `round=R JSON`.
pub struct Seen {
    round: String,
    json: serde_json::Value,
}

pub fn parse(s: &str) -> anyhow::Result<Seen> {
    let (round, json) = s
        .strip_prefix("round=")
        .and_then(|s| s.split_once(' '))
        .context("no round=")?;
    Ok(Seen {
        round: round.to_string(),
        json: serde_json::from_str(json).context("not JSON")?,
    })
}

/// Fails unless every round in `rounds` has both lines and they show no
/// session, no row written, no event counted, no loss and no error.
pub fn check(rounds: &[String], sessions: &[Seen], counters: &[Seen]) -> anyhow::Result<()> {
    for r in rounds {
        let find = |v: &[Seen], what: &str| -> anyhow::Result<serde_json::Value> {
            v.iter()
                .find(|s| &s.round == r)
                .map(|s| s.json.clone())
                .with_context(|| format!("round {r}: the guest printed no {what}"))
        };
        let s = find(sessions, "sessions")?;
        let c = find(counters, "counters")?;
        if s.as_array().is_none_or(|a| !a.is_empty()) {
            bail!("round {r}: the unwatched loops made sessions in the store: {s}");
        }
        let mut wrong = Vec::new();
        for k in ["records_written", "store_errors", "decode_errors"] {
            if c[k].as_u64() != Some(0) {
                wrong.push(format!("{k} {}", c[k]));
            }
        }
        for list in ["events", "losses"] {
            let Some(a) = c[list].as_array() else {
                bail!("round {r}: airlock status has no {list}: {c}");
            };
            for e in a.iter().filter(|e| e["count"].as_u64() != Some(0)) {
                wrong.push(format!("{list} {} {}", e["kind"], e["count"]));
            }
        }
        if !wrong.is_empty() {
            bail!(
                "round {r}: the unwatched loops were recorded: {}",
                wrong.join(", ")
            );
        }
    }
    Ok(())
}
