//! No module of any crate imports one that imports it back. The graph of `crate::`, `super::`
//! and `self::` paths between the modules of each crate (their code, not their unit tests or
//! comments) has no cycle, so each part can be read, tested and changed below the ones that use
//! it. Every file is a module (`server/replica.rs` is `server::replica`, `server/mod.rs` is
//! `server`), and a parent uses the children it declares: a child that names an item of its
//! parent's own file closes a cycle, so shared items live in a child of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use podnet_tests::source::{code, rust_files, workspace, CRATES};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module a file under `src` is, or `None` for a crate root (`lib.rs`, `main.rs`, a
/// binary under `bin/`), which declares modules rather than being used by them.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        return None;
    }
    Some(parts.join("::"))
}

/// The paths a use tree names, from just after `crate::`: `a::{b, c::d}` is `a::b` and
/// `a::c::d`; `self` in a group names the group's own path.
fn use_paths(text: &str) -> Vec<Vec<String>> {
    fn tree(s: &[u8], at: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        let mut segs = prefix;
        loop {
            while *at < s.len() && s[*at].is_ascii_whitespace() {
                *at += 1;
            }
            if *at < s.len() && s[*at] == b'{' {
                *at += 1;
                loop {
                    tree(s, at, segs.clone(), out);
                    while *at < s.len() && s[*at].is_ascii_whitespace() {
                        *at += 1;
                    }
                    match s.get(*at) {
                        Some(b',') => *at += 1,
                        Some(b'}') => {
                            *at += 1;
                            return;
                        }
                        _ => return,
                    }
                    while *at < s.len() && s[*at].is_ascii_whitespace() {
                        *at += 1;
                    }
                    if s.get(*at) == Some(&b'}') {
                        *at += 1;
                        return;
                    }
                }
            }
            let start = *at;
            while *at < s.len() && (s[*at].is_ascii_alphanumeric() || s[*at] == b'_') {
                *at += 1;
            }
            let ident = String::from_utf8_lossy(&s[start..*at]).into_owned();
            if ident.is_empty() {
                out.push(segs);
                return;
            }
            if ident != "self" {
                segs.push(ident);
            }
            if s[*at..].starts_with(b"::") {
                *at += 2;
            } else {
                out.push(segs);
                return;
            }
        }
    }
    let mut out = Vec::new();
    tree(text.as_bytes(), &mut 0, Vec::new(), &mut out);
    out
}

/// The modules `module`'s code names, each path cut to the longest module of `known` it
/// starts with.
fn uses(
    module: &str,
    is_dir_module: bool,
    code: &str,
    known: &BTreeSet<String>,
) -> BTreeSet<String> {
    let own: Vec<&str> = if module.is_empty() {
        Vec::new()
    } else {
        module.split("::").collect()
    };
    // `super::` of `a::b` (a.rs's child b.rs, or a/b.rs) is `a`; `self::` is the module.
    let _ = is_dir_module;
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("::") {
        let before = &code[..i];
        let word_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |p| p + 1);
        if word_start > 0 && before[..word_start].ends_with("::") {
            continue; // the middle of a path, read from its start
        }
        let base: Vec<String> = match &before[word_start..] {
            "crate" => Vec::new(),
            "self" => own.iter().map(|s| s.to_string()).collect(),
            "super" => {
                let mut base: Vec<String> = own.iter().map(|s| s.to_string()).collect();
                base.pop();
                let mut rest = &code[i + 2..];
                while let Some(r) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = r;
                }
                base
            }
            _ => continue,
        };
        let mut rest = &code[i + 2..];
        while let Some(r) = rest.strip_prefix("super::") {
            rest = r;
        }
        for path in use_paths(rest) {
            let full: Vec<String> = base.iter().cloned().chain(path).collect();
            let hit = (1..=full.len())
                .rev()
                .map(|n| full[..n].join("::"))
                .find(|m| known.contains(m));
            if let Some(m) = hit {
                if m != module {
                    found.insert(m);
                }
            }
        }
    }
    found
}

/// Module -> the modules it uses, for the crate whose sources are in `src`.
fn graph(src: &Path) -> Graph {
    let mut texts: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for file in rust_files(src) {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let is_dir = file.file_name().is_some_and(|n| n == "mod.rs");
        texts.insert(module, (is_dir, code(&text)));
    }
    let known: BTreeSet<String> = texts.keys().cloned().collect();
    let mut g = Graph::new();
    for (module, (is_dir, text)) in &texts {
        let mut deps = uses(module, *is_dir, text, &known);
        // A parent uses the children it declares.
        deps.extend(
            known
                .iter()
                .filter(|k| {
                    k.strip_prefix(module.as_str())
                        .and_then(|r| r.strip_prefix("::"))
                        .is_some_and(|r| !r.contains("::"))
                })
                .cloned(),
        );
        g.insert(module.clone(), deps);
    }
    g
}

/// A path `from` -> ... -> `to`, if there is one.
fn path(g: &Graph, from: &str, to: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(p) = stack.pop() {
        let last = p.last().unwrap().clone();
        for d in g.get(&last).into_iter().flatten() {
            if d == to {
                let mut found = p.clone();
                found.push(d.clone());
                return Some(found);
            }
            if g.contains_key(d) && seen.insert(d.clone()) {
                let mut next = p.clone();
                next.push(d.clone());
                stack.push(next);
            }
        }
    }
    None
}

fn cycles(g: &Graph) -> Vec<String> {
    g.iter()
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m, d)))
        .filter(|(_, d)| g.contains_key(*d))
        .filter_map(|(m, d)| path(g, d, m).map(|back| format!("{m} -> {}", back.join(" -> "))))
        .collect()
}

#[test]
fn no_crate_of_the_workspace_has_an_import_cycle() {
    let mut found = Vec::new();
    let mut sizes = BTreeMap::new();
    let mut graphs = BTreeMap::new();
    for name in CRATES {
        let g = graph(&workspace().join(name).join("src"));
        sizes.insert(name, g.len());
        found.extend(cycles(&g).into_iter().map(|c| format!("{name}: {c}")));
        graphs.insert(name, g);
    }
    // The graphs are read at all: known edges are there.
    assert!(
        sizes["dataplane"] >= 20 && sizes["control"] >= 15,
        "{sizes:?}"
    );
    let edge = |krate: &str, from: &str, to: &str| graphs[krate][from].contains(to);
    assert!(edge("dataplane", "agent::membership", "agent::state"));
    assert!(edge("control", "server::replica", "server::shared"));
    assert!(edge("control", "server::replica", "etcd"));
    assert!(edge("control", "server", "server::service"));
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn a_cycle_is_found_and_named() {
    let mut g = Graph::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    g.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    let found = cycles(&g);
    assert!(found.contains(&"a -> b -> c -> a".to_string()), "{found:?}");
    assert!(!found.iter().any(|c| c.starts_with("d ")), "{found:?}");
}

#[test]
fn paths_resolve_to_the_module_that_holds_the_item() {
    let known: BTreeSet<String> = [
        "core",
        "core::forward",
        "sys",
        "server",
        "server::shared",
        "server::file",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let code = "use crate::core::forward::{A};\nlet x = crate::sys::tun::X;\n\
                use super::{shared::Shared, file::{self, save}};\nuse crate::{core, sys::udp};";
    assert_eq!(
        uses("server::answer", false, code, &known),
        [
            "core",
            "core::forward",
            "server::file",
            "server::shared",
            "sys"
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<BTreeSet<_>>()
    );
    // A child naming an item of its parent's own file uses the parent.
    assert_eq!(
        uses("server::answer", false, "use super::Shared;", &known),
        BTreeSet::from(["server".to_string()])
    );
    let mut g = graph_of(&[("server", ""), ("server::answer", "use super::Shared;")]);
    assert_eq!(cycles(&g).len(), 2, "{g:?}");
    g.get_mut("server::answer").unwrap().clear();
    assert!(cycles(&g).is_empty());
}

/// A graph from (module, code) pairs, built as [`graph`] builds one from files.
fn graph_of(modules: &[(&str, &str)]) -> Graph {
    let known: BTreeSet<String> = modules.iter().map(|(m, _)| m.to_string()).collect();
    modules
        .iter()
        .map(|(m, text)| {
            let mut deps = uses(m, false, text, &known);
            deps.extend(
                known
                    .iter()
                    .filter(|k| {
                        k.strip_prefix(&format!("{m}::"))
                            .is_some_and(|r| !r.contains("::"))
                    })
                    .cloned(),
            );
            (m.to_string(), deps)
        })
        .collect()
}
