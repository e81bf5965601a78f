//! `scripts/packages`, the one list of what podnet needs from the system, as the tests read it:
//! [`crate::require_tools`] refuses an unlisted tool, and [`listed_only_path`] gives a script a
//! PATH that holds nothing else, so a script that starts using a new command fails until the
//! command is listed.

use std::path::{Path, PathBuf};

/// One command (or file) of the list: its Debian package and the features that need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub package: String,
    pub features: Vec<String>,
    /// A command name, or an absolute path for a file that is not a command.
    pub name: String,
}

/// The path of `scripts/packages` in this checkout.
pub fn list_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/packages")
}

/// Parses the list: `PACKAGE FEATURE,FEATURE NAME...` a line, `#` comments and blank lines.
pub fn parse(text: &str) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(package), Some(features)) = (words.next(), words.next()) else {
            return Err(format!(
                "line {}: want PACKAGE FEATURES NAME...: {line}",
                i + 1
            ));
        };
        let features: Vec<String> = features.split(',').map(str::to_owned).collect();
        let names: Vec<&str> = words.collect();
        if names.is_empty() {
            return Err(format!("line {}: package {package} names nothing", i + 1));
        }
        items.extend(names.into_iter().map(|name| Item {
            package: package.to_owned(),
            features: features.clone(),
            name: name.to_owned(),
        }));
    }
    Ok(items)
}

/// The list of this checkout; panics naming the file when it cannot be read or parsed.
pub fn load() -> Vec<Item> {
    let path = list_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The items `feature` needs.
pub fn needed_by<'a>(items: &'a [Item], feature: &str) -> Vec<&'a Item> {
    items
        .iter()
        .filter(|i| i.features.iter().any(|f| f == feature))
        .collect()
}

/// Makes `dir` a PATH directory holding exactly the commands `features` need (symlinks to where
/// this machine has them) and returns it, so a script run with `PATH=dir` can use nothing else.
/// Panics when a listed command is not installed (run the script's own install first).
pub fn listed_only_path(features: &[&str], dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let items = load();
    for item in features.iter().flat_map(|f| needed_by(&items, f)) {
        if item.name.starts_with('/') {
            continue;
        }
        let target = crate::which(&item.name).unwrap_or_else(|| {
            panic!(
                "{} ({}) is listed for {features:?} but not installed",
                item.name, item.package
            )
        });
        let link = dir.join(&item.name);
        if !link.exists() {
            std::os::unix::fs::symlink(&target, &link).unwrap();
        }
    }
    dir.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_gives_one_item_per_name_with_its_package_and_features() {
        let items = parse("# c\n\niproute2  testbed,test  ip tc\nx test /usr/lib/f\n").unwrap();
        let names: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.package.as_str(), i.name.as_str()))
            .collect();
        assert_eq!(
            names,
            [("iproute2", "ip"), ("iproute2", "tc"), ("x", "/usr/lib/f")]
        );
        assert_eq!(items[0].features, ["testbed", "test"]);
        let for_testbed: Vec<&str> = needed_by(&items, "testbed")
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(for_testbed, ["ip", "tc"]);
    }

    #[test]
    fn a_line_without_names_is_refused_with_its_number() {
        let err = parse("a b c\npkg feature\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("pkg"), "{err}");
        assert!(parse("lonely\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn the_checked_in_list_parses_and_names_each_command_once() {
        let items = load();
        let mut names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a command is listed twice");
        assert!(
            names.contains(&"ip") && names.contains(&"etcd"),
            "{names:?}"
        );
    }
}
