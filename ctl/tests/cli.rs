//! The `tessera` binary as an operator runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

/// A `tessera-engine` process with its own data directory, killed and removed on drop.
struct Engine {
    child: std::process::Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Engine {
    /// Builds (if needed) and starts the engine binary of this workspace's build profile.
    fn start(targets: u16, capacity: &str) -> Engine {
        use std::io::BufRead;
        // This test binary is target/<profile>/deps/cli-*; the engine lands in target/<profile>/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "--quiet", "-p", "tessera-engine"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "cargo build -p tessera-engine failed");
        let dir = std::env::temp_dir().join(format!("tessera-cli-engine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("engine.toml");
        std::fs::write(
            &cfg,
            format!(
                "rank = 0\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ntargets = {targets}\ntarget_capacity = \"{capacity}\"\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(profile_dir.join("tessera-engine"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.contains("engine listening").then(|| l.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap().to_string())
            })
            .expect("the engine exited before listening");
        // Keep draining stderr so the engine never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Engine { child, addr, dir }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bench_engine_json(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = tessera(args);
    assert!(ok, "{err}");
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn bench_engine_updates_and_fetches_against_a_real_engine() {
    let e = Engine::start(2, "64MiB");
    let pid = e.child.id().to_string();
    let common = ["bench-engine", "--addr", &e.addr, "--targets", "2", "--range", "8m", "--engine-pid", &pid, "--json"];

    let mut args = common.to_vec();
    args.extend(["--op", "update", "--bs", "4k", "--qd", "8", "--ios", "2000"]);
    let r = bench_engine_json(&args);
    assert_eq!(r["op"], "update");
    assert_eq!(r["ios"], 2000, "{r}");
    assert_eq!(r["writes"], 2000, "{r}");
    assert_eq!(r["bytes"], 2000 * 4096, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let (p50, p99, max) = (r["lat_p50_us"].as_f64().unwrap(), r["lat_p99_us"].as_f64().unwrap(), r["lat_max_us"].as_f64().unwrap());
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{r}");
    assert!(r["iops"].as_f64().unwrap() > 0.0 && r["mib_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["engine_cpu_seconds"].as_f64().unwrap() >= 0.0, "{r}");

    // Fetch prefills the range first, so every byte read is stored data with valid checksums.
    let mut args = common.to_vec();
    args.extend(["--op", "fetch", "--bs", "128k", "--pattern", "seq", "--qd", "4", "--ios", "200", "--verify"]);
    let r = bench_engine_json(&args);
    assert_eq!(r["reads"], 200, "{r}");
    assert_eq!(r["bytes"], 200 * 131072, "{r}");
    assert_eq!(r["hole_bytes"], 0, "{r}");
    assert_eq!(r["verified_blocks"], 200 * 32, "{r}");
    assert!(r["prefill_seconds"].as_f64().unwrap() > 0.0, "{r}");

    // Without a prefill, a range nobody wrote reads as holes, and the report says so.
    let (ok, out, err) = tessera(&["bench-engine", "--addr", &e.addr, "--op", "fetch", "--no-prefill", "--ios", "10", "--range", "8m"]);
    assert!(ok, "{err}");
    assert!(out.contains("fetch rand bs=4096 qd=32 targets=1"), "{out}");

    let (ok, _, err) = tessera(&["bench-engine", "--addr", &e.addr, "--targets", "3", "--ios", "10"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--targets 3 but the engine"), "{err}");
}
