//! Dependencies between the library's modules run one way: the wire protocol and the
//! configuration know nothing of the actors, and the protocol and the login know nothing
//! of each other. Read from the sources, as `cargo modules` would.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The top-level modules of `crate::` that the Rust files at `path` (a file or a folder) name.
fn crate_modules_used(path: &Path) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for file in rust_files(path) {
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may use anything: only the code before them counts.
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code: String =
            text.lines().filter(|line| !line.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                used.extend(group.split(',').filter_map(|item| first_name(item.trim())));
            } else {
                used.extend(first_name(rest));
            }
        }
    }
    used
}

fn first_name(path: &str) -> Option<String> {
    let name: String = path.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty()).then_some(name)
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        files.extend(rust_files(&entry.unwrap().path()));
    }
    files.retain(|f| f.extension().is_some_and(|e| e == "rs"));
    files
}

#[test]
fn modules_depend_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules: &[(&str, &[&str])] = &[
        ("config", &["server", "client"]),
        ("cluster", &["server", "client"]),
        ("proto", &["auth", "server", "client", "config"]),
        ("auth.rs", &["proto", "server", "client", "config"]),
        ("seal.rs", &["auth", "proto", "server", "client", "config"]),
        ("session_key.rs", &["auth", "proto", "seal", "server", "client", "config"]),
    ];
    for (module, forbidden) in rules {
        let used = crate_modules_used(&src.join(module));
        assert!(
            !used.is_empty() || module.ends_with(".rs"),
            "{module}: no imports found; is the path right?"
        );
        for name in *forbidden {
            assert!(!used.contains(*name), "src/{module} uses crate::{name}; it must not (uses {used:?})");
        }
    }
}
