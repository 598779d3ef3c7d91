//! The config loader on any text. Never a panic; every error names a place inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::Config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.to_string();
        }
        Err(e) => {
            let msg = e.to_string();
            let rest = msg
                .strip_prefix("fuzz.toml:")
                .expect("the origin starts the message");
            let mut parts = rest.splitn(3, ':');
            let line: usize = parts.next().unwrap().parse().expect("a line number");
            let col: usize = parts.next().unwrap().parse().expect("a column number");
            let lines: Vec<&str> = text.split('\n').collect();
            assert!(line >= 1 && line <= lines.len(), "line {line}: {msg}");
            let width = lines[line - 1].chars().count();
            assert!(
                col >= 1 && col <= width + 1,
                "column {col} of {width}: {msg}"
            );
        }
    }
});
