//! The module layering of docs/ARCHITECTURE.md, checked on the source: every file may only
//! import (`use crate::…`, `use super::…`, or an inline `crate::…` path) from files below it
//! in the stack, so there are no import circles between files. Re-exports (`pub use`) are an
//! interface, not a dependency, and are not counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The files from the top of the stack (what users build) to the bottom (what everything
/// reads). A file may import only from files after it.
const STACK: &[&str] = &[
    "layer.rs",
    "invalidate.rs",
    "flow/service.rs",
    "flow/join.rs",
    "flow/lookup.rs",
    "flow/write.rs",
    "flow/answer.rs",
    "flow/body.rs",
    "flow/config.rs",
    "client.rs",
    "rules/conditional.rs",
    "rules/freshness.rs",
    "rules/request.rs",
    "rules/range.rs",
    "rules/vary.rs",
    "rules/tags.rs",
    "rules/date.rs",
    "coalesce.rs",
    "entry.rs",
    "key.rs",
    "store/tiered.rs",
    "store/redis.rs",
    "store/memory.rs",
    "store/mod.rs",
    "cache_control.rs",
    "settings.rs",
    "clock.rs",
    "observe.rs",
    "error.rs",
];

/// Files outside the stack: the crate root and module roots only declare and re-export;
/// tests and benchmarks helpers may reach anywhere.
const EXEMPT: &[&str] = &[
    "lib.rs",
    "flow/mod.rs",
    "rules/mod.rs",
    "rules/tests.rs",
    "properties.rs",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file a module path (`["flow", "write", "Thing"]`) resolves to.
fn resolve(segments: &[&str], files: &BTreeMap<String, usize>) -> Option<String> {
    let first = *segments.first()?;
    if let Some(second) = segments.get(1) {
        let nested = format!("{first}/{second}.rs");
        if files.contains_key(&nested) {
            return Some(nested);
        }
    }
    [format!("{first}.rs"), format!("{first}/mod.rs")]
        .into_iter()
        .find(|candidate| files.contains_key(candidate))
}

/// Every crate-internal path a file uses: `crate::a::b` and `super::b` (as `dir/b`), with
/// comments, doc comments and re-export lines left out. Grouped imports
/// (`use crate::{a, b::c}`) are expanded.
fn imports(file: &str, source: &str) -> Vec<Vec<String>> {
    let dir = file.rsplit_once('/').map(|(d, _)| d);
    let mut code = String::new();
    let mut in_pub_use = false;
    for line in source.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if trimmed.starts_with("pub use") || trimmed.starts_with("pub(crate) use") {
            in_pub_use = !trimmed.contains(';');
            continue;
        }
        if in_pub_use {
            in_pub_use = !trimmed.contains(';');
            continue;
        }
        code.push_str(line.split("//").next().unwrap_or(""));
        code.push('\n');
    }
    let mut found = Vec::new();
    for (prefix, base) in [("crate::", None), ("super::", dir)] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if prefix == "super::" && base.is_none() {
                continue; // `super` of a top-level file's test module: the file itself
            }
            // `a::b::{c, d::e}` (or a bare `{c, d}`) expands to one path per member.
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let path = &rest[..end];
            let heads: Vec<String> = match rest[end..].strip_prefix('{') {
                Some(group) if path.is_empty() || path.ends_with("::") => {
                    let close = group.find('}').unwrap_or(group.len());
                    group[..close]
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|member| format!("{path}{member}"))
                        .collect()
                }
                _ => vec![path.to_owned()],
            };
            for head in heads {
                let mut segments: Vec<String> =
                    base.map(|b| vec![b.to_owned()]).unwrap_or_default();
                segments.extend(
                    head.split("::")
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty() && s != "self"),
                );
                found.push(segments);
            }
        }
    }
    found
}

#[test]
fn no_module_imports_from_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let names: Vec<String> = paths
        .iter()
        .map(|p| {
            p.strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    for name in &names {
        assert!(
            STACK.contains(&name.as_str()) || EXEMPT.contains(&name.as_str()),
            "{name} is in neither STACK nor EXEMPT: place it in the layering"
        );
    }
    let rank: BTreeMap<String, usize> = STACK
        .iter()
        .enumerate()
        .map(|(i, f)| ((*f).to_owned(), i))
        .chain(EXEMPT.iter().map(|f| ((*f).to_owned(), usize::MAX)))
        .collect();
    let mut violations = Vec::new();
    for (path, name) in paths.iter().zip(&names) {
        let Some(&own) = rank.get(name).filter(|r| **r != usize::MAX) else {
            continue;
        };
        let source = std::fs::read_to_string(path).unwrap();
        for segments in imports(name, &source) {
            let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
            let Some(target) = resolve(&segments, &rank) else {
                continue; // an item of the crate root (`crate::Result`), re-exported from below
            };
            if target == *name {
                continue;
            }
            let theirs = rank[&target];
            if theirs != usize::MAX && theirs <= own {
                violations.push(format!("{name} imports {} ({target})", segments.join("::")));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports pointing up the stack:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_an_upward_import() {
    let found = imports(
        "rules/freshness.rs",
        "use crate::flow::write::X;\nuse super::vary::{a, b};\n",
    );
    assert_eq!(
        found,
        vec![
            vec!["flow", "write", "X"],
            vec!["rules", "vary", "a"],
            vec!["rules", "vary", "b"],
        ]
    );
}
