//! The `tessera` binary as an operator runs it.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn tessera(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn default_config_round_trips_through_check() {
    let (ok, toml, _) = tessera(&["nvmf", "default-config"]);
    assert!(ok);
    let path = std::env::temp_dir().join(format!("tessera-cli-{}.toml", std::process::id()));
    std::fs::write(&path, toml).unwrap();
    let (ok, out, _) = tessera(&["nvmf", "check-config", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert!(ok);
    assert!(out.contains("127.0.0.1:4420"), "{out}");
    assert!(out.contains("nsid 1: Malloc 1024 MiB"), "{out}");
}

#[test]
fn bad_input_gives_one_line_and_nonzero_exit() {
    let (ok, _, err) = tessera(&["nvmf", "check-config", "/nonexistent/x.toml"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("tessera: cannot read /nonexistent/x.toml"), "{err}");
    let (ok, _, err) = tessera(&["frobnicate"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unrecognized subcommand"), "{err}");
}

#[test]
fn bench_wire_runs_with_a_server_process_and_in_process() {
    for mode in [&[][..], &["--in-process"][..]] {
        let mut args = vec!["bench-wire", "--req", "72", "--resp", "4120", "--qd", "4", "--time", "0.2", "--json"];
        args.extend_from_slice(mode);
        let (ok, out, err) = tessera(&args);
        assert!(ok, "{err}");
        let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert!(r["ops"].as_u64().unwrap() > 0, "{out}");
        assert_eq!(r["server"], if mode.is_empty() { "separate process" } else { "in-process" });
    }
}
