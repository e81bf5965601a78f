//! Reading the workspace's own Rust sources, for the checks on its structure (import cycles,
//! the pure core): every crate's files, and their code without comments or unit tests.

use std::path::{Path, PathBuf};

/// The crates whose structure is checked, by directory under the workspace root.
pub const CRATES: [&str; 6] = ["proto", "client", "dataplane", "control", "bench", "tests"];

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, sorted, however deep.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// A source file's code: comments cut, and every `#[cfg(test)]` item (the unit tests) left out.
pub fn code(text: &str) -> String {
    let uncommented: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = uncommented.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // An item without a body (`use`, `mod x;`) ends at its `;`; any other at the brace
        // that closes its first `{`.
        let Some(open) = after.find(['{', ';']) else {
            rest = "";
            break;
        };
        if after[open..].starts_with(';') {
            rest = &after[open + 1..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_after_a_test_module_is_still_read() {
        let text =
            "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn t() { if x { y() } }\n}\nfn b() {} // c\n";
        let code = code(text);
        assert!(code.contains("fn a()") && code.contains("fn b()"), "{code}");
        assert!(!code.contains("fn t()") && !code.contains("// c"), "{code}");
    }

    #[test]
    fn a_test_only_import_hides_nothing_after_it() {
        let text = "#[cfg(test)]\nuse super::Stop;\nuse super::real;\nfn f() { g() }\n";
        let code = code(text);
        assert!(!code.contains("Stop"), "{code}");
        assert!(
            code.contains("use super::real;") && code.contains("fn f()"),
            "{code}"
        );
    }

    #[test]
    fn every_crate_of_the_workspace_is_listed() {
        let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
        let members = manifest
            .lines()
            .find_map(|l| l.strip_prefix("members = "))
            .expect("a members line");
        for name in CRATES {
            assert!(
                members.contains(&format!("\"{name}\"")),
                "{name}: {members}"
            );
        }
        assert_eq!(members.matches('"').count(), 2 * CRATES.len(), "{members}");
    }
}
