//! `control demo --dir DIR` as a user runs it: it writes DIR/env, `eval "$(cat DIR/env)"; psql`
//! works, and SIGTERM stops the demo together with its PostgreSQL, emulator and control (and,
//! where MariaDB is installed, the MariaDB and MySQL emulator behind database `demo-mysql`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sluice_tests::sluice_control::demo::find_bin;
use sluice_tests::{env_get, mariadb_available, parse_env_exports, psql_query, tail, wait_until, TestDir};

/// Whether a process with this pid exists (zombies of other parents count as gone soon enough).
fn pid_alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// A child killed if the test fails before it is stopped.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn control_demo_serves_psql_and_stops_cleanly_on_sigterm() {
    let tmp = TestDir::new("demo").unwrap();
    let dir = tmp.join("demo");
    let log = tmp.join("demo.log");
    let mut demo = Guard(
        Command::new(find_bin("control").unwrap())
            .arg("demo")
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    let env_file = dir.join("env");
    let text = wait_until(Duration::from_secs(90), "the demo's env file", || {
        if let Ok(Some(status)) = demo.0.try_wait() {
            anyhow::bail!("control demo exited early ({status}):\n{}", tail(&log, 40));
        }
        // The file is written in one go, but make sure we do not read it half-written.
        Ok(std::fs::read_to_string(&env_file).ok().filter(|t| t.ends_with('\n') && t.contains("PGDATABASE")))
    })
    .unwrap();
    let env = parse_env_exports(&text).unwrap();
    assert_eq!(env_get(&env, "PGUSER").unwrap(), "alice");
    assert_eq!(psql_query(&env, "select current_user || '@' || current_database()").unwrap(), "alice@demo");
    // The metrics URL is written beside the env file and answers with Sluice's metrics.
    let url = std::fs::read_to_string(dir.join("metrics-url")).unwrap();
    let metrics = sluice_tests::scrape(url.trim()).unwrap();
    assert!(metrics.contains("sluice_sessions_started_total"), "{metrics}");

    let pg_dir = std::fs::read_to_string(dir.join("postgres-dir")).unwrap();
    let pidfile = std::path::Path::new(pg_dir.trim()).join("data").join("postmaster.pid");
    let pg_pid: i32 = std::fs::read_to_string(&pidfile).unwrap().lines().next().unwrap().trim().parse().unwrap();
    assert!(pid_alive(pg_pid), "PostgreSQL (pid {pg_pid}) is not running while the demo is");
    let control_port: u16 = env_get(&env, "PGPORT").unwrap().parse().unwrap();
    // With MariaDB installed the demo also serves a MySQL database on control's MySQL listener.
    let mariadb_pid = mariadb_available().then(|| {
        let config = std::fs::read_to_string(dir.join("control").join("control.yaml")).unwrap();
        assert!(config.contains("name: demo-mysql") && config.contains("protocol: mysql"), "{config}");
        assert!(config.contains("mysql_listen_addr: 127.0.0.1:"), "{config}");
        let pid: i32 =
            std::fs::read_to_string(dir.join("mariadb").join("mariadb.pid")).unwrap().trim().parse().unwrap();
        assert!(pid_alive(pid), "MariaDB (pid {pid}) is not running while the demo is");
        pid
    });

    kill(Pid::from_raw(demo.0.id() as i32), Signal::SIGTERM).unwrap();
    let signalled = Instant::now();
    let status = wait_until(Duration::from_secs(10), "control demo to exit", || Ok(demo.0.try_wait()?)).unwrap();
    eprintln!("control demo exited ({status}) {:.2?} after SIGTERM", signalled.elapsed());
    assert!(status.success(), "control demo exited with {status}:\n{}", tail(&log, 40));
    let left = Duration::from_secs(10).saturating_sub(signalled.elapsed());
    wait_until(left.max(Duration::from_millis(100)), "PostgreSQL to exit", || Ok((!pid_alive(pg_pid)).then_some(())))
        .unwrap();
    if let Some(pid) = mariadb_pid {
        wait_until(Duration::from_secs(5), "MariaDB to exit", || Ok((!pid_alive(pid)).then_some(()))).unwrap();
    }
    assert!(signalled.elapsed() <= Duration::from_secs(10), "stopping took {:?}", signalled.elapsed());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", control_port)).is_err(),
        "control still listens on {control_port} after the demo stopped"
    );
    // A PostgreSQL directory outside the demo's (under /tmp, when running as root) is removed.
    let pg_dir = std::path::Path::new(pg_dir.trim());
    if !pg_dir.starts_with(&dir) {
        assert!(!pg_dir.exists(), "the demo left its PostgreSQL directory {} behind", pg_dir.display());
    }
}
