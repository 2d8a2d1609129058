//! The house rules that keep `src/` readable, checked on every run: no two modules import each
//! other (directly or round a loop), nothing above `backend` names the PKCS#11 or TPM libraries,
//! and no source file is over 600 lines without saying why in its header. (Function length is
//! clippy's `too_many_lines`, set to 120 in `clippy.toml`.)
//!
//! Imports are read from the source text: every `crate::` and `super::` path outside comments,
//! with `{...}` groups expanded, resolved to the deepest module that exists. A module using its
//! own ancestor or descendant is how Rust modules are built and is not counted; every other
//! reference is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
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

/// The module a file is: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`; `src/lib.rs` is ``.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The text without comments (a `//` to the end of its line); strings are left as they are.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expand `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e` (`self` names `a`).
fn expand(path: &str) -> Vec<String> {
    let Some(open) = path.find('{') else {
        return vec![path.trim_end_matches("::").to_owned()];
    };
    let head = path[..open].trim_end_matches("::");
    let inner = &path[open + 1..path.rfind('}').unwrap_or(path.len())];
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .flat_map(|i| {
            let i = i.split(" as ").next().unwrap_or(i).trim();
            if i == "self" {
                vec![head.to_owned()]
            } else {
                expand(&format!("{head}::{i}"))
            }
        })
        .collect()
}

/// Every `crate::...` and `super::...` path in `code`, as written.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(start) {
            let before = rest[..i].chars().next_back();
            let tail = &rest[i..];
            rest = &rest[i + start.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let (mut end, mut depth) = (0, 0);
            for (j, ch) in tail.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth > 0 => depth -= 1,
                    c if c.is_alphanumeric() || c == '_' || c == ':' => {}
                    ',' | ' ' | '\n' if depth > 0 => {}
                    _ if depth > 0 => {}
                    _ => break,
                }
                end = j + ch.len_utf8();
            }
            out.push(tail[..end].to_owned());
        }
    }
    out
}

/// The deepest known module a path from `from` names.
fn resolve(from: &str, path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let mut base: Vec<&str> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").collect()
    };
    let mut segs = path.split("::").filter(|s| !s.is_empty()).peekable();
    match segs.peek() {
        Some(&"crate") => {
            base.clear();
            segs.next();
        }
        Some(&"super") => {}
        _ => return None,
    }
    while segs.peek() == Some(&"super") {
        segs.next();
        base.pop()?;
    }
    let mut best = base.join("::");
    for s in segs {
        base.push(s);
        let candidate = base.join("::");
        if modules.contains(&candidate) {
            best = candidate;
        } else {
            break;
        }
    }
    Some(best)
}

fn related(a: &str, b: &str) -> bool {
    let within = |inner: &str, outer: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}::"))
    };
    within(a, b) || within(b, a)
}

/// Module -> modules it uses (ancestors and descendants left out).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = module_of(f);
        let text = code(&std::fs::read_to_string(f).unwrap());
        let set = edges.entry(from.clone()).or_default();
        for p in paths(&text) {
            for e in expand(&p) {
                if let Some(to) = resolve(&from, &e, &modules) {
                    if !related(&from, &to) {
                        set.insert(to);
                    }
                }
            }
        }
    }
    edges
}

/// The loops in `edges`: each strongly connected set of more than one module.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |start: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start.clone()];
        while let Some(m) = todo.pop() {
            for n in edges.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> =
        edges.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in edges.keys() {
        let scc: Vec<String> = edges
            .keys()
            .filter(|n| *n != m && reachable[m].contains(*n) && reachable[*n].contains(m))
            .cloned()
            .chain(std::iter::once(m.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if scc.len() > 1 && !out.contains(&scc) {
            out.push(scc);
        }
    }
    out
}

#[test]
fn the_reader_sees_imports_as_the_compiler_does() {
    assert_eq!(
        expand("crate::a::{self, b, c::{d, e as f}}"),
        [
            "crate::a",
            "crate::a::b",
            "crate::a::c::d",
            "crate::a::c::e"
        ]
    );
    let mods: BTreeSet<String> = ["a", "a::b", "c"].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        resolve("a::b", "super::super::c::Item", &mods),
        Some("c".into())
    );
    assert_eq!(resolve("c", "crate::a::b::f", &mods), Some("a::b".into()));
    assert_eq!(
        paths(&code(
            "use crate::x::{A, B};\nlet v = super::y::f(1); // crate::z"
        )),
        ["crate::x::{A, B}", "super::y::f"]
    );
    let looped: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycles(&looped), [vec!["a", "b", "c"]]);
}

#[test]
fn no_two_modules_import_each_other() {
    let found = cycles(&graph());
    assert!(found.is_empty(), "module import loops: {found:#?}");
}

#[test]
fn only_backend_names_the_device_libraries() {
    // The benchmark's raw measurement calls the libraries directly on purpose: it is the
    // baseline the daemon is compared with (its header says so).
    let allowed = src().join("cli/bench/raw");
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(src().join("backend")) && !f.starts_with(&allowed))
        .filter(|f| {
            let text = code(&std::fs::read_to_string(f).unwrap());
            text.contains("cryptoki") || text.contains("tss_esapi")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "{offenders:#?}");
}

#[test]
fn long_files_say_why() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let unexplained: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let lines = text.lines().count();
            let header: String = text
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .collect::<Vec<_>>()
                .join(" ");
            (lines > 600 && !header.contains("Over 600 lines because"))
                .then(|| format!("{}: {lines} lines", f.display()))
        })
        .collect();
    assert!(
        unexplained.is_empty(),
        "files over 600 lines whose header does not say why (\"Over 600 lines because ...\"): {unexplained:#?}"
    );
}

/// The import graph, for finding what closes a loop: `cargo test --test structure -- --ignored
/// --nocapture`.
#[test]
#[ignore]
fn print_edges() {
    for (k, v) in graph() {
        println!("{k} -> {v:?}");
    }
}
