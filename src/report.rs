//! Human and JSON rendering of plans, for `status` and `sync --dry-run`, and of what a pass
//! could not do (its per-path errors); JSON of what `verify` found. (A sync's results are
//! rendered by the sinks of its events, [`crate::event`].)

use std::io::{self, Write};

use crate::event::{JSON_VERSION, error_json};
use crate::plan::{Code, Plan};
use crate::sync::Report;
use crate::verify::{Fix, Verified};

/// One line per change: `A path`, `R old -> new`, ...
pub fn write_text(out: &mut dyn Write, plan: &Plan) -> io::Result<()> {
    crate::event::write_plan(out, plan)
}

/// The same as one JSON document, with every per-path error of the pass: those met while
/// scanning and (after a sync) those of its operations, in that order.
pub fn to_json(report: &Report) -> serde_json::Value {
    let plan = &report.plan;
    let changes: Vec<serde_json::Value> = plan
        .items
        .iter()
        .map(|i| {
            let mut v = serde_json::json!({
                "op": i.code.letter(),
                "path": i.path.to_string(),
            });
            if let Some(from) = &i.from {
                v["from"] = serde_json::Value::String(from.to_string());
            }
            v
        })
        .collect();
    let errors: Vec<serde_json::Value> = report
        .scan_errors
        .iter()
        .chain(&report.outcome.errors)
        .map(error_json)
        .collect();
    serde_json::json!({
        "version": JSON_VERSION,
        "kind": "status",
        "changes": changes,
        "errors": errors,
        "summary": {
            "create": plan.count(Code::Add),
            "modify": plan.count(Code::Modify),
            "delete": plan.count(Code::Delete),
            "move": plan.count(Code::Move),
            "copy": plan.count(Code::Copy),
            "type": plan.count(Code::Type),
            "meta": plan.count(Code::Meta),
            "bytes_to_copy": plan.bytes_to_copy,
            "errors": report.error_count(),
        }
    })
}

/// What `verify` found (and with `--repair`, did) as one JSON document; `exit` is the exit
/// status the command gives.
pub fn verified_json(v: &Verified, exit: i32) -> serde_json::Value {
    let differences: Vec<serde_json::Value> = v
        .differences
        .iter()
        .map(|d| {
            let (fix, why) = match &d.fix {
                Fix::Untried => ("none", None),
                Fix::Repaired => ("repaired", None),
                Fix::Failed(_, why) => ("failed", Some(why)),
                Fix::WouldRepair => ("would_repair", None),
                Fix::WouldFail(_, why) => ("would_fail", Some(why)),
            };
            let mut o = serde_json::json!({
                "path": d.path.to_string(),
                "fault": d.fault.as_str(),
                "kind": d.kind().as_str(),
                "repair": fix,
            });
            if let Some(why) = why {
                o["why"] = serde_json::Value::String(why.clone());
            }
            o
        })
        .collect();
    serde_json::json!({
        "version": JSON_VERSION,
        "kind": "verify",
        "files_checked": v.files_checked,
        "bytes_checked": v.bytes_checked,
        "differences": differences,
        "not_recorded": v.unrecorded.len(),
        "errors": v.errors.iter().map(error_json).collect::<Vec<_>>(),
        "exit": exit,
    })
}
