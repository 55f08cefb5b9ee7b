//! Typed events and results as data: what a pass tells its sinks (library level), and the JSON
//! objects `sync --json`, `watch --json` and `verify --json` print (binary level).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use dirsync::error::ErrorKind;
use dirsync::event::{Event, Recorded, Sink};
use dirsync::plan::Op;
use serde_json::Value;

/// Set in a copy of this test binary that runs one test as `nobody` (see [`as_nobody_or_not`]).
const CHILD_ROOT: &str = "DIRSYNC_EVENTS_CHILD_ROOT";

/// What a sink heard, shared with the test.
type Heard = Arc<Mutex<Vec<Recorded>>>;

/// One pass over the trees below `root` through the library, with a sink that records every
/// event (after `extra`, which may act on them).
fn pass_heard(
    root: &Path,
    extra: Option<Box<dyn Sink + Send>>,
) -> (dirsync::sync::Report, Vec<Recorded>) {
    let heard: Heard = Arc::default();
    let mut session = dirsync::sync::Session::open(&config_at(root)).unwrap();
    if let Some(extra) = extra {
        session.add_sink(extra);
    }
    session.add_sink(Box::new(heard.clone()));
    let report = session.sync(&AtomicBool::new(false)).unwrap();
    let heard = heard.lock().unwrap().clone();
    (report, heard)
}

fn summary_of(heard: &[Recorded]) -> &dirsync::event::Summary {
    match heard.last() {
        Some(Recorded::Summary(s)) => s,
        other => panic!("the last event is not the summary: {other:?}"),
    }
}

fn failures(heard: &[Recorded]) -> Vec<(String, ErrorKind)> {
    let f = heard.iter().filter_map(|e| match e {
        Recorded::Failed(e) => Some((e.path.clone(), e.kind)),
        _ => None,
    });
    f.collect()
}

fn problems(heard: &[Recorded]) -> Vec<(String, ErrorKind)> {
    let f = heard.iter().filter_map(|e| match e {
        Recorded::Problem(e) => Some((e.path.clone(), e.kind)),
        _ => None,
    });
    f.collect()
}

#[test]
fn a_pass_tells_its_sink_each_operation_and_sums_it_up() {
    let fx = Fixture::default();
    write(&fx.src.join("a.txt"), "0123456789");
    write(&fx.src.join("d/b.txt"), "x".repeat(20));
    symlink("a.txt", &fx.src.join("link"));
    let (report, heard) = pass_heard(&fx.root, None);
    assert_mirror(&fx.src, &fx.dst);
    assert_eq!(heard.first(), Some(&Recorded::Started), "{heard:#?}");
    // The scan's last word: every entry of both trees (the source root, 4 below it; the replica
    // root just made).
    let scanned: Vec<_> = heard
        .iter()
        .filter_map(|e| match e {
            Recorded::Scanned { source, replica } => Some((*source, *replica)),
            _ => None,
        })
        .collect();
    assert_eq!(scanned.last(), Some(&(5, 1)), "{heard:#?}");
    let planned = heard.iter().find_map(|e| match e {
        Recorded::Planned { ops, bytes } => Some((*ops, *bytes)),
        _ => None,
    });
    assert_eq!(planned, Some((report.plan.ops.len() as u64, 30)));
    // Each file written is one `Applied` with its bytes; every operation of the plan is there.
    let applied: Vec<(&Op, u64)> = heard
        .iter()
        .filter_map(|e| match e {
            Recorded::Applied { op, bytes } => Some((op, *bytes)),
            _ => None,
        })
        .collect();
    assert_eq!(applied.len(), report.plan.ops.len(), "{heard:#?}");
    let written: Vec<(String, u64)> = applied
        .iter()
        .filter(|(op, _)| matches!(op, Op::Write { .. }))
        .map(|(op, b)| (op.target().to_string(), *b))
        .collect();
    assert_eq!(written, [("a.txt".into(), 10), ("d/b.txt".into(), 20)]);
    let s = summary_of(&heard);
    assert_eq!(*s, report.totals());
    assert_eq!((s.created, s.bytes_written, s.errors), (4, 30, 0), "{s:?}");
    assert!(failures(&heard).is_empty() && problems(&heard).is_empty());

    // A pass with nothing to do applies nothing and says so.
    let (_, heard) = pass_heard(&fx.root, None);
    assert!(!heard.iter().any(|e| matches!(e, Recorded::Applied { .. })));
    let s = summary_of(&heard);
    assert_eq!(
        (s.created, s.bytes_written, s.planned, s.errors),
        (0, 0, 0, 0)
    );
}

/// Removes a source file once the plan is made: its copy finds it gone.
struct Vanish(PathBuf);

impl Sink for Vanish {
    fn event(&mut self, e: &Event) {
        if let Event::Planned { .. } = e {
            fs::remove_file(&self.0).unwrap();
        }
    }
}

#[test]
fn a_source_file_gone_after_the_plan_is_a_not_found_failure_and_the_rest_is_applied() {
    let fx = Fixture::default();
    write(&fx.src.join("keep"), "keep");
    write(&fx.src.join("sub/gone"), "gone");
    let vanish = Box::new(Vanish(fx.src.join("sub/gone")));
    let (report, heard) = pass_heard(&fx.root, Some(vanish));
    assert_eq!(
        failures(&heard),
        [("sub/gone".to_string(), ErrorKind::NotFound)],
        "{heard:#?}"
    );
    let failed = heard.iter().find_map(|e| match e {
        Recorded::Failed(e) => Some(e),
        _ => None,
    });
    assert!(
        failed.is_some_and(|e| e.message.contains("vanished from the source")),
        "{failed:?}"
    );
    assert_eq!(report.outcome.errors.len(), 1);
    let s = summary_of(&heard);
    assert_eq!((s.errors, s.not_made), (1, 1), "{s:?}");
    assert!(fx.dst.join("keep").exists() && !fx.dst.join("sub/gone").exists());
}

/// Runs `test` on a fixture root: as `nobody` when this process is root (a copy of this test
/// binary runs just `name`, as `nobody`, on a tree given to it), else in this process.
fn as_nobody_or_not(name: &str, fx: &Fixture, test: fn(&Path)) {
    if !is_root() {
        return test(&fx.root);
    }
    chown_tree(&fx.root);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ROOT, &fx.root)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success() && text(&out.stdout).contains("1 passed"),
        "as nobody: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn unreadable_paths_are_permission_denied(root: &Path) {
    let (report, heard) = pass_heard(root, None);
    let secret = root.join("src/secret").display().to_string();
    assert_eq!(
        problems(&heard),
        [(secret, ErrorKind::PermissionDenied)],
        "{heard:#?}"
    );
    assert_eq!(
        failures(&heard),
        [("sealed.txt".to_string(), ErrorKind::PermissionDenied)],
        "{heard:#?}"
    );
    // The operation failed while it ran; the scan's problems come after, then the summary.
    let at = |f: fn(&Recorded) -> bool| heard.iter().position(f).unwrap();
    assert!(
        at(|e| matches!(e, Recorded::Failed(_))) < at(|e| matches!(e, Recorded::Problem(_))),
        "{heard:#?}"
    );
    assert_eq!(summary_of(&heard).errors, 2);
    assert_eq!(report.error_count(), 2);
    assert!(root.join("dst/ok").exists());
}

#[test]
fn unreadable_source_paths_are_permission_denied_problems_and_failures() {
    if let Some(root) = std::env::var_os(CHILD_ROOT) {
        return unreadable_paths_are_permission_denied(Path::new(&root));
    }
    let fx = Fixture::default();
    write(&fx.src.join("ok"), "ok");
    write(&fx.src.join("sealed.txt"), "sealed");
    write(&fx.src.join("secret/x"), "x");
    set_mode(&fx.src.join("sealed.txt"), 0o000);
    set_mode(&fx.src.join("secret"), 0o000);
    as_nobody_or_not(
        "unreadable_source_paths_are_permission_denied_problems_and_failures",
        &fx,
        unreadable_paths_are_permission_denied,
    );
    set_mode(&fx.src.join("secret"), 0o755);
}

#[test]
fn the_log_file_says_a_failure_repeated_by_the_next_pass_once() {
    let fx = Fixture::default();
    let path = fx.root.join("ops.log");
    let mut log = dirsync::oplog::OpLog::open(Some(&path)).unwrap();
    let err = dirsync::error::PathError::new("a", ErrorKind::NoSpace, "a: no space".into());
    let passes: [&[Event]; 4] = [
        &[Event::Failed(&err)],
        &[Event::Failed(&err)],
        &[],
        &[Event::Failed(&err), Event::Problem(&err)],
    ];
    for pass in passes {
        log.event(&Event::Started);
        for e in pass {
            log.event(e);
        }
    }
    let text = fs::read_to_string(&path).unwrap();
    let said = text.lines().filter(|l| l.ends_with(" error a: no space"));
    assert_eq!(
        said.count(),
        3,
        "said in passes 1 and 4 (twice there):\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Binary level
// ---------------------------------------------------------------------------------------------

#[test]
fn sync_json_counts_match_the_tree() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "aaaa");
    write(&fx.src.join("b"), "bb");
    write(&fx.src.join("d/c"), "cccccc");
    write(&fx.src.join("d/e/f"), "f");
    let entries = snapshot(&fx.src).len() as u64;
    let first = fx.run("sync", &["--json"]).code(0);
    let v = pass_json(&first);
    assert_mirror(&fx.src, &fx.dst);
    let s = json_summary(&v);
    assert_eq!(
        (s.created, s.errors, s.not_made),
        (entries, 0, 0),
        "every entry below the root was created: {v}"
    );
    assert_eq!(v["bytes_written"], 13, "{v}");
    assert_eq!(v["exit"], 0, "{v}");
    assert!(v["duration_s"].as_f64().is_some_and(|d| d >= 0.0), "{v}");
    // The stderr summary is still there for people.
    assert!(
        stderr_of(&first).contains("synced: "),
        "{}",
        stderr_of(&first)
    );

    write(&fx.src.join("a"), "changed");
    fs::remove_file(fx.src.join("b")).unwrap();
    fs::rename(fx.src.join("d/c"), fx.src.join("moved")).unwrap();
    let s = json_summary(&pass_json(&fx.run("sync", &["--json", "-q"]).code(0)));
    assert_eq!(
        (s.modified, s.deleted, s.moved, s.created),
        (1, 1, 1, 0),
        "{s:?}"
    );
    assert_mirror(&fx.src, &fx.dst);
}

#[test]
fn sync_json_lists_each_error_with_its_path_and_kind_and_the_exit_status() {
    let fx = Fixture::default();
    write(&fx.src.join("ok"), "ok");
    write(&fx.src.join("secret/x"), "x");
    set_mode(&fx.src.join("secret"), 0o000);
    let args = ["sync", "--json"];
    let out = if is_root() {
        chown_tree(&fx.root);
        fx.nobody_cmd()
            .args(args)
            .args([&fx.src, &fx.dst])
            .output()
            .unwrap()
    } else {
        fx.std_cmd()
            .args(args)
            .args([&fx.src, &fx.dst])
            .output()
            .unwrap()
    };
    set_mode(&fx.src.join("secret"), 0o755);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exit"], 3, "{v}");
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{v}");
    assert_eq!(
        errors[0]["path"],
        fx.src.join("secret").display().to_string()
    );
    assert_eq!(errors[0]["kind"], "permission_denied", "{v}");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read"),
        "{v}"
    );
    assert_eq!(json_summary(&v).created, 1, "`ok` was synced: {v}");
}

#[test]
fn watch_json_prints_one_object_per_pass_that_did_something() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    let out_path = fx.root.join("watch.out");
    let mut child = fx
        .std_cmd()
        .args(["watch", "--json", "--interval", "100ms"])
        .args([&fx.src, &fx.dst])
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !ok() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("the first pass", &|| fx.dst.join("a").exists());
    // Idle passes print nothing; the next object is the pass that copies `b`.
    std::thread::sleep(Duration::from_millis(400));
    write(&fx.src.join("b"), "bb");
    wait_for("the pass copying b", &|| fx.dst.join("b").exists());
    std::thread::sleep(Duration::from_millis(300));
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = fs::read_to_string(&out_path).unwrap();
    let passes: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(passes.len(), 2, "{text}");
    for v in &passes {
        assert_eq!(
            (&v["version"], &v["kind"], &v["exit"]),
            (&1.into(), &"watch".into(), &0.into())
        );
    }
    assert_eq!(passes[1]["counts"]["created"], 1, "{text}");
    assert_eq!(passes[1]["bytes_written"], 2, "{text}");
}

#[test]
fn verify_json_lists_each_difference_with_its_kind() {
    let fx = Fixture::default();
    write(&fx.src.join("bad"), "good");
    write(&fx.src.join("gone"), "here");
    write(&fx.src.join("fine"), "fine");
    fx.sync().code(0);
    write(&fx.dst.join("bad"), "evil");
    fs::remove_file(fx.dst.join("gone")).unwrap();
    let out = fx.run("verify", &["--json"]).code(3);
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "one document: {lines:?}");
    let v: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        (&v["version"], &v["kind"], &v["exit"]),
        (&1.into(), &"verify".into(), &3.into())
    );
    let diffs: Vec<(&str, &str, &str)> = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let f = |k: &str| d[k].as_str().unwrap();
            (f("path"), f("fault"), f("kind"))
        })
        .collect();
    assert_eq!(
        diffs,
        [
            ("bad", "corrupt", "other"),
            ("gone", "missing", "not_found")
        ],
        "{v}"
    );
    assert_eq!(v["files_checked"], 2, "{v}");

    // With --repair --dry-run, each says what a repair would do.
    fs::remove_file(fx.src.join("gone")).unwrap();
    let out = fx.run("verify", &["--json", "--repair", "-n"]).code(3);
    let v: Value = serde_json::from_str(&stdout_lines(&out)[0]).unwrap();
    let d = &v["differences"];
    assert_eq!(
        (&d[0]["repair"], &d[1]["repair"]),
        (&"would_repair".into(), &"would_fail".into()),
        "{v}"
    );
    // The source no longer has what `gone` was written with.
    assert_eq!(d[1]["kind"], "changed_while_read", "{v}");
}

#[test]
fn status_json_says_its_version() {
    let fx = Fixture::default();
    write(&fx.src.join("a"), "a");
    let out = fx.run("status", &["--json"]).code(0);
    let v: Value = serde_json::from_str(&stdout_lines(&out).join("\n")).unwrap();
    assert_eq!(
        (&v["version"], &v["kind"]),
        (&1.into(), &"status".into()),
        "{v}"
    );
    assert!(v["summary"]["create"].as_u64().is_some(), "{v}");
}
