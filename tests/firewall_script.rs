//! `deploy/firewall.sh --nftables` applies `tern firewall`'s rules for real, inside a fresh
//! network namespace (`unshare -n`, needs root): the rules land in chain tern_input, the
//! input chain jumps there exactly once however often it runs, and without a yes nothing
//! is applied. Skipped with a message where namespaces or nft are not available.

use std::path::Path;
use std::process::Command;

fn in_netns(script: &str) -> Option<(bool, String)> {
    let probe = Command::new("unshare")
        .args(["-n", "nft", "list", "ruleset"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("SKIPPED: cannot run nft in a new network namespace here: {other:?}");
            return None;
        }
    }
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", script])
        .output()
        .expect("run unshare");
    Some((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn nftables_rules_apply_once_and_only_when_confirmed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fw = root.join("deploy/firewall.sh");
    let cfg = root.join("config/tern.example.toml");
    let tern = env!("CARGO_BIN_EXE_tern");
    let run = format!(
        "{} --nftables --config {} --tern {tern}",
        fw.display(),
        cfg.display()
    );

    // No confirmation (no terminal to answer): nothing applied, non-zero exit.
    let Some((ok, out)) = in_netns(&format!(
        "{run} </dev/null; echo rc=$?; echo ===; nft list ruleset"
    )) else {
        return;
    };
    assert!(ok, "{out}");
    let (script_out, ruleset) = out.split_once("===").unwrap();
    assert!(
        script_out.contains("not applied") && script_out.contains("rc=1"),
        "{out}"
    );
    assert!(
        !ruleset.contains("tern"),
        "applied without a yes: {ruleset}"
    );

    // Confirmed twice: rules present, one jump.
    let (ok, out) = in_netns(&format!(
        "{run} --yes >/dev/null && {run} --yes >/dev/null && nft list ruleset"
    ))
    .unwrap();
    assert!(ok, "{out}");
    assert_eq!(out.matches("jump tern_input").count(), 1, "{out}");
    assert!(out.contains("udp dport 3478 accept"), "{out}");
    assert!(out.contains("tcp dport 3478 accept"), "{out}");
    assert!(out.contains("udp dport 49152-65535 accept"), "{out}");
    assert!(!out.contains("9641"), "metrics port opened: {out}");
}
