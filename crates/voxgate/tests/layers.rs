//! The server crate's layers point one way: no import cycle between its modules, at the level of
//! top-level modules (`ingest`, `fanout`, `bus`, `config`, ...) and of single files. Reads the
//! crate's sources and resolves every `crate::` and `super::` path to the module file it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`ingest::driver`) → the module paths its file refers to.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)] mod tests` (tests may
/// reach anywhere).
fn non_test_code(text: &str) -> String {
    let code = text
        .find("#[cfg(test)]\nmod tests")
        .map_or(text, |i| &text[..i]);
    code.lines()
        .map(|line| match line.find("//") {
            Some(i) if !line[..i].ends_with(':') => &line[..i], // not a URL's `://`
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Paths written as `crate::a::b` or `super::a` (also inside `use crate::{a, b}` groups).
fn referenced_paths(module: &str, code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (start, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        if start > 0 && ident(code[..start].chars().last().unwrap()) {
            continue;
        }
        let rest = &code[start..];
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        let mut segs: Vec<String> = rest[..end]
            .split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let mut base: Vec<String> = if module.is_empty() {
            Vec::new()
        } else {
            module.split("::").map(str::to_owned).collect()
        };
        match segs.first().map(String::as_str) {
            Some("crate") => {
                segs.remove(0);
                out.push(segs);
            }
            Some("super") => {
                while segs.first().map(String::as_str) == Some("super") {
                    segs.remove(0);
                    base.pop();
                }
                base.extend(segs);
                out.push(base);
            }
            _ => {}
        }
        // `use crate::x::{a, b::c}`: each group member is a path under `x`.
        if rest[end..].starts_with('{') {
            let group_end = rest[end..].find('}').map_or(rest.len(), |i| end + i);
            let prefix = out.pop().unwrap_or_default(); // the group's members, not its prefix
            for member in rest[end + 1..group_end].split(',') {
                let member = member.trim().split(' ').next().unwrap_or("");
                let mut p = prefix.clone();
                p.extend(
                    member
                        .split("::")
                        .filter(|s| !s.is_empty() && *s != "self")
                        .map(str::to_owned),
                );
                out.push(p);
            }
        }
    }
    out
}

/// The longest known module that a path starts with.
fn resolve(modules: &BTreeSet<String>, path: &[String]) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let modules: BTreeSet<String> = all.iter().map(|f| module_of(&src, f)).collect();
    let mut g = Graph::new();
    for file in &all {
        let module = module_of(&src, file);
        if module.is_empty() || module.starts_with("cli") {
            continue; // the crate root re-exports; the CLI is a client of everything
        }
        let text = std::fs::read_to_string(file).unwrap();
        let code = non_test_code(&text);
        let deps = g.entry(module.clone()).or_default();
        for path in referenced_paths(&module, &code) {
            if let Some(target) = resolve(&modules, &path) {
                if target != module && !target.is_empty() {
                    deps.insert(target);
                }
            }
        }
        deps.extend(children_used(&modules, &module, &code));
    }
    g
}

/// The child modules a parent's code uses (`child::item`), beyond declaring (`mod child;`) and
/// re-exporting (`pub use child::..`) them.
fn children_used(modules: &BTreeSet<String>, module: &str, code: &str) -> Vec<String> {
    let prefix = format!("{module}::");
    let children = modules
        .iter()
        .filter_map(|m| m.strip_prefix(&prefix))
        .filter(|rest| !rest.contains("::"));
    let uses: Vec<&str> = code
        .lines()
        .map(str::trim_start)
        .filter(|l| {
            !(l.starts_with("pub mod") || l.starts_with("mod ") || l.starts_with("pub use"))
        })
        .collect();
    children
        .filter(|child| {
            let needle = format!("{child}::");
            uses.iter().any(|l| {
                l.match_indices(&needle).any(|(i, _)| {
                    let before = l[..i].chars().last();
                    !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                        && !l[..i].ends_with("super::")
                        && !l[..i].ends_with("crate::")
                })
            })
        })
        .map(|child| format!("{prefix}{child}"))
        .collect()
}

/// A cycle in `g`, if any (depth-first search with colours).
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        node: &str,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for next in g.get(node).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                1 => {
                    let i = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[i..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(g, next, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in g.keys() {
        if state.get(node).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(g, node, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn top_level(g: &Graph) -> Graph {
    let top = |m: &str| m.split("::").next().unwrap().to_owned();
    let mut out = Graph::new();
    for (from, tos) in g {
        let deps = out.entry(top(from)).or_default();
        deps.extend(tos.iter().map(|t| top(t)).filter(|t| *t != top(from)));
    }
    out
}

#[test]
fn no_file_imports_a_module_that_imports_it_back() {
    let g = graph();
    assert!(
        g.contains_key("ingest::driver"),
        "the graph sees the crate: {g:?}"
    );
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle between files: {}", cycle.join(" -> "));
    }
}

#[test]
fn top_level_modules_point_one_way() {
    let g = top_level(&graph());
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle between modules: {}", cycle.join(" -> "));
    }
    let deps = |m: &str| g.get(m).cloned().unwrap_or_default();
    for lower in ["fanout", "bus", "config", "metrics", "policy"] {
        assert!(
            !deps(lower).contains("ingest") && !deps(lower).contains("app"),
            "{lower} must not depend on ingest or app: {:?}",
            deps(lower)
        );
    }
}

#[test]
fn the_checker_finds_a_cycle() {
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert!(find_cycle(&g).is_none());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    let paths = referenced_paths(
        "ingest::driver",
        "use super::client::ClientIo;\nuse crate::fanout::{registry::Consumers, Offer};",
    );
    let modules: BTreeSet<String> = ["ingest::client", "fanout", "fanout::registry"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let resolved: BTreeSet<_> = paths.iter().filter_map(|p| resolve(&modules, p)).collect();
    assert!(resolved.contains("ingest::client") && resolved.contains("fanout::registry"));
}
