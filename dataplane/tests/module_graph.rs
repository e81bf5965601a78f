//! No module of the agent imports one that imports it back: the graph of `crate::` uses
//! between the top-level modules (their code, not their unit tests or comments) has no cycle,
//! so each layer can be read, tested and changed below the ones that use it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

mod common;
use common::code;

/// The modules `code` names with `crate::` paths: `core::x` and `agent::x` for the layers'
/// modules, the first segment for the rest (`datapath`, `cli`, `sys`, or `agent` itself when
/// an item of `agent/mod.rs` is named).
fn uses(code: &str, layered: &BTreeSet<String>) -> BTreeSet<String> {
    let segment = |rest: &str| {
        rest.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
    };
    code.match_indices("crate::")
        .filter_map(|(i, m)| {
            let rest = &code[i + m.len()..];
            let first = segment(rest);
            if first.is_empty() {
                return None;
            }
            let second = rest
                .strip_prefix(&format!("{first}::"))
                .map(segment)
                .unwrap_or_default();
            let nested = format!("{first}::{second}");
            Some(if layered.contains(&nested) {
                nested
            } else {
                first
            })
        })
        .collect()
}

/// Module -> the modules it uses. Every file is a module (`core/forward.rs` is
/// `core::forward`, `agent/mod.rs` is `agent`), `sys/` counts as one, and a parent uses the
/// children it declares, so a child that imports its parent back is a cycle too.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            for f in std::fs::read_dir(&path).unwrap().flatten() {
                let text = code(&std::fs::read_to_string(f.path()).unwrap_or_default());
                let stem = f.path().file_stem().unwrap().to_string_lossy().into_owned();
                let module = match (name.as_str(), stem.as_str()) {
                    ("sys", _) | (_, "mod") => name.clone(),
                    _ => format!("{name}::{stem}"),
                };
                texts.entry(module).or_default().push_str(&text);
            }
        } else if name != "lib" && name != "main" {
            texts.insert(name, code(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    let layered: BTreeSet<String> = texts.keys().filter(|k| k.contains("::")).cloned().collect();
    let mut g = BTreeMap::new();
    for (module, text) in &texts {
        let mut deps = uses(text, &layered);
        deps.remove(module);
        // A parent uses its children.
        deps.extend(
            layered
                .iter()
                .filter(|l| l.split("::").next() == Some(module.as_str()))
                .cloned(),
        );
        g.insert(module.clone(), deps);
    }
    g
}

/// A path `from` -> ... -> `to`, if there is one.
fn path(g: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
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

fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    g.iter()
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m, d)))
        .filter(|(_, d)| g.contains_key(*d))
        .filter_map(|(m, d)| path(g, d, m).map(|back| format!("{m} -> {}", back.join(" -> "))))
        .collect()
}

#[test]
fn the_dataplane_modules_import_no_cycle() {
    let g = graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(g.len() >= 20, "modules found: {g:?}");
    assert!(g["agent::membership"].contains("agent::state"), "{g:?}");
    let found = cycles(&g);
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn a_cycle_is_found_and_named() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    g.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    let found = cycles(&g);
    assert!(found.contains(&"a -> b -> c -> a".to_string()), "{found:?}");
    assert!(!found.iter().any(|c| c.starts_with("d ")), "{found:?}");
    let layered = BTreeSet::from(["core::forward".to_string()]);
    let code = "use crate::core::forward::{A};\nlet x = crate::sys::tun::X;\ncrate::agent::run";
    assert_eq!(
        uses(code, &layered),
        BTreeSet::from([
            "core::forward".to_string(),
            "sys".to_string(),
            "agent".to_string()
        ])
    );
}
