//! Which modules may import which: vendor modules and the shared settings
//! must not reach back into the config (nor settings into anything that
//! uses it), or the import circle config ↔ destinations comes back.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The `crate::…` paths `text` uses, in `use` lines or written out.
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, _)| {
            text[i + "crate::".len()..]
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Each file under `src/` with the top-level modules it names that it must not.
fn violations(root: &Path) -> Vec<String> {
    let src = root.join("src");
    let mut out = Vec::new();
    for file in sources(&src) {
        let rel = file
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        let forbidden: &[&str] = if rel == "settings.rs" {
            &["config", "sink", "destinations", "router"]
        } else if rel.starts_with("destinations/") {
            &["config"]
        } else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        for module in crate_paths(&text) {
            if forbidden.contains(&module.as_str()) {
                out.push(format!("src/{rel} uses crate::{module}"));
            }
        }
    }
    out
}

#[test]
fn vendor_modules_and_settings_do_not_import_the_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found = violations(root);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn a_vendor_importing_the_config_is_caught() {
    let dir = std::env::temp_dir().join(format!("switchyard-layering-{}", std::process::id()));
    let vendor = dir.join("src/destinations");
    std::fs::create_dir_all(&vendor).unwrap();
    std::fs::write(
        vendor.join("fax.rs"),
        "use crate::config::Config;\nuse crate::settings::Problem;\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("src/settings.rs"),
        "fn f() -> crate::sink::Thing { todo!() }\n",
    )
    .unwrap();
    // config.rs may import the destinations; that is the direction allowed.
    std::fs::write(
        dir.join("src/config.rs"),
        "use crate::destinations::Vendor;\n",
    )
    .unwrap();
    let found = violations(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.contains(&"src/destinations/fax.rs uses crate::config".to_string()));
    assert!(found.contains(&"src/settings.rs uses crate::sink".to_string()));
}
