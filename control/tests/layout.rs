//! The control plane's layout: no top-level module uses one that uses it back (directly or
//! through others), and the CLI depends on no module of the control plane's own state or
//! workflows. Read from the source, so a new back edge fails here, not in a review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module of each source file, and the `crate::<module>` paths its code (not its
/// tests) uses.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
            let module = top.trim_end_matches(".rs").to_owned();
            if matches!(module.as_str(), "lib" | "bin") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let used = deps.entry(module.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name != module && !name.is_empty() {
                    used.insert(name);
                }
            }
        }
    }
    deps
}

fn reaches(deps: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    while let Some(m) = stack.pop() {
        for next in deps.get(&m).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.clone()) {
                stack.push(next.clone());
            }
        }
    }
    false
}

#[test]
fn no_module_uses_one_that_uses_it_back() {
    let deps = dependencies();
    assert!(deps.len() >= 10, "modules found: {deps:?}");
    let cycles: Vec<String> = deps
        .iter()
        .flat_map(|(m, used)| used.iter().map(move |u| (m, u)))
        .filter(|(m, u)| reaches(&deps, u, m))
        .map(|(m, u)| format!("{m} -> {u}"))
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:?}\n{deps:#?}");
}

#[test]
fn the_cli_uses_the_api_types_and_leaves_only() {
    let deps = dependencies();
    let cli = &deps["cli"];
    let allowed = ["httpc", "files"];
    let other: Vec<&String> = cli.iter().filter(|m| !allowed.contains(&m.as_str())).collect();
    assert!(other.is_empty(), "cli uses {other:?}");
}
