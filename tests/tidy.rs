//! Tidy checks over the whole workspace: every Rust file opens with a `//!` doc saying what it
//! is (STYLE 14), no file outside the `sys` crate opts into unsafe code, and each crate keeps
//! its rule of dependency (`deps`).

#[path = "tidy/deps.rs"]
mod deps;

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn workspace() -> (PathBuf, Vec<PathBuf>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "found only {} Rust files under {}", files.len(), root.display());
    (root, files)
}

#[test]
fn every_rust_file_opens_with_a_module_doc() {
    let (_, files) = workspace();
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap_or_default().starts_with("//!"))
        .collect();
    assert!(missing.is_empty(), "these files lack a leading //! doc: {missing:#?}");
}

#[test]
fn unsafe_code_lives_only_in_the_sys_crate() {
    let (root, files) = workspace();
    // This file names the attribute it looks for.
    let allowed = [root.join("sys/src/lib.rs"), root.join("tests/tidy.rs")];
    let offenders: Vec<_> = files
        .iter()
        .filter(|f| !allowed.iter().any(|a| a.canonicalize().ok() == f.canonicalize().ok()))
        .filter(|f| std::fs::read_to_string(f).unwrap_or_default().contains("allow(unsafe_code)"))
        .collect();
    assert!(offenders.is_empty(), "unsafe code outside sys/src/lib.rs: {offenders:#?}");
}
