//! The module layering of docs/ARCHITECTURE.md, checked on the source: every file may only
//! depend on files below it in the stack, so there are no import circles between files.
//!
//! A dependency is any crate-internal path in the code: `use` and `pub use` / `pub(crate) use`
//! (a re-export ties its file to the target as much as an import does), inline paths
//! (`crate::a::B`, `super::super::c`, `self::d`), relative paths through a module the file
//! imported or declared (`use crate::cache; cache::state::LayerState`), at any depth of nested
//! import groups. A path is followed to the file that defines its item: through
//! re-exports (`crate::CacheLayer` is `cache/layer.rs`, `crate::TieredStore` is
//! `store/tiered/tiers.rs`) and through `super` out of inline modules (`mod tests`).
//! Comments and string, char and raw-string literals are skipped by a small lexer, so they
//! neither hide nor fake a path.
//!
//! Not handled (none occur in src/): `#[path]` attributes, glob re-exports (`pub use a::*`,
//! whose names are taken for items of the re-exporting file), and paths built by macros.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The files from the top of the stack (what users build) to the bottom (what everything
/// reads). A file may depend only on files after it. `lib.rs` holds code (`__bench`) and the
/// crate's re-exports, so it is the top: it may reach anything, and nothing may reach it.
const STACK: &[&str] = &[
    "lib.rs",
    "cache/layer.rs",
    "cache/invalidate.rs",
    "cache/service.rs",
    "cache/future.rs",
    "cache/join.rs",
    "cache/lookup.rs",
    "cache/write.rs",
    "cache/answer.rs",
    "cache/body.rs",
    "cache/state.rs",
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
    "store/tiered/mod.rs",
    "store/tiered/builder.rs",
    "store/tiered/tiers.rs",
    "store/tiered/subscriber.rs",
    "store/tiered/near.rs",
    "store/tiered/bus.rs",
    "store/tiered/notice.rs",
    "store/tiered/glob.rs",
    "store/redis/mod.rs",
    "store/redis/builder.rs",
    "store/redis/health.rs",
    "store/redis/cluster.rs",
    "store/redis/scripts.rs",
    "store/redis/connection.rs",
    "store/redis/source.rs",
    "store/memory.rs",
    "store/mod.rs",
    "cache_control.rs",
    "settings.rs",
    "clock.rs",
    "observe.rs",
    "error.rs",
];

/// Module roots that only declare their submodules: checked to hold nothing but `mod`
/// declarations (and comments and attributes), so they have no dependencies to rank.
const DECLARE_ONLY: &[&str] = &["cache/mod.rs", "rules/mod.rs"];

/// Test modules, which may reach anywhere.
const TESTS: &[&str] = &["rules/tests.rs", "properties.rs"];

/// Upward re-exports that are allowed, as (file, target). None: the stores, their builders and
/// stats are re-exported by lib.rs (the top), not by `store/mod.rs` (the `Store` trait, below
/// the stores).
const ALLOWED_REEXPORTS: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of a Rust source that matter for paths: identifiers, `::` and punctuation.
/// Comments, literals (strings, raw strings, byte strings, chars) and lifetimes are dropped.
fn tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let ident_char = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i + 1);
        } else if (c == 'r' || (c == 'b' && at(i + 1) == 'r'))
            && !ident_char(at(i.wrapping_sub(1)))
            && {
                let start = if c == 'b' { i + 2 } else { i + 1 };
                let mut j = start;
                while at(j) == '#' {
                    j += 1;
                }
                at(j) == '"'
            }
        {
            // A raw string: r"..", r#".."#, br"..".
            let mut j = if c == 'b' { i + 2 } else { i + 1 };
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|k| at(j + 1 + k) == '#') {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
        } else if (c == 'b' || c == 'c') && at(i + 1) == '"' && !ident_char(at(i.wrapping_sub(1))) {
            i = skip_string(&chars, i + 2);
        } else if c == 'b' && at(i + 1) == '\'' && !ident_char(at(i.wrapping_sub(1))) {
            i = skip_char(&chars, i + 1).unwrap_or(i + 2);
        } else if c == '\'' {
            // A char literal, or a lifetime / label (dropped with its name).
            match skip_char(&chars, i) {
                Some(end) => i = end,
                None => {
                    i += 1;
                    while ident_char(at(i)) {
                        i += 1;
                    }
                }
            }
        } else if c == 'r' && at(i + 1) == '#' && ident_char(at(i + 2)) {
            // A raw identifier: r#type.
            let start = i + 2;
            i = start;
            while ident_char(at(i)) {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if ident_char(c) {
            let start = i;
            while ident_char(at(i)) {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token::PathSep);
            i += 2;
        } else {
            out.push(Token::Punct(c));
            i += 1;
        }
    }
    out
}

/// The index after a string whose contents start at `i`.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index after a char literal whose quote is at `i`, or `None` if it is a lifetime.
fn skip_char(chars: &[char], i: usize) -> Option<usize> {
    let at = |j: usize| chars.get(j).copied().unwrap_or('\0');
    if at(i + 1) == '\\' {
        let mut j = i + 3;
        while j < chars.len() && chars[j] != '\'' {
            j += 1;
        }
        Some(j + 1)
    } else if at(i + 2) == '\'' {
        Some(i + 3)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Parsing

/// One leaf of a `use` tree: the path as written and the name it binds (none for a glob).
#[derive(Debug, Clone)]
struct UseLeaf {
    path: Vec<String>,
    name: Option<String>,
}

/// Expands a `use` tree (the tokens between `use` and `;`), nested groups included.
fn use_leaves(tokens: &[Token]) -> Vec<UseLeaf> {
    fn tree(tokens: &[Token], i: &mut usize, prefix: &[String], out: &mut Vec<UseLeaf>) {
        let mut path = prefix.to_vec();
        loop {
            match tokens.get(*i) {
                Some(Token::PathSep) if path.len() == prefix.len() && path.is_empty() => {
                    // `use ::name`: an external crate.
                    path.push("::".to_owned());
                    *i += 1;
                }
                Some(Token::Ident(name)) => {
                    *i += 1;
                    if name == "as" {
                        if let Some(Token::Ident(alias)) = tokens.get(*i) {
                            *i += 1;
                            if let Some(last) = out.last_mut() {
                                last.name = Some(alias.clone());
                            }
                        }
                        return;
                    }
                    if name == "self" && path.len() == prefix.len() && !prefix.is_empty() {
                        // `a::{self}` binds `a`.
                        out.push(UseLeaf {
                            name: prefix.last().cloned(),
                            path: path.clone(),
                        });
                    } else {
                        path.push(name.clone());
                        if !matches!(tokens.get(*i), Some(Token::PathSep)) {
                            out.push(UseLeaf {
                                name: path.last().cloned(),
                                path: path.clone(),
                            });
                        }
                    }
                }
                Some(Token::PathSep) => *i += 1,
                Some(Token::Punct('*')) => {
                    *i += 1;
                    out.push(UseLeaf {
                        path: path.clone(),
                        name: None,
                    });
                    return;
                }
                Some(Token::Punct('{')) => {
                    *i += 1;
                    loop {
                        match tokens.get(*i) {
                            None => return,
                            Some(Token::Punct('}')) => {
                                *i += 1;
                                return;
                            }
                            Some(Token::Punct(',')) => *i += 1,
                            _ => {
                                let before = *i;
                                tree(tokens, i, &path, out);
                                if *i == before {
                                    *i += 1; // not a path: step over it
                                }
                            }
                        }
                    }
                }
                _ => return,
            }
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let before = i;
        tree(tokens, &mut i, &[], &mut out);
        if i == before {
            i += 1;
        }
    }
    out
}

/// Where a path was written: the module (file module plus inline modules) and whether it is
/// part of a re-export.
#[derive(Debug, Clone)]
struct Written {
    module: Vec<String>,
    path: Vec<String>,
    reexport: bool,
}

/// What one file says about paths.
#[derive(Debug, Default)]
struct FileFacts {
    /// Every path written, in `use` statements and inline, relative to where it was written.
    paths: Vec<Written>,
    /// Names bound to crate modules or items by `use` or `mod` (file-wide), with the path
    /// (relative to where it was written) and the module it was written in.
    aliases: BTreeMap<String, (Vec<String>, Vec<String>)>,
    /// Inline modules (`mod tests { .. }`), as absolute module paths.
    inline_modules: BTreeSet<Vec<String>>,
    /// Items re-exported by `pub use`: (module, name) -> the path (relative to `module`).
    reexports: BTreeMap<(Vec<String>, String), Vec<String>>,
}

fn module_of(file: &str) -> Vec<String> {
    let stem = file.strip_suffix(".rs").unwrap_or(file);
    let stem = stem
        .strip_suffix("/mod")
        .or_else(|| (stem == "lib").then_some(""))
        .unwrap_or(stem);
    stem.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn facts(file: &str, source: &str) -> FileFacts {
    let tokens = tokens(source);
    let own = module_of(file);
    let mut facts = FileFacts::default();
    // Inline modules open at a brace depth; `}` back to that depth closes them.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let module_here = |inline: &[(String, usize)]| {
        let mut m = own.clone();
        m.extend(inline.iter().map(|(n, _)| n.clone()));
        m
    };
    let mut i = 0;
    let ident = |i: usize| match tokens.get(i) {
        Some(Token::Ident(s)) => Some(s.as_str()),
        _ => None,
    };
    while i < tokens.len() {
        match &tokens[i] {
            Token::Punct('{') => {
                depth += 1;
                i += 1;
            }
            Token::Punct('}') => {
                depth = depth.saturating_sub(1);
                while inline.last().is_some_and(|(_, d)| *d > depth) {
                    inline.pop();
                }
                i += 1;
            }
            Token::Punct('#') => {
                // An attribute: skip `#[ .. ]` / `#![ .. ]` whole.
                let mut j = i + 1;
                if tokens.get(j) == Some(&Token::Punct('!')) {
                    j += 1;
                }
                if tokens.get(j) == Some(&Token::Punct('[')) {
                    let mut level = 0;
                    while j < tokens.len() {
                        match tokens[j] {
                            Token::Punct('[') => level += 1,
                            Token::Punct(']') => {
                                level -= 1;
                                if level == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        j += 1;
                    }
                    i = j + 1;
                } else {
                    i += 1;
                }
            }
            Token::Ident(word) if word == "mod" && ident(i + 1).is_some() => {
                let name = ident(i + 1).unwrap().to_owned();
                let here = module_here(&inline);
                facts.aliases.insert(
                    name.clone(),
                    (vec!["self".to_owned(), name.clone()], here.clone()),
                );
                if tokens.get(i + 2) == Some(&Token::Punct('{')) {
                    depth += 1;
                    inline.push((name.clone(), depth));
                    let mut m = here;
                    m.push(name);
                    facts.inline_modules.insert(m);
                    i += 3;
                } else {
                    i += 2;
                }
            }
            Token::Ident(word)
                if word == "use"
                    && matches!(
                        tokens.get(i + 1),
                        Some(Token::Ident(_) | Token::PathSep | Token::Punct('{'))
                    ) =>
            {
                // `pub use`, `pub(crate) use`, `pub(in path) use`: a re-export.
                let reexport = tokens[..i]
                    .iter()
                    .rev()
                    .take_while(|t| {
                        **t != Token::Punct(';')
                            && **t != Token::Punct('}')
                            && **t != Token::Punct('{')
                            && **t != Token::Punct(']')
                    })
                    .any(|t| *t == Token::Ident("pub".to_owned()));
                let mut end = i + 1;
                while end < tokens.len() && tokens[end] != Token::Punct(';') {
                    end += 1;
                }
                let here = module_here(&inline);
                for leaf in use_leaves(&tokens[i + 1..end]) {
                    if let Some(name) = &leaf.name {
                        if reexport {
                            facts
                                .reexports
                                .insert((here.clone(), name.clone()), leaf.path.clone());
                        }
                        facts
                            .aliases
                            .insert(name.clone(), (leaf.path.clone(), here.clone()));
                    }
                    facts.paths.push(Written {
                        module: here.clone(),
                        path: leaf.path,
                        reexport,
                    });
                }
                i = end + 1;
            }
            Token::Ident(first) if i == 0 || tokens[i - 1] != Token::PathSep => {
                // An inline path: `a::b::c` (candidates; resolved once aliases are known).
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while tokens.get(j) == Some(&Token::PathSep) {
                    match ident(j + 1) {
                        Some(next) => {
                            path.push(next.to_owned());
                            j += 2;
                        }
                        None => break, // `::<T>` or `::{`
                    }
                }
                if path.len() > 1 {
                    facts.paths.push(Written {
                        module: module_here(&inline),
                        path,
                        reexport: false,
                    });
                }
                i = j.max(i + 1);
            }
            _ => i += 1,
        }
    }
    facts
}

/// Whether a module root holds nothing but `mod` declarations (with visibility, attributes
/// and comments).
fn only_declares(source: &str) -> bool {
    let tokens = tokens(source);
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == Token::Punct('#') {
            let mut j = i + 1;
            if tokens.get(j) == Some(&Token::Punct('!')) {
                j += 1;
            }
            let mut level = 0;
            while j < tokens.len() {
                match tokens[j] {
                    Token::Punct('[') => level += 1,
                    Token::Punct(']') => {
                        level -= 1;
                        if level == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            i = j + 1;
            continue;
        }
        if tokens[i] == Token::Ident("pub".to_owned()) {
            i += 1;
            if tokens.get(i) == Some(&Token::Punct('(')) {
                while i < tokens.len() && tokens[i] != Token::Punct(')') {
                    i += 1;
                }
                i += 1;
            }
        }
        let declaration = tokens.get(i) == Some(&Token::Ident("mod".to_owned()))
            && matches!(tokens.get(i + 1), Some(Token::Ident(_)))
            && tokens.get(i + 2) == Some(&Token::Punct(';'));
        if !declaration {
            return false;
        }
        i += 3;
    }
    true
}

// ---------------------------------------------------------------------------------------
// Resolving

struct Crate {
    /// File (relative to src/, with `/`) -> what it says.
    files: BTreeMap<String, FileFacts>,
    /// Absolute module path -> the file that is that module.
    modules: BTreeMap<Vec<String>, String>,
}

impl Crate {
    /// The file an absolute module path lives in (inline modules live in their file).
    fn file_of(&self, module: &[String]) -> Option<&String> {
        (0..=module.len())
            .rev()
            .find_map(|n| self.modules.get(&module[..n]))
    }

    /// The absolute path of `path` written in `module` of `file`, or `None` if it leaves the
    /// crate (std, dependencies, locals).
    fn absolute(&self, file: &str, module: &[String], path: &[String]) -> Option<Vec<String>> {
        self.absolute_within(file, module, path, 0)
    }

    fn absolute_within(
        &self,
        file: &str,
        module: &[String],
        path: &[String],
        hops: usize,
    ) -> Option<Vec<String>> {
        let (first, rest) = path.split_first()?;
        let mut base: Vec<String> = match first.as_str() {
            "crate" => Vec::new(),
            "self" => module.to_vec(),
            "super" => {
                let mut m = module.to_vec();
                m.pop()?;
                m
            }
            "::" => return None,
            name => {
                let mut child = module.to_vec();
                child.push(name.to_owned());
                if self.modules.contains_key(&child)
                    || self.files[file].inline_modules.contains(&child)
                {
                    return Some(child.into_iter().chain(rest.iter().cloned()).collect());
                }
                // A name bound by `use`; one that leads back to itself (`use http;`, an
                // external crate) gives up after a few hops.
                let (alias_path, alias_module) = self.files[file].aliases.get(name)?;
                if hops >= 8 {
                    return None;
                }
                let mut full = self.absolute_within(file, alias_module, alias_path, hops + 1)?;
                full.extend(rest.iter().cloned());
                return Some(full);
            }
        };
        let mut rest = rest;
        while let Some((next, tail)) = rest.split_first() {
            match next.as_str() {
                "super" => {
                    base.pop()?;
                }
                "self" => {}
                _ => break,
            }
            rest = tail;
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file that defines the item (or is the module) at an absolute path, following
    /// re-exports.
    fn defining_file(&self, path: &[String], hops: usize) -> Option<String> {
        let mut module: Vec<String> = Vec::new();
        for (k, segment) in path.iter().enumerate() {
            let mut candidate = module.clone();
            candidate.push(segment.clone());
            let file = self.file_of(&module)?;
            if self.modules.contains_key(&candidate)
                || self.files[file].inline_modules.contains(&candidate)
            {
                module = candidate;
                continue;
            }
            if let Some(target) = self.files[file]
                .reexports
                .get(&(module.clone(), segment.clone()))
            {
                if hops < 8 {
                    if let Some(mut full) = self.absolute(file, &module, target) {
                        full.extend(path[k + 1..].iter().cloned());
                        return self.defining_file(&full, hops + 1);
                    }
                }
            }
            return Some(file.clone());
        }
        self.file_of(&module).cloned()
    }
}

/// Runs the check on a source tree; returns what is wrong, one line each.
fn check(src: &Path) -> Vec<String> {
    let mut paths = Vec::new();
    rust_files(src, &mut paths);
    let mut krate = Crate {
        files: BTreeMap::new(),
        modules: BTreeMap::new(),
    };
    let mut problems = Vec::new();
    for path in &paths {
        let name = path
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if !(STACK.contains(&name.as_str())
            || DECLARE_ONLY.contains(&name.as_str())
            || TESTS.contains(&name.as_str()))
        {
            problems.push(format!(
                "{name} is in none of STACK, DECLARE_ONLY, TESTS: place it in the layering"
            ));
        }
        let source = std::fs::read_to_string(path).unwrap();
        krate.modules.insert(module_of(&name), name.clone());
        krate.files.insert(name.clone(), facts(&name, &source));
    }
    for name in DECLARE_ONLY {
        let path = src.join(name);
        if path.exists() && !only_declares(&std::fs::read_to_string(path).unwrap()) {
            problems.push(format!(
                "{name} should only declare modules; code there escapes the layering"
            ));
        }
    }
    let rank: BTreeMap<&str, usize> = STACK.iter().enumerate().map(|(i, f)| (*f, i)).collect();
    for (name, facts) in &krate.files {
        let Some(&own) = rank.get(name.as_str()) else {
            continue;
        };
        for written in &facts.paths {
            let Some(absolute) = krate.absolute(name, &written.module, &written.path) else {
                continue;
            };
            let Some(target) = krate.defining_file(&absolute, 0) else {
                continue;
            };
            if target == *name {
                continue;
            }
            let Some(&theirs) = rank.get(target.as_str()) else {
                continue; // a declare-only module root, reached as a module (its items are
                          // reached through the alias and checked there), or a test file
            };
            if theirs > own {
                continue;
            }
            if written.reexport && ALLOWED_REEXPORTS.contains(&(name.as_str(), target.as_str())) {
                continue;
            }
            problems.push(format!(
                "{name} {} {} ({target})",
                if written.reexport {
                    "re-exports"
                } else {
                    "imports"
                },
                written.path.join("::")
            ));
        }
    }
    problems.sort();
    problems.dedup();
    problems
}

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

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_module_imports_from_a_module_above_it() {
    let problems = check(&src());
    assert!(
        problems.is_empty(),
        "dependencies pointing up the stack:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The check, on planted violations

/// A copy of src/ in a scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-redis-cache-architecture-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&src(), &dir);
        Self(dir)
    }

    /// Adds `line` to the top of `file` (after its module docs, which only `//!` lines are).
    fn plant(&self, file: &str, line: &str) {
        let path = self.0.join(file);
        let source = std::fs::read_to_string(&path).unwrap();
        let split = source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| l.len() + 1)
            .sum::<usize>();
        let planted = format!("{}{line}\n{}", &source[..split], &source[split..]);
        std::fs::write(&path, planted).unwrap();
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// Plants `line` in a fresh copy of src/ and returns what the check finds.
fn planted(tag: &str, file: &str, line: &str) -> Vec<String> {
    let scratch = Scratch::new(tag);
    scratch.plant(file, line);
    check(&scratch.0)
}

#[track_caller]
fn assert_caught(problems: &[String], expected: &str) {
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "expected a problem containing {expected:?}, got {problems:#?}"
    );
}

#[test]
fn an_unmodified_copy_passes() {
    let scratch = Scratch::new("clean");
    assert_eq!(check(&scratch.0), Vec::<String>::new());
}

#[test]
fn a_planted_upward_import_fails() {
    let found = planted("plain", "key.rs", "use crate::cache::state::LayerState;");
    assert_caught(
        &found,
        "key.rs imports crate::cache::state::LayerState (cache/state.rs)",
    );
}

#[test]
fn an_upward_import_in_a_nested_group_fails() {
    let found = planted(
        "nested",
        "key.rs",
        "use crate::{error::Error, cache::{answer::X_CACHE, state::{self, LayerState}}, settings::Rules};",
    );
    assert_caught(
        &found,
        "key.rs imports crate::cache::state::LayerState (cache/state.rs)",
    );
    assert_caught(
        &found,
        "key.rs imports crate::cache::state (cache/state.rs)",
    );
    assert_caught(
        &found,
        "key.rs imports crate::cache::answer::X_CACHE (cache/answer.rs)",
    );
}

#[test]
fn an_upward_import_through_super_super_fails() {
    let found = planted(
        "super-super",
        "store/memory.rs",
        "use super::super::cache::state::LayerState;",
    );
    assert_caught(
        &found,
        "store/memory.rs imports super::super::cache::state::LayerState",
    );
    // And inline, from a test module two levels down.
    let found = planted(
        "super-super-inline",
        "rules/date.rs",
        "mod inner { fn f() -> Option<super::super::super::cache::state::LayerState> { None } }",
    );
    assert_caught(
        &found,
        "rules/date.rs imports super::super::super::cache::state::LayerState",
    );
}

#[test]
fn an_upward_re_export_fails() {
    let found = planted(
        "pub-crate-use",
        "key.rs",
        "pub(crate) use crate::cache::state::LayerState;",
    );
    assert_caught(&found, "key.rs re-exports crate::cache::state::LayerState");
    let found = planted(
        "pub-use",
        "error.rs",
        "pub use crate::cache::layer::CacheLayer;",
    );
    assert_caught(
        &found,
        "error.rs re-exports crate::cache::layer::CacheLayer",
    );
}

#[test]
fn a_path_through_a_re_export_is_followed_to_its_file() {
    // `crate::CacheLayer` is lib.rs's re-export of cache/layer.rs.
    let found = planted("root-reexport", "key.rs", "use crate::CacheLayer;");
    assert_caught(&found, "key.rs imports crate::CacheLayer (cache/layer.rs)");
    // `crate::TieredStore` is lib.rs's re-export of store/tiered/mod.rs's re-export of
    // store/tiered/tiers.rs.
    let found = planted(
        "module-reexport",
        "store/redis/connection.rs",
        "type Above = crate::TieredStore<()>;",
    );
    assert_caught(
        &found,
        "store/redis/connection.rs imports crate::TieredStore (store/tiered/tiers.rs)",
    );
}

#[test]
fn an_upward_import_within_a_store_folder_fails() {
    // The files of a store folder are ranked too: the connection layer may not reach the
    // builder above it, nor the glob matcher the L1 state.
    let found = planted(
        "in-redis-folder",
        "store/redis/connection.rs",
        "use super::builder::RedisStoreBuilder;",
    );
    assert_caught(
        &found,
        "store/redis/connection.rs imports super::builder::RedisStoreBuilder (store/redis/builder.rs)",
    );
    let found = planted(
        "in-tiered-folder",
        "store/tiered/glob.rs",
        "use super::near::Near;",
    );
    assert_caught(
        &found,
        "store/tiered/glob.rs imports super::near::Near (store/tiered/near.rs)",
    );
    // And through the folder's `mod.rs`: `super::RedisStore` is defined in connection.rs,
    // below the scripts, so it passes, while `super::RedisStoreBuilder` does not.
    let found = planted(
        "through-folder-root",
        "store/redis/scripts.rs",
        "type Up = super::RedisStoreBuilder;",
    );
    assert_caught(
        &found,
        "store/redis/scripts.rs imports super::RedisStoreBuilder (store/redis/builder.rs)",
    );
}

#[test]
fn a_path_through_an_imported_module_fails() {
    let found = planted(
        "module-alias",
        "key.rs",
        "use crate::cache; type Above = cache::state::LayerState;",
    );
    assert_caught(
        &found,
        "key.rs imports cache::state::LayerState (cache/state.rs)",
    );
}

#[test]
fn lib_rs_is_the_top_and_module_roots_only_declare() {
    let found = planted("lib", "key.rs", "use crate::__bench::base_key;");
    assert_caught(&found, "key.rs imports crate::__bench::base_key (lib.rs)");
    let found = planted(
        "declare-only",
        "rules/mod.rs",
        "use crate::cache::state::LayerState;",
    );
    assert_caught(&found, "rules/mod.rs should only declare modules");
}

#[test]
fn comments_and_strings_neither_hide_nor_fake_a_path() {
    // A `//` inside a string does not end the line's code.
    let found = planted(
        "string-slashes",
        "key.rs",
        "const U: &str = \"http://x\"; use crate::cache::state::LayerState;",
    );
    assert_caught(&found, "key.rs imports crate::cache::state::LayerState");
    // A path in a comment or a string is no dependency.
    let scratch = Scratch::new("comment");
    scratch.plant(
        "key.rs",
        "// use crate::cache::state::LayerState;\n/* crate::cache::layer::CacheLayer */ const S: &str = \"crate::cache::layer::CacheLayer\";",
    );
    assert_eq!(check(&scratch.0), Vec::<String>::new());
}

#[test]
fn the_use_tree_parser_expands_nested_groups() {
    let parsed = |s: &str| -> Vec<(String, Option<String>)> {
        use_leaves(&tokens(s))
            .into_iter()
            .map(|l| (l.path.join("::"), l.name))
            .collect()
    };
    assert_eq!(
        parsed("crate::{a::{b, c::{self, d as e}}, f::*}"),
        vec![
            ("crate::a::b".to_owned(), Some("b".to_owned())),
            ("crate::a::c".to_owned(), Some("c".to_owned())),
            ("crate::a::c::d".to_owned(), Some("e".to_owned())),
            ("crate::f".to_owned(), None),
        ]
    );
}
