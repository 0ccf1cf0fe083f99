//! Renders decoded events in the JSON shape of Jetstream v1 (for `firehose-writer inspect`).
//!
//! One commit frame becomes one line per op. `time_us` is omitted: Jetstream stamps its own
//! receive time there, which a capture does not have. Events Jetstream v1 does not emit (`#sync`,
//! `#info`, error frames, skipped kinds, undecodable ops) are rendered with their own `kind` so a
//! researcher sees everything in the capture; [`JETSTREAM_KINDS`] lists the ones Jetstream has.

use serde_json::{json, Value};

use crate::frame::{Event, Skipped};

/// Kinds that Jetstream v1 itself emits.
pub const JETSTREAM_KINDS: [&str; 3] = ["commit", "identity", "account"];

/// The Jetstream v1 lines for one decoded event.
pub fn event_lines(event: &Event<'_>) -> Vec<Value> {
    match event {
        Event::Commit(c) => c
            .ops
            .iter()
            .map(|op| match op {
                Ok(op) => {
                    let mut commit = json!({
                        "rev": c.rev.as_str(),
                        "operation": op.action.as_str(),
                        "collection": op.collection.as_str(),
                        "rkey": op.rkey.as_str(),
                    });
                    match c.record_json(op) {
                        Ok(Some(record)) => {
                            commit["record"] = record;
                            if let Some(cid) = &op.cid {
                                commit["cid"] = Value::String(cid.to_string());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => commit["error"] = Value::String(e.to_string()),
                    }
                    json!({"did": c.repo.as_str(), "kind": "commit", "seq": c.seq.0, "commit": commit})
                }
                Err(e) => json!({
                    "did": c.repo.as_str(),
                    "kind": "invalid_op",
                    "seq": c.seq.0,
                    "error": e.to_string(),
                }),
            })
            .collect(),
        Event::Identity(i) => {
            let mut identity = json!({"did": i.did.as_str(), "seq": i.seq.0, "time": i.time});
            if let Some(handle) = &i.handle {
                identity["handle"] = Value::String(handle.clone());
            }
            vec![json!({"did": i.did.as_str(), "kind": "identity", "identity": identity})]
        }
        Event::Account(a) => {
            let mut account =
                json!({"active": a.active, "did": a.did.as_str(), "seq": a.seq.0, "time": a.time});
            if let Some(status) = &a.status {
                account["status"] = Value::String(status.clone());
            }
            vec![json!({"did": a.did.as_str(), "kind": "account", "account": account})]
        }
        Event::Sync(s) => vec![json!({
            "did": s.did.as_str(),
            "kind": "sync",
            "sync": {"did": s.did.as_str(), "rev": s.rev.as_str(), "seq": s.seq.0, "time": s.time},
        })],
        Event::Info(i) => vec![json!({"kind": "info", "info": {"name": i.name, "message": i.message}})],
        Event::Error(e) => {
            vec![json!({"kind": "error", "error": {"error": e.error, "message": e.message}})]
        }
        Event::Skipped { kind, seq } => {
            let (label, name) = match kind {
                Skipped::Deprecated(n) => ("deprecated", n),
                Skipped::Unknown(n) => ("unknown", n),
            };
            vec![json!({"kind": label, "type": name, "seq": seq.map(|s| s.0)})]
        }
    }
}
