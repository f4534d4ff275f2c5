//! `deploy/install.sh --root DIR` installs the expected tree with the right modes, a config
//! that loads and points at a fresh secret, and a second run changes nothing; files an
//! operator edited survive a re-run.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tern::config::Config;

/// SHA-256 of a file, by coreutils' sha256sum (the debug build's own SHA-256 is slow on a
/// 100 MB test binary).
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/install.sh")
}

fn install(root: &Path, extra: &[&str]) -> String {
    let out = Command::new("sh")
        .arg(script())
        .arg("--root")
        .arg(root)
        .args(["--binary", env!("CARGO_BIN_EXE_tern")])
        .args(extra)
        .output()
        .expect("run install.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "install.sh failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every path under `root` with its mode and, for files, the SHA-256 of its bytes.
fn tree(root: &Path) -> BTreeMap<String, (u32, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.insert(rel + "/", (mode, String::new()));
                walk(root, &p, out);
            } else {
                out.insert(rel, (mode, sha256(&p)));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn mode(t: &BTreeMap<String, (u32, String)>, path: &str) -> u32 {
    t.get(path)
        .unwrap_or_else(|| panic!("{path} not installed; tree: {:#?}", t.keys()))
        .0
}

#[test]
fn installs_the_tree_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let first_out = install(root, &[]);
    assert!(first_out.contains("Next steps"), "{first_out}");
    let first = tree(root);

    assert_eq!(mode(&first, "usr/local/bin/tern"), 0o755);
    assert_eq!(
        first["usr/local/bin/tern"].1,
        sha256(Path::new(env!("CARGO_BIN_EXE_tern")))
    );
    assert_eq!(mode(&first, "etc/tern/"), 0o750);
    assert_eq!(mode(&first, "etc/tern/secret"), 0o600);
    assert_eq!(mode(&first, "etc/tern/tern.toml"), 0o640);
    assert_eq!(mode(&first, "etc/systemd/system/tern.service"), 0o644);
    assert_eq!(
        mode(&first, "usr/local/share/tern/tern.example.toml"),
        0o644
    );
    // Nothing else: no temporary files left behind.
    let files: Vec<&String> = first.keys().filter(|k| !k.ends_with('/')).collect();
    assert_eq!(files.len(), 5, "{files:?}");

    // A fresh secret: 32 random bytes in base64.
    let secret = std::fs::read_to_string(root.join("etc/tern/secret")).unwrap();
    assert_eq!(secret.trim().len(), 44, "{secret:?}");
    let other = tempfile::tempdir().unwrap();
    install(other.path(), &[]);
    let secret2 = std::fs::read_to_string(other.path().join("etc/tern/secret")).unwrap();
    assert_ne!(secret, secret2, "two installs got the same secret");

    // The config is the example with secret_file set, and loads (secret path re-rooted).
    let toml_text = std::fs::read_to_string(root.join("etc/tern/tern.toml")).unwrap();
    assert!(toml_text.contains("\nsecret_file = [\"/etc/tern/secret\"]\n"));
    let secret_path = root.join("etc/tern/secret");
    let cfg = Config::load(
        Some(&root.join("etc/tern/tern.toml")),
        Vec::new(),
        &[format!(
            "turn.secret_file=[{:?}]",
            secret_path.display().to_string()
        )],
    )
    .unwrap();
    assert_eq!(cfg.turn_secrets().unwrap(), vec![secret.trim().to_string()]);

    let unit = std::fs::read_to_string(root.join("etc/systemd/system/tern.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/tern serve --config /etc/tern/tern.toml"));

    // Second run: byte-for-byte and mode-for-mode the same tree.
    install(root, &[]);
    assert_eq!(tree(root), first, "second run changed the tree");

    // The operator edits config, secret and unit; a re-run keeps all three.
    let edited_cfg = toml_text.replace("# realm = \"tern\"", "realm = \"turn.example.org\"");
    std::fs::write(root.join("etc/tern/tern.toml"), &edited_cfg).unwrap();
    std::fs::write(root.join("etc/tern/secret"), "operator-secret\n").unwrap();
    let edited_unit = unit.replace("WatchdogSec=30s", "WatchdogSec=60s");
    std::fs::write(root.join("etc/systemd/system/tern.service"), &edited_unit).unwrap();
    let before = tree(root);
    let out = install(root, &[]);
    assert_eq!(tree(root), before, "re-run changed operator-edited files");
    assert!(out.contains("kept your edited"), "{out}");
}

#[test]
fn prefix_moves_the_binary_and_the_unit_follows() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), &["--prefix", "/opt/tern"]);
    let t = tree(dir.path());
    assert_eq!(mode(&t, "opt/tern/bin/tern"), 0o755);
    let unit = std::fs::read_to_string(dir.path().join("etc/systemd/system/tern.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/tern/bin/tern serve"));
    assert!(unit.contains("ExecStartPre=/opt/tern/bin/tern check-config"));
    assert!(!unit.contains("/usr/local/bin/tern"));
}
