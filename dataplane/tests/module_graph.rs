//! No module of the agent imports one that imports it back: the graph of `crate::` uses
//! between the top-level modules (their code, not their unit tests or comments) has no cycle,
//! so each layer can be read, tested and changed below the ones that use it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The code of a source file without its `#[cfg(test)] mod tests` and comment lines.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    body.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules each `crate::name` names in `code`.
fn uses(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// Module -> the modules it uses, for `src/*.rs` and the `sys/` directory as one module.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = if path.is_dir() {
            std::fs::read_dir(&path)
                .unwrap()
                .flatten()
                .map(|f| code(&std::fs::read_to_string(f.path()).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("\n")
        } else if name == "lib" || name == "main" {
            continue;
        } else {
            code(&std::fs::read_to_string(&path).unwrap())
        };
        let mut deps = uses(&text);
        deps.remove(&name);
        g.insert(name, deps);
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
    assert_eq!(
        uses("use crate::forward::{A};\nlet x = crate::sys::tun::X;"),
        BTreeSet::from(["forward".to_string(), "sys".to_string()])
    );
}
