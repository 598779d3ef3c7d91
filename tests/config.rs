//! Every example config parses; every file under tests/config/valid parses; every file under
//! tests/config/invalid fails with the message its first line (`# expect: ...`) names, and that
//! message starts with the file's path.

use std::fs;
use std::path::{Path, PathBuf};

use portcullis::Config;

fn toml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn valid_configs_parse() {
    let files = toml_files("tests/config/valid");
    assert!(files.len() >= 3, "expected fixtures, found {files:?}");
    for file in files {
        let config = Config::load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(config.listeners() > 0, "{}", file.display());
    }
}

#[test]
fn example_configs_parse() {
    let files = toml_files("examples");
    assert!(!files.is_empty(), "examples/ should hold example configs");
    for file in files {
        Config::load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

#[test]
fn invalid_configs_fail_with_their_expected_message() {
    let files = toml_files("tests/config/invalid");
    assert!(files.len() >= 10, "expected fixtures, found {files:?}");
    let mut failures = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", file.display()));
        let err = match Config::load(&file) {
            Ok(c) => panic!("{} loaded but should fail: {c:?}", file.display()),
            Err(e) => e.to_string(),
        };
        let path = file.display().to_string();
        assert!(
            err.starts_with(&format!("{path}:")),
            "{path}: message does not name the file: {err}"
        );
        assert!(
            err.contains("; fix: "),
            "{path}: message gives no fix: {err}"
        );
        if !err.contains(expect) {
            failures.push(format!("{path}:\n  expected: {expect}\n  got:      {err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_missing_file_is_named() {
    let err = Config::load("no/such/file.toml").unwrap_err().to_string();
    assert!(
        err.starts_with("no/such/file.toml: cannot read the config file"),
        "{err}"
    );
}
