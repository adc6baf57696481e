//! The direction of the dependencies, checked: capture → dispatch → handler. Dispatch and the
//! handlers name no capture source, and the capture sources name no handler kind, so a third
//! source or a new kind touches only its own directory and the daemon's wiring.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    assert!(!found.is_empty(), "no sources under {}", dir.display());
    found
}

/// The lines of the files under `dirs` (relative to `src/`) that name a module path ending in
/// one of `modules` (`capture::`, …), as `file:line: text`.
fn naming(dirs: &[&str], modules: &[&str]) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut hits = Vec::new();
    for dir in dirs {
        let path = src.join(dir);
        let files = if path.is_dir() { sources(&path) } else { vec![path] };
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for (n, line) in text.lines().enumerate() {
                if modules.iter().any(|m| names(line, m)) {
                    hits.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    hits
}

/// Whether `line` names the module `module` as a path: `module::`, or `use …::module;`.
fn names(line: &str, module: &str) -> bool {
    line.match_indices(module).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = &line[at + module.len()..];
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && (after.starts_with("::") || after.starts_with(';'))
    })
}

#[test]
fn dispatch_and_the_handlers_name_no_capture_source() {
    let hits = naming(&["dispatch", "handler", "registry.rs"], &["capture", "ledger", "notify", "wal"]);
    assert!(hits.is_empty(), "dispatch or a handler names a capture source:\n{}", hits.join("\n"));
}

#[test]
fn the_capture_sources_name_no_handler_kind() {
    let kinds = ["handler", "amqp", "celery", "email", "exec", "log", "nats", "redis", "sql", "webhook"];
    let hits = naming(&["capture"], &kinds);
    assert!(hits.is_empty(), "a capture source names a handler kind:\n{}", hits.join("\n"));
}

#[test]
fn a_module_path_is_told_from_a_word() {
    assert!(names("use crate::capture::wal::Settled;", "capture"));
    assert!(names("use super::wal;", "wal"));
    assert!(names("    crate::capture::ledger::query::write(x)", "ledger"));
    assert!(!names("// the WAL capture: see ledger rows", "ledger"));
    assert!(!names("let wal_end = 1; // not a path", "wal"));
    assert!(!names("tracing::info!(x)", "log"));
    assert!(!names("let sql = format!(\"…\");", "sql"));
}
