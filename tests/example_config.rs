//! `config/tern.example.toml` must document every key of `tern::config::Config` with its true
//! default, so an operator can trust it and a key added without documentation fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tern::config::Config;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tern.example.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example_path()).expect("config/tern.example.toml is readable")
}

fn load(path: &Path) -> Config {
    Config::load(Some(path), Vec::new(), &[])
        .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()))
}

fn serialized(c: &Config) -> String {
    toml::to_string(c).expect("config serializes")
}

/// A documented default: `# key = value` at the start of a line (one `# `, no indentation;
/// indented comment lines are free-form examples).
fn default_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("# ")?;
    let (key, value) = rest.split_once(" = ")?;
    let is_key = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    is_key.then_some((key, value))
}

/// `[section]` or `[section.sub]` header lines.
fn header(line: &str) -> Option<&str> {
    let name = line.trim_end().strip_prefix('[')?.strip_suffix(']')?;
    (!name.starts_with('[')).then_some(name)
}

/// `section.key` for every key the example documents.
fn documented_keys(text: &str) -> Vec<String> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(h) = header(line) {
            section = h.to_string();
        } else if let Some((key, _)) = default_line(line) {
            out.push(format!("{section}.{key}"));
        }
    }
    out
}

/// `section.key` for every key of the serialized default config, nested tables included.
fn default_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(&path, t, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let table: toml::Table = serialized(&Config::default()).parse().unwrap();
    let mut out = BTreeSet::new();
    walk("", &table, &mut out);
    out
}

#[test]
fn example_as_shipped_is_valid_and_equals_the_defaults() {
    let c = load(&example_path());
    assert_eq!(serialized(&c), serialized(&Config::default()));
}

#[test]
fn documented_defaults_are_the_real_defaults() {
    // Uncomment every `# key = value` line: the result must still be exactly the defaults.
    let version = format!("tern/{}", env!("CARGO_PKG_VERSION"));
    let mut uncommented = 0;
    let text: String = example_text()
        .lines()
        .map(|line| match default_line(line) {
            Some((key, value)) => {
                uncommented += 1;
                format!("{key} = {}\n", value.replace("tern/VERSION", &version))
            }
            None => format!("{line}\n"),
        })
        .collect();
    assert_eq!(
        uncommented,
        default_keys().len(),
        "one default line per key"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all-set.toml");
    std::fs::write(&path, &text).unwrap();
    let c = load(&path);
    assert_eq!(
        serialized(&c),
        serialized(&Config::default()),
        "a value in config/tern.example.toml differs from the built-in default"
    );
}

#[test]
fn every_key_is_documented_once_with_a_comment() {
    let text = example_text();
    let documented = documented_keys(&text);
    let unique: BTreeSet<String> = documented.iter().cloned().collect();
    assert_eq!(unique.len(), documented.len(), "a key is documented twice");
    let missing: Vec<_> = default_keys().difference(&unique).cloned().collect();
    assert!(
        missing.is_empty(),
        "keys missing from config/tern.example.toml: {missing:?}"
    );
    let stale: Vec<_> = unique.difference(&default_keys()).cloned().collect();
    assert!(
        stale.is_empty(),
        "documented keys that do not exist: {stale:?}"
    );

    // Each default line follows a one-line explanation (a comment that is not itself a key).
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some((key, _)) = default_line(line) {
            let prev = if i > 0 { lines[i - 1] } else { "" };
            let explained =
                prev.starts_with("# ") && default_line(prev).is_none() && prev.len() > 4;
            assert!(explained, "`{key}` has no comment line above it");
        }
    }
}
