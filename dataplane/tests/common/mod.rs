//! Reading the crate's own sources for the structure checks (`pure_core.rs`,
//! `module_graph.rs`).

/// The code of a Rust source file: without its `#[cfg(test)]` modules (each cut out up to its
/// closing brace, so code after one is still read) and without `//` comments.
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
        // The test module's body: from its first `{` to the brace that closes it.
        let Some(open) = after.find('{') else {
            rest = "";
            break;
        };
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

#[test]
fn code_after_a_test_module_is_still_read() {
    let text =
        "fn a() {}\n#[cfg(test)]\nmod tests {\n    fn t() { if x { y() } }\n}\nfn b() {} // c\n";
    let code = code(text);
    assert!(code.contains("fn a()") && code.contains("fn b()"), "{code}");
    assert!(!code.contains("fn t()") && !code.contains("// c"), "{code}");
}
