//! One discovery poller per source across auth nodes (issue 12, item 3): two auth daemons share
//! one PostgreSQL and the same `discovery_service` matcher against moto; each source is polled
//! by exactly one of them (its lease), both serve the results, and when the poller is killed the
//! other one takes its sources over and finds a proxy created after the kill within two poll
//! intervals.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_tests::moto::{aws_env, skip_without_moto, spawn_control, Moto};
use sluice_tests::sluice_control::config::{Config, StorageConfig};
use sluice_tests::sluice_control::demo::{find_bin, AwsCreds, ControlProc};
use sluice_tests::{scrape, tail, wait_until, StoragePg, TestDir};

const POLL: Duration = Duration::from_secs(2);
const REGIONS: [&str; 2] = ["us-west-2", "eu-west-1"];

/// An auth node on the shared storage with the shared matcher, AWS pointed at moto.
fn auth_node(dir: &Path, storage: &StorageConfig, discovery: &serde_json::Value, moto: &Moto) -> ControlProc {
    let mut first = ControlProc::start(dir, Vec::new(), &AwsCreds::demo(), None).unwrap();
    first.proc.stop(nix::sys::signal::Signal::SIGTERM);
    let mut cfg: Config = first.config.clone();
    cfg.auth_service.storage = storage.clone();
    cfg.discovery_service = serde_json::from_value(discovery.clone()).unwrap();
    // Discovered databases are served (and listed) where a resource matcher selects them.
    cfg.db_service.resources = serde_json::from_value(json!([{"labels": {"sluice.dev/origin": "cloud"}}])).unwrap();
    spawn_control(dir, cfg, first.pg_port, first.api_port, &AwsCreds::demo(), moto).unwrap()
}

/// `sluice_discovery_lease_held{source=…}` values a node exports, by region; `None` until its
/// metrics endpoint answers.
fn lease_held(node: &ControlProc) -> Option<Vec<(String, u8)>> {
    let text = scrape(&node.metrics_url()?).ok()?;
    let mut out: Vec<(String, u8)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("sluice_discovery_lease_held{source=\""))
        .filter_map(|rest| {
            let (source, value) = rest.split_once("\"} ")?;
            let region = REGIONS.iter().find(|r| source.contains(&format!("/{r}/")))?;
            Some(((*region).to_owned(), value.trim().parse().ok()?))
        })
        .collect();
    out.sort();
    Some(out)
}

/// The discovered database names a node's admin CLI lists (`control db ls`).
fn db_names(node: &ControlProc, moto: &Moto, dir: &Path) -> Vec<String> {
    let mut cmd = Command::new(find_bin("control").unwrap());
    cmd.arg("--config").arg(&node.config_path).args(["db", "ls", "--format", "json"]);
    aws_env(&mut cmd, &AwsCreds::demo(), moto, dir);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "control db ls: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().cloned().unwrap_or_default();
    list.iter()
        .filter(|d| d["labels"]["sluice.dev/origin"] == "cloud")
        .filter_map(|d| d["name"].as_str().map(str::to_owned))
        .collect()
}

/// "N sources, polled here: M" from a node's `control status`: M.
fn polled_here(node: &ControlProc) -> usize {
    let out = Command::new(find_bin("control").unwrap())
        .arg("--config")
        .arg(&node.config_path)
        .arg("status")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    let line =
        status.lines().find(|l| l.starts_with("Discovery ")).unwrap_or_else(|| panic!("no discovery line in {status}"));
    assert!(line.contains(&format!("{} sources", REGIONS.len())), "{line}");
    line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// Lines of a node's log that report a finished poll of `region`.
fn polls(node_dir: &Path, region: &str) -> usize {
    let log = std::fs::read_to_string(node_dir.join("control.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains("discovery fetch done") && l.contains(&format!("/{region}/"))).count()
}

#[test]
fn one_node_polls_each_source_and_the_other_takes_over_when_it_dies() {
    if skip_without_moto() {
        return;
    }
    let dir = TestDir::new("discovery-lease").unwrap();
    let moto = Moto::start(&dir.join("moto"), 100).unwrap();
    let pg = StoragePg::start(&dir.join("storage")).unwrap();
    let kek = dir.join("kek");
    sluice_control::kek::generate_file(&kek).unwrap();
    let storage = pg.storage_config(&kek);
    let role = moto.admin("/_sluice/role", json!({"name": "sluice-discovery", "external_id": "ext"})).unwrap();
    let role = role["arn"].as_str().unwrap().to_owned();
    moto.admin("/_sluice/proxy", json!({"region": "us-west-2", "name": "orders"})).unwrap();
    moto.admin("/_sluice/proxy", json!({"region": "eu-west-1", "name": "eu-orders"})).unwrap();
    let discovery = json!({
        "poll_interval": format!("{}s", POLL.as_secs()),
        "aws": [{"types": ["rdsproxy"], "regions": REGIONS, "assume_role_arn": role, "external_id": "ext"}]
    });
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    let mut a = auth_node(&dir_a, &storage, &discovery, &moto);
    let mut b = auth_node(&dir_b, &storage, &discovery, &moto);
    let show = |what: &str| {
        format!(
            "{what}\n--- a:\n{}\n--- b:\n{}",
            tail(&dir_a.join("control.log"), 30),
            tail(&dir_b.join("control.log"), 30)
        )
    };

    // Each source is held by exactly one node, and both nodes say so.
    let (held_a, held_b) = wait_until(Duration::from_secs(20), "both nodes to report every source's lease", || {
        let (Some(ha), Some(hb)) = (lease_held(&a), lease_held(&b)) else { return Ok(None) };
        Ok((ha.len() == REGIONS.len() && hb.len() == REGIONS.len()).then_some((ha, hb)))
    })
    .unwrap_or_else(|e| panic!("{}", show(&e.to_string())));
    for ((region, va), (_, vb)) in held_a.iter().zip(&held_b) {
        assert_eq!(va + vb, 1, "{region}: held by a={va} b={vb}\n{}", show(""));
    }
    // Both serve what either found.
    for node in [&a, &b] {
        wait_until(Duration::from_secs(10), "both proxies listed", || {
            let names = db_names(node, &moto, dir.path());
            Ok((names.contains(&"orders".to_owned()) && names.contains(&"eu-orders".to_owned())).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{}", show(&e.to_string())));
    }
    // Over a few intervals only the holder polls: the other node's log has no poll of it.
    std::thread::sleep(POLL * 2 + Duration::from_millis(500));
    for ((region, va), _) in held_a.iter().zip(&held_b) {
        let (holder, other) = if *va == 1 { (&dir_a, &dir_b) } else { (&dir_b, &dir_a) };
        let (p_holder, p_other) = (polls(holder, region), polls(other, region));
        eprintln!("{region}: holder polled {p_holder} times, the other node {p_other}");
        assert!(p_holder >= 2, "{region}: the holder polled {p_holder} times\n{}", show(""));
        assert_eq!(p_other, 0, "{region}: the non-holder polled too\n{}", show(""));
    }

    // `control status` on each node tells how many sources it polls; together, all of them.
    let here: usize = [&a, &b].iter().map(|n| polled_here(n)).sum();
    assert_eq!(here, REGIONS.len(), "{}", show(""));

    // Kill the node holding us-west-2; a proxy created right after is found by the survivor.
    let west_on_a = held_a.iter().any(|(r, v)| r == "us-west-2" && *v == 1);
    let (victim, survivor) = if west_on_a { (&mut a, &b) } else { (&mut b, &a) };
    victim.proc.stop(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    moto.admin("/_sluice/proxy", json!({"region": "us-west-2", "name": "payments"})).unwrap();
    wait_until(POLL * 4, "the survivor to list the new proxy", || {
        Ok(db_names(survivor, &moto, dir.path()).contains(&"payments".to_owned()).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{}", show(&e.to_string())));
    let took = killed.elapsed();
    eprintln!("after SIGKILL of the poller, the survivor listed a new proxy in {took:?} (poll interval {POLL:?})");
    assert!(took <= POLL * 2 + Duration::from_millis(1500), "handover took {took:?}, over two intervals\n{}", show(""));
    let held = lease_held(survivor).expect("the survivor's metrics");
    assert!(held.iter().all(|(_, v)| *v == 1), "the survivor does not hold every source: {held:?}");
    assert_eq!(polled_here(survivor), REGIONS.len(), "control status of the survivor");
}
