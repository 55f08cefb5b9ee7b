//! Human and JSON rendering of plans, for `status` and `sync --dry-run`, and of what a pass
//! could not do (its per-path errors).

use std::io::{self, Write};

use crate::plan::{Code, Plan};
use crate::sync::Report;

/// One line per change: `A path`, `R old -> new`, ...
pub fn write_text(out: &mut dyn Write, plan: &Plan) -> io::Result<()> {
    for item in &plan.items {
        match &item.from {
            Some(from) => writeln!(out, "{} {from} -> {}", item.code.letter(), item.path)?,
            None => writeln!(out, "{} {}", item.code.letter(), item.path)?,
        }
    }
    Ok(())
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
        .map(|e| {
            serde_json::json!({
                "path": e.path,
                "kind": e.kind.as_str(),
                "message": e.message,
            })
        })
        .collect();
    serde_json::json!({
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
