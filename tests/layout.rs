//! The layout of the two binaries' crates, read from their source so that a new back edge
//! fails here, not in a review:
//! - both crates: `lib.rs` lists their modules in dependency order and each uses only those
//!   listed before it;
//! - the control plane: no top-level module uses one that uses it back (directly or through
//!   others), the CLI depends on no module of the control plane's own state or workflows, and
//!   no type is named in more than a third of its files (no hub every workflow reaches through);
//! - the proxy: message tags are spelled only in `protocol.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The source directory of the workspace crate `krate`.
fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(krate).join("src")
}

/// Every source file under `src` but the crate root and binaries: its top-level module, its
/// file name, and its code without its tests.
fn modules(src: &Path) -> Vec<(String, String, String)> {
    let mut files = Vec::new();
    let mut stack = vec![src.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let top = relative.components().next().unwrap().as_os_str().to_string_lossy();
            let module = top.trim_end_matches(".rs").to_owned();
            if matches!(module.as_str(), "lib" | "bin") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap().to_owned();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.push((module, name, code));
        }
    }
    files
}

/// Each top-level module of `src`, and the `crate::<name>` paths its code uses (`use
/// crate::{a, b}` included; names that are not modules, such as `crate::Shared`, too).
fn dependencies(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, _, code) in modules(src) {
        let used = deps.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + 7..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group.split('}').next().unwrap().split(',').collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name
                    .trim()
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
fn no_module_of_the_control_plane_uses_one_that_uses_it_back() {
    let deps = dependencies(&src("control"));
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
    let deps = dependencies(&src("control"));
    let cli = &deps["cli"];
    let allowed = ["httpc", "files"];
    let other: Vec<&String> = cli.iter().filter(|m| !allowed.contains(&m.as_str())).collect();
    assert!(other.is_empty(), "cli uses {other:?}");
}

/// The modules `krate`'s `lib.rs` doc comment lists, in its order ("//! - `name`: ...").
fn listed_order(krate: &str) -> Vec<String> {
    let lib = std::fs::read_to_string(src(krate).join("lib.rs")).unwrap();
    let list = lib.split("each using only those listed before it").nth(1).expect("the list");
    list.lines()
        .skip(1)
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| l.strip_prefix("//! - `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// Every module of `krate` is listed in its `lib.rs`, and uses only modules listed before it.
fn check_order(krate: &str, at_least: usize) {
    let order = listed_order(krate);
    let deps = dependencies(&src(krate));
    assert!(deps.len() >= at_least, "modules found: {deps:?}");
    let unlisted: Vec<&String> = deps.keys().filter(|m| !order.contains(m)).collect();
    assert!(unlisted.is_empty(), "modules missing from {krate}'s lib.rs list: {unlisted:?}");
    let stale: Vec<&String> = order.iter().filter(|m| !deps.contains_key(*m)).collect();
    assert!(stale.is_empty(), "{krate}'s lib.rs lists modules that do not exist: {stale:?}");
    let mut back_edges = Vec::new();
    for (at, module) in order.iter().enumerate() {
        for used in deps[module].iter().filter(|u| order.contains(u)) {
            if !order[..at].contains(used) {
                back_edges.push(format!("{module} -> {used}"));
            }
        }
    }
    assert!(back_edges.is_empty(), "{krate}: modules using ones listed after them: {back_edges:?}");
}

#[test]
fn every_proxy_module_uses_only_modules_listed_before_it_in_lib_rs() {
    check_order("proxy", 15);
}

#[test]
fn every_control_plane_module_uses_only_modules_listed_before_it_in_lib_rs() {
    check_order("control", 20);
}

/// How many of `krate`'s source files name `ty` in code (as a whole word; tests and comments
/// excluded).
fn files_naming(krate: &str, ty: &str) -> usize {
    modules(&src(krate))
        .iter()
        .map(|(_, _, code)| {
            code.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|code| {
            code.match_indices(ty).any(|(i, _)| {
                let before = code[..i].chars().next_back();
                let after = code[i + ty.len()..].chars().next();
                let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                !word(before) && !word(after)
            })
        })
        .count()
}

#[test]
fn no_control_plane_type_is_named_in_more_than_a_third_of_its_files() {
    let files = modules(&src("control")).len();
    let types: BTreeSet<String> = modules(&src("control"))
        .iter()
        .flat_map(|(_, _, code)| {
            code.lines()
                .filter_map(|l| {
                    let l = l.trim_start().strip_prefix("pub ")?;
                    let rest =
                        ["struct ", "enum ", "trait "].iter().find_map(|k| l.strip_prefix(k))?;
                    Some(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect())
                })
                .collect::<Vec<String>>()
        })
        .collect();
    assert!(types.len() >= 50, "types found: {types:?}");
    let hubs: Vec<String> = types
        .iter()
        .map(|t| (t, files_naming("control", t)))
        .filter(|(_, n)| n * 3 > files)
        .map(|(t, n)| format!("{t}: {n} of {files} files"))
        .collect();
    assert!(hubs.is_empty(), "types named in more than a third of the files: {hubs:?}");
}

#[test]
fn proxy_message_tags_are_spelled_only_in_the_protocol_module() {
    let mut spelled = Vec::new();
    for (_, name, code) in modules(&src("proxy")) {
        // The fuzz targets build raw inputs on purpose.
        if matches!(name.as_str(), "protocol.rs" | "fuzz.rs") {
            continue;
        }
        for (n, line) in code.lines().enumerate() {
            let raw_tag = line.as_bytes().windows(4).any(|w| {
                w[0] == b'b' && w[1] == b'\'' && w[2].is_ascii_alphanumeric() && w[3] == b'\''
            });
            if raw_tag && !line.trim_start().starts_with("//") {
                spelled.push(format!("{name}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(spelled.is_empty(), "raw tag bytes outside protocol.rs: {spelled:#?}");
}
