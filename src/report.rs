//! Human and JSON rendering of plans, for `status` and `sync --dry-run`.

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

/// The same as one JSON document.
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
    serde_json::json!({
        "changes": changes,
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
