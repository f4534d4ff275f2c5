//! `tern firewall --nftables` output is accepted by `nft -c -f` (Debian package `nftables`),
//! for the defaults and for configs with specific addresses of both families. `nft -c`
//! talks netlink and needs root (CAP_NET_ADMIN): without nft or the privilege the test
//! fails when `CI` is set and is skipped with a loud message otherwise.

use std::io::Write;
use std::process::{Command, Stdio};

fn tern_firewall(sets: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
    cmd.args(["firewall", "--nftables"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run tern firewall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `nft -c -f -` on `rules`: Ok(()) when accepted, Err(message) when refused, None when
/// nft cannot run here.
fn nft_check(rules: &str) -> Option<Result<(), String>> {
    let child = Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "nft is missing (apt-get install nftables): {e}"
            );
            eprintln!("SKIPPED: nft not installed (apt-get install nftables)");
            return None;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() && err.contains("Operation not permitted") {
        assert!(
            std::env::var_os("CI").is_none(),
            "nft -c needs root here: {err}"
        );
        eprintln!("SKIPPED: nft -c needs CAP_NET_ADMIN: {err}");
        return None;
    }
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(err)
    })
}

#[test]
fn nftables_output_passes_nft_check() {
    let configs: [&[&str]; 3] = [
        &[],
        &[
            "turn.listen=[\"203.0.113.5:3478\", \"[2001:db8::5]:443\", \"127.0.0.1:3479\"]",
            "turn.relay_ip=[\"203.0.113.5\", \"2001:db8::5\"]",
            "turn.min_port=50000",
            "turn.max_port=50100",
            "metrics.listen=\"10.0.0.2:9641\"",
            "api.listen=\"[::]:8443\"",
        ],
        &["turn.listen=[\"0.0.0.0:3478\"]", "api.enabled=false"],
    ];
    for sets in configs {
        let rules = tern_firewall(sets);
        assert!(rules.contains("dport 3478"), "{rules}");
        match nft_check(&rules) {
            None => return,
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("nft -c refused the ruleset for {sets:?}: {e}\n{rules}"),
        }
    }
    // And the checker really checks: a broken ruleset is refused.
    if let Some(r) =
        nft_check("table inet filter { chain tern_input { udp dport 99999 accept } }\n")
    {
        assert!(r.is_err(), "nft -c accepted an invalid port");
    }
}
