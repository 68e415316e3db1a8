//! `control install systemd` (the seed's step 3): the units it writes pass `systemd-analyze
//! verify`, and their `ExecStart=` lines, run as written (this machine's PID 1 is not systemd),
//! start a data plane and a control that links to it; starting a second data plane instance the
//! same way takes the first one's place (the upgrade path), and the first exits cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sluice_control::config::{Config, DataplaneConfig};
use sluice_control::demo::{find_bin, free_port};
use sluice_tests::{check_output, tail, wait_until, TestDir};

/// `systemd-analyze`, which must be there under CI=true (scripts/setup installs it).
fn systemd_analyze() -> Option<PathBuf> {
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but systemd-analyze is missing (run scripts/setup)");
    }
    found
}

/// The `ExecStart=` command of a unit, split as systemd splits it (the generator refuses paths
/// that would need quoting).
fn exec_start(unit: &str) -> Result<Vec<String>> {
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).context("no ExecStart=")?;
    Ok(line.split_whitespace().map(str::to_owned).collect())
}

fn spawn(argv: &[String], log: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    Ok(Command::new(&argv[0]).args(&argv[1..]).stdout(Stdio::null()).stderr(log).spawn()?)
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn units_verify_and_their_exec_lines_run_sluice() -> Result<()> {
    let dir = TestDir::new("systemd")?;
    let socket = dir.join("run/dataplane.sock");
    std::fs::create_dir_all(dir.join("run"))?;
    let mut cfg: Config = sluice_control::config::from_yaml(&format!("data_dir: {}", dir.join("data").display()))?;
    cfg.proxy_service.postgres_listen_addr = ([127, 0, 0, 1], free_port()?).into();
    cfg.auth_service.listen_addr = ([127, 0, 0, 1], free_port()?).into();
    cfg.dataplane = Some(DataplaneConfig { socket: socket.clone(), idle_timeout: Duration::ZERO });
    let config = dir.join("control.yaml");
    std::fs::write(&config, serde_saphyr::to_string(&cfg)?)?;

    let control = find_bin("control")?;
    let bin_dir = control.parent().context("no bin dir")?;
    let units = dir.join("units");
    let out = Command::new(&control)
        .arg("--config")
        .arg(&config)
        .args(["install", "systemd", "-o"])
        .arg(&units)
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()?;
    let said = check_output("control install systemd", &out)?;
    assert!(said.contains("sluice-dataplane@$(date +%s).service"), "no upgrade path told: {said}");
    let read = |name: &str| std::fs::read_to_string(units.join(name));
    let (slice, dp_unit, control_unit) =
        (read("sluice.slice")?, read("sluice-dataplane@.service")?, read("sluice-control.service")?);
    assert!(slice.contains("[Unit]"));
    for unit in [&dp_unit, &control_unit] {
        assert!(unit.lines().any(|l| l == "Slice=sluice.slice"), "{unit}");
    }

    if let Some(analyze) = systemd_analyze() {
        let files = ["sluice.slice", "sluice-dataplane@.service", "sluice-control.service"].map(|f| units.join(f));
        let out = Command::new(analyze)
            .arg("verify")
            .args(&files)
            .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
            .output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let ours: Vec<&str> = text.lines().filter(|l| l.contains("sluice")).collect();
        assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {text}");
    } else {
        eprintln!("systemd-analyze not installed: unit verification skipped (CI requires it)");
    }

    // The ExecStart lines as written. The slice's cgroup does not exist without systemd; make it
    // (and remove it after), so that the data plane attaches its counters where the unit says.
    let dp_argv = exec_start(&dp_unit)?;
    let cgroup =
        dp_argv.iter().position(|a| a == "--bpf-cgroup").and_then(|i| dp_argv.get(i + 1)).context("no --bpf-cgroup")?;
    let made_cgroup = !Path::new(cgroup).exists() && std::fs::create_dir(cgroup).is_ok();
    let result = (|| -> Result<()> {
        let first = spawn(&dp_argv, &dir.join("dataplane-1.log"))?;
        let mut procs = Killed(vec![first]);
        wait_until(Duration::from_secs(30), "the data plane's socket", || Ok(socket.exists().then_some(())))?;
        let control_argv = exec_start(&control_unit)?;
        assert_eq!(control_argv[1..], ["--config".to_owned(), config.display().to_string(), "start".to_owned()]);
        procs.0.push(spawn(&control_argv, &dir.join("control.log"))?);
        let linked = |n: usize| -> Result<()> {
            wait_until(Duration::from_secs(20), "control linked to the data plane", || {
                let log = std::fs::read_to_string(dir.join("control.log")).unwrap_or_default();
                Ok((log.matches("connected to the dataplane").count() >= n).then_some(()))
            })
            .map(|_| ())
            .with_context(|| tail(&dir.join("control.log"), 20))
        };
        linked(1)?;

        // A second instance, started the same way: it takes over and the first exits cleanly.
        procs.0.push(spawn(&dp_argv, &dir.join("dataplane-2.log"))?);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = procs.0[0].try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("the first data plane did not hand over: {}", tail(&dir.join("dataplane-2.log"), 20));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "the replaced data plane exited with {status}");
        assert!(
            procs.0[2].try_wait()?.is_none(),
            "the new data plane exited: {}",
            tail(&dir.join("dataplane-2.log"), 20)
        );
        assert!(procs.0[1].try_wait()?.is_none(), "control exited: {}", tail(&dir.join("control.log"), 20));
        linked(2)?;
        Ok(())
    })();
    if made_cgroup {
        let _ = std::fs::remove_dir(cgroup);
    }
    result
}
