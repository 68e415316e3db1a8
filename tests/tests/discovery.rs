//! RDS Proxy discovery against a real AWS API emulator (moto, patched by
//! tests/support/moto_server.py to behave like AWS): several regions, tag filters, custom endpoints,
//! a MYSQL-family proxy and endpoint listed as `protocol: mysql` with their labels (SQLSERVER skipped),
//! an assumed role with the right external id and one with a wrong one, throttling and 500s that
//! keep resources (marked stale), deletion that removes them, a psql session to a discovered proxy
//! through the RDS Proxy emulator with a token signed by assumed-role credentials; and the IAM
//! policy `control configure bootstrap` attaches in moto equals what `--manual` prints; and
//! same-named proxies in two regions and two accounts, each listed and reached under its own name.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use sluice_tests::moto::{
    aws_env, skip_without_moto, spawn_control, start_emulator_for, start_mysql_emulator_for, Moto,
};
use sluice_tests::sluice_control::config::Config;
use sluice_tests::sluice_control::demo::{find_bin, AwsCreds};
use sluice_tests::{
    check_output, parse_env_exports, psql, role, skip_without_mariadb, tail, wait_until, Harness, MariaDb, TestDir,
};

const ACCOUNT: &str = "123456789012";

/// The tests here run one at a time: a moto server binding port 0 in one could take a port the
/// other's stack picked with `free_port` but has not bound yet.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn control_cli(cfg_path: &std::path::Path, moto: &Moto, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(find_bin("control").unwrap());
    cmd.arg("--config").arg(cfg_path).args(args);
    aws_env(&mut cmd, &AwsCreds::demo(), moto, dir);
    cmd.output().unwrap()
}

/// Restarts control on `cfg` with AWS pointed at moto, gives alice a role for env=prod
/// databases too, and logs her in; returns control's config path.
fn restart_with_discovery(h: &mut Harness, cfg: Config, moto: &Moto) -> std::path::PathBuf {
    let (pg_port, api_port) = (h.stack.control.pg_port, h.stack.control.api_port);
    h.stack.control.proc.stop(nix::sys::signal::Signal::SIGTERM);
    h.stack.control =
        spawn_control(&h.stack.dir.join("control"), cfg, pg_port, api_port, &AwsCreds::demo(), moto).unwrap();
    h.state
        .upsert_role(
            &role(json!({"kind": "role", "version": "v7", "metadata": {"name": "prod"},
                "spec": {"allow": {"db_labels": {"env": "prod"}, "db_names": ["demo"], "db_users": ["alice"]}}}))
            .unwrap(),
        )
        .unwrap();
    h.state.update_user_roles("alice", &["dev".to_owned(), "prod".to_owned()]).unwrap();
    h.login().unwrap();
    h.stack.control.config_path.clone()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn discovered_proxies_are_served_kept_through_faults_and_removed_when_deleted() {
    if skip_without_moto() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Moto first: it binds port 0 while holding it, so the stack's free ports cannot collide.
    let moto_dir = TestDir::new("discovery-moto").unwrap();
    // Pages of one item, so discovery must follow Marker to see everything.
    let moto = Moto::start(moto_dir.path(), 1).unwrap();
    let mut h = Harness::start("discovery").unwrap();

    let good_role =
        moto.admin("/_sluice/role", json!({"name": "sluice-discovery", "external_id": "ext-right"})).unwrap();
    let good_role = good_role["arn"].as_str().unwrap().to_owned();
    let other_role = moto.admin("/_sluice/role", json!({"name": "other", "external_id": "ext-other"})).unwrap();
    let other_role = other_role["arn"].as_str().unwrap().to_owned();

    let mk = |region: &str, name: &str, extra: serde_json::Value| {
        let mut req = json!({"region": region, "name": name, "tags": {"env": "prod", "team": "payments"}});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        moto.admin("/_sluice/proxy", req).unwrap()
    };
    let orders = mk("us-west-2", "orders", json!({"tags": {"env": "prod", "team": "payments", "bad key!": "x"}}));
    mk("us-west-2", "billing", json!({"tags": {"env": "dev"}}));
    mk("us-west-2", "plain", json!({"require_tls": false}));
    mk("us-west-2", "newborn", json!({"status": "creating"}));
    let mysqlish = mk("us-west-2", "mysqlish", json!({"engine": "MYSQL"}));
    mk("us-west-2", "sqlish", json!({"engine": "SQLSERVER"}));
    let eu = mk("eu-west-1", "eu-orders", json!({}));
    moto.admin(
        "/_sluice/proxy-endpoint",
        json!({"region": "us-west-2", "proxy": "orders", "name": "reader", "target_role": "READ_ONLY"}),
    )
    .unwrap();
    moto.admin(
        "/_sluice/proxy-endpoint",
        json!({"region": "us-west-2", "proxy": "mysqlish", "name": "writer", "target_role": "READ_WRITE"}),
    )
    .unwrap();
    let orders_host = orders["endpoint"].as_str().unwrap().to_owned();
    assert!(orders_host.starts_with("orders.proxy-") && orders_host.ends_with(".us-west-2.rds.amazonaws.com"));

    // An emulator answering for the discovered "orders" proxy (port 5432 in its tokens), which asks
    // moto for the secrets of the assumed-role keys control signs with.
    let emu = start_emulator_for(
        &h.dir.join("orders-emulator"),
        &orders_host,
        5432,
        h.stack.postgres.port,
        &moto,
        &[("alice".to_owned(), h.stack.db_password.clone())],
    )
    .unwrap();

    // Control with two matchers: the right role in two regions (env=prod only), and a role whose
    // external id is wrong.
    let mut cfg: Config = h.stack.control.config.clone();
    let discovery = json!({
        "poll_interval": "1s",
        "aws": [
            {"types": ["rdsproxy"], "regions": ["us-west-2", "eu-west-1"], "tags": {"env": "prod"},
             "assume_role_arn": good_role, "external_id": "ext-right",
             "connect_addr_override": format!("127.0.0.1:{}", emu.port),
             "tls": {"ca_cert_file": emu.ca_file}},
            {"types": ["rdsproxy"], "regions": ["us-east-2"], "assume_role_arn": other_role, "external_id": "ext-wrong"}
        ]
    });
    cfg.discovery_service = serde_json::from_value(discovery).unwrap();
    // The custom endpoint is served with an override whose external id is wrong (per label set).
    cfg.db_service.resources = serde_json::from_value(json!([
        {"labels": {"endpoint-type": "READ_ONLY"}, "aws": {"assume_role_arn": other_role, "external_id": "ext-wrong"}},
        {"labels": {"sluice.dev/origin": "cloud"}}
    ]))
    .unwrap();
    let cfg_path = restart_with_discovery(&mut h, cfg, &moto);

    let db_ls = |h: &Harness| -> serde_json::Value {
        serde_json::from_str(&h.sluice_ok(&["db", "ls", "--format", "json"]).unwrap()).unwrap()
    };
    let names = |v: &serde_json::Value| -> Vec<String> {
        // Only the discovered ones: the stack's static databases are not this test's business.
        let mut n: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["labels"]["sluice.dev/origin"] == "cloud")
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    let want = ["eu-orders", "mysqlish", "mysqlish-writer", "orders", "orders-reader"];
    let listed = wait_until(Duration::from_secs(30), "discovered databases in sluice db ls", || {
        let v = db_ls(&h);
        Ok((names(&v) == want).then_some(v))
    })
    .unwrap_or_else(|e| panic!("{e}\ncontrol.log:\n{}", tail(&h.control_log(), 30)));

    let find = |v: &serde_json::Value, name: &str| -> serde_json::Value {
        v.as_array().unwrap().iter().find(|d| d["name"] == name).unwrap().clone()
    };
    let o = find(&listed, "orders");
    assert_eq!(o["uri"], format!("{orders_host}:5432"));
    assert_eq!(o["description"], "RDS Proxy in us-west-2");
    let vpc = orders["vpc_id"].as_str().unwrap();
    let base = [
        ("account-id", ACCOUNT),
        ("region", "us-west-2"),
        ("engine", "POSTGRESQL"),
        ("vpc-id", vpc),
        ("env", "prod"),
        ("team", "payments"),
        ("sluice.dev/origin", "cloud"),
        ("sluice.dev/discovery-type", "rdsproxy"),
    ];
    assert_eq!(serde_json::from_value::<BTreeMap<String, String>>(o["labels"].clone()).unwrap(), labels(&base));
    let r = find(&listed, "orders-reader");
    assert_eq!(r["description"], "RDS Proxy endpoint in us-west-2");
    assert!(r["uri"].as_str().unwrap().starts_with("reader.endpoint.proxy-"), "{r}");
    let mut reader_labels = labels(&base);
    reader_labels.insert("endpoint-type".into(), "READ_ONLY".into());
    assert_eq!(serde_json::from_value::<BTreeMap<String, String>>(r["labels"].clone()).unwrap(), reader_labels);
    assert_eq!(o["protocol"], "postgres");
    // A MYSQL-family proxy and its endpoint: mysql databases with the same labels.
    let m = find(&listed, "mysqlish");
    assert_eq!(m["protocol"], "mysql", "{m}");
    assert_eq!(m["uri"], format!("{}:3306", mysqlish["endpoint"].as_str().unwrap()));
    let mut mysql_labels = labels(&base);
    mysql_labels.insert("engine".into(), "MYSQL".into());
    mysql_labels.insert("vpc-id".into(), mysqlish["vpc_id"].as_str().unwrap().into());
    assert_eq!(serde_json::from_value::<BTreeMap<String, String>>(m["labels"].clone()).unwrap(), mysql_labels);
    let mw = find(&listed, "mysqlish-writer");
    assert_eq!(mw["protocol"], "mysql", "{mw}");
    assert!(mw["uri"].as_str().unwrap().starts_with("writer.endpoint.proxy-"), "{mw}");
    assert!(mw["uri"].as_str().unwrap().ends_with(":3306"), "{mw}");
    mysql_labels.insert("endpoint-type".into(), "READ_WRITE".into());
    assert_eq!(serde_json::from_value::<BTreeMap<String, String>>(mw["labels"].clone()).unwrap(), mysql_labels);
    let e = find(&listed, "eu-orders");
    assert_eq!(e["labels"]["region"], "eu-west-1");
    assert_eq!(e["labels"]["vpc-id"], eu["vpc_id"]);

    // The custom endpoint's TLS name is the proxy's default host; the skipped proxies are logged.
    let admin_ls = check_output("control db ls", &control_cli(&cfg_path, &moto, h.dir.path(), &["db", "ls"])).unwrap();
    assert!(admin_ls.contains("cloud"), "{admin_ls}");
    let stored = h.state.discovered().unwrap();
    let reader = stored.iter().find(|d| d.item.resource.metadata.name == "orders-reader").unwrap();
    assert_eq!(reader.item.resource.spec.tls.server_name.as_deref(), Some(orders_host.as_str()));
    assert_eq!(
        reader.item.resource.spec.aws.assume_role_arn.as_deref(),
        Some(good_role.as_str()),
        "discovered databases mint tokens through the matcher's role"
    );
    let log = std::fs::read_to_string(h.control_log()).unwrap();
    assert!(log.contains("RequireTLS is off"), "no log line for the proxy without TLS");
    assert!(log.contains("status is \"creating\""), "no log line for the proxy being created");
    assert!(
        log.contains("sqlish") && log.contains("engine family \"SQLSERVER\" is not supported"),
        "no log line for the SQLSERVER proxy"
    );
    // The wrong external id: AccessDenied, explained with the trust policy that is needed. Its
    // source is polled after the others, so wait for it rather than race it.
    wait_until(Duration::from_secs(30), "the AccessDenied explanation in control.log", || {
        let log = std::fs::read_to_string(h.control_log())?;
        Ok((log.contains("AccessDenied on sts:AssumeRole") && log.contains("sts:ExternalId")).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&h.control_log(), 20)));

    // A session to the discovered proxy: control signs with the assumed role's keys, the emulator
    // verifies them with the secret moto minted, then logs in to PostgreSQL.
    h.sluice_ok(&["db", "login", "orders", "--db-user", "alice", "--db-name", "demo"]).unwrap();
    let env = parse_env_exports(&h.sluice_ok(&["db", "env", "orders"]).unwrap()).unwrap();
    let out = psql(&env, &["-c", "select 1, current_user"]).unwrap();
    assert_eq!(
        check_output("psql to the discovered proxy", &out).unwrap_or_else(|e| panic!(
            "{e}\ncontrol:\n{}\nemulator:\n{}",
            tail(&h.control_log(), 20),
            tail(&h.dir.join("orders-emulator").join("emulator.log"), 20)
        )),
        "1|alice\n"
    );
    let emu_log = std::fs::read_to_string(h.dir.join("orders-emulator").join("emulator.log")).unwrap();
    assert!(emu_log.contains("IAM token verified"), "{emu_log}");
    assert!(!emu_log.contains("AKIDSLUICEDEMO"), "the token was signed with the base keys, not the assumed role's");

    // The override's wrong external id: minting fails before dialing, and the client is told
    // which trust policy the role needs.
    h.sluice_ok(&["db", "login", "orders-reader", "--db-user", "alice", "--db-name", "demo"]).unwrap();
    let env = parse_env_exports(&h.sluice_ok(&["db", "env", "orders-reader"]).unwrap()).unwrap();
    let out = psql(&env, &["-c", "select 1"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("IAM auth token") && stderr.contains("trust policy"), "{stderr}");
    assert!(stderr.contains(&other_role), "{stderr}");

    // Throttling, then 500s: every RDS call fails; the databases stay, marked stale.
    for (status, code) in [(400, "Throttling"), (500, "InternalFailure")] {
        moto.faults(-1, status, code).unwrap();
        wait_until(Duration::from_secs(60), "stale marks", || {
            let out = control_cli(&cfg_path, &moto, h.dir.path(), &["db", "ls"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok((text.matches("[stale:").count() == want.len() && text.contains(code)).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&h.control_log(), 20)));
        assert_eq!(names(&db_ls(&h)), want, "a failed fetch must not delete");
        moto.faults(0, 400, "Throttling").unwrap();
        wait_until(Duration::from_secs(60), "stale marks cleared", || {
            let out = control_cli(&cfg_path, &moto, h.dir.path(), &["db", "ls"]);
            Ok((!String::from_utf8_lossy(&out.stdout).contains("[stale:")).then_some(()))
        })
        .unwrap();
    }

    // Deleting a proxy removes its database (and only it).
    moto.admin("/_sluice/delete-proxy", json!({"region": "eu-west-1", "name": "eu-orders"})).unwrap();
    wait_until(Duration::from_secs(30), "eu-orders removed", || {
        Ok((names(&db_ls(&h)) == ["mysqlish", "mysqlish-writer", "orders", "orders-reader"]).then_some(()))
    })
    .unwrap();

    // Discovered resources survive a restart of control (they are in the state).
    let cfg = h.stack.control.config.clone();
    let (pg_port, api_port) = (h.stack.control.pg_port, h.stack.control.api_port);
    h.stack.control.proc.stop(nix::sys::signal::Signal::SIGTERM);
    moto.faults(-1, 403, "AccessDenied").unwrap();
    let control_dir = h.stack.dir.join("control");
    h.stack.control = spawn_control(&control_dir, cfg, pg_port, api_port, &AwsCreds::demo(), &moto).unwrap();
    assert_eq!(names(&db_ls(&h)), ["mysqlish", "mysqlish-writer", "orders", "orders-reader"]);
    moto.faults(0, 400, "Throttling").unwrap();

    // A config change to discovery_service applies at once: now only env=dev proxies match.
    let mut cfg: Config = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.discovery_service.aws[0].tags = serde_json::from_value(json!({"env": "dev"})).unwrap();
    cfg.discovery_service.poll_interval = Duration::from_secs(3600);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    wait_until(Duration::from_secs(30), "the new tag filter applied", || {
        Ok((names(&db_ls(&h)) == ["billing"]).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&h.control_log(), 20)));
}

#[test]
fn bootstrap_attaches_what_manual_prints_and_print_iam() {
    if skip_without_moto() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TestDir::new("bootstrap").unwrap();
    let moto = Moto::start(&dir.join("moto"), 100).unwrap();
    moto.admin("/_sluice/role", json!({"name": "sluice"})).unwrap();
    let disc = moto.admin("/_sluice/role", json!({"name": "disc"})).unwrap();
    let disc = disc["arn"].as_str().unwrap().to_owned();
    let cfg_path = dir.join("control.yaml");
    std::fs::write(
        &cfg_path,
        format!(
            "data_dir: {}\ndiscovery_service:\n  aws:\n  - types: [rdsproxy]\n    regions: [us-west-2]\n  - types: [rdsproxy]\n    regions: [eu-west-1]\n    assume_role_arn: {disc}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();

    let manual = control_cli(
        &cfg_path,
        &moto,
        dir.path(),
        &["configure", "bootstrap", "--attach-to-role", "sluice", "--manual"],
    );
    let manual_out = check_output("bootstrap --manual", &manual).unwrap();
    let stderr = String::from_utf8_lossy(&manual.stderr);
    assert!(stderr.contains("of 10240 bytes"), "size report missing: {stderr}");
    let docs: Vec<serde_json::Value> =
        manual_out.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(docs.len(), 2, "{manual_out}");
    let own = docs[0].to_string();
    assert!(own.contains("rds:DescribeDBProxies") && own.contains("rds:DescribeDBProxyEndpoints"), "{own}");
    assert!(own.contains("rds:ListTagsForResource") && own.contains("sts:AssumeRole") && own.contains(&disc), "{own}");
    assert!(own.contains("arn:aws:rds-db:us-west-2:*:dbuser:*/*"), "{own}");

    let attach = control_cli(&cfg_path, &moto, dir.path(), &["configure", "bootstrap", "--attach-to-role", "sluice"]);
    check_output("bootstrap", &attach).unwrap();
    for (role_name, want) in [("sluice", &docs[0]), ("disc", &docs[1])] {
        let (status, got) = moto
            .get(&format!("/_sluice/role-policy?account={ACCOUNT}&role={role_name}&name=SluiceDatabaseAccess"))
            .unwrap();
        assert_eq!(status, 200, "no policy attached to {role_name}: {got}");
        let got: serde_json::Value = serde_json::from_str(got["document"].as_str().unwrap()).unwrap();
        assert_eq!(&got, want, "attached policy of {role_name} differs from --manual");
    }

    let print =
        control_cli(&cfg_path, &moto, dir.path(), &["aws", "print-iam", "--types", "rdsproxy", "--role", "sluice"]);
    let doc: serde_json::Value = serde_json::from_str(&check_output("print-iam", &print).unwrap()).unwrap();
    assert!(doc.to_string().contains("arn:aws:rds-db:*:*:dbuser:*/*"));
    assert!(String::from_utf8_lossy(&print.stderr).contains("put-role-policy --role-name sluice"));
    let bad = control_cli(&cfg_path, &moto, dir.path(), &["aws", "print-iam", "--types", "ec2"]);
    assert!(!bad.status.success());

    // No credentials anywhere: the failure says where Sluice looks for them.
    let mut cmd = Command::new(find_bin("control").unwrap());
    cmd.arg("--config").arg(&cfg_path).args(["configure", "bootstrap", "--attach-to-user", "sluice"]);
    aws_env(&mut cmd, &AwsCreds::demo(), &moto, dir.path());
    cmd.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY").env_remove("AWS_SESSION_TOKEN");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no AWS credentials") && stderr.contains("AWS_ACCESS_KEY_ID"), "{stderr}");

    // `control db configure create` writes a config serving resources with these labels.
    let written = dir.join("db.yaml");
    let mut cmd = Command::new(find_bin("control").unwrap());
    cmd.args(["db", "configure", "create", "--dynamic-resources-labels", "env=prod,team=payments"])
        .args(["--assume-role-arn", &disc, "--external-id", "ext-1", "--data-dir"])
        .arg(dir.join("data2"))
        .arg("-o")
        .arg(&written);
    check_output("db configure create", &cmd.output().unwrap()).unwrap();
    let cfg = Config::load(&written).unwrap();
    let m = &cfg.db_service.resources[0];
    assert_eq!(m.labels, labels(&[("env", "prod"), ("team", "payments")]));
    let aws = m.aws.as_ref().unwrap();
    assert_eq!((aws.assume_role_arn.as_deref(), aws.external_id.as_deref()), (Some(disc.as_str()), Some("ext-1")));
}

/// Same-named proxies in two regions and in a second account: each is listed under its own name
/// (`<name>-<region>-<account>`), survives the other source's polls, and a session under each name
/// reaches that proxy's emulator only; a certificate for the bare name reaches neither.
#[test]
fn same_named_proxies_in_two_regions_and_accounts_get_unique_names() {
    if skip_without_moto() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let moto_dir = TestDir::new("discovery-names-moto").unwrap();
    let moto = Moto::start(moto_dir.path(), 100).unwrap();
    let mut h = Harness::start("discovery-names").unwrap();

    const OTHER_ACCOUNT: &str = "222222222222";
    let role_arn = |account: &str, name: &str| -> String {
        let r = moto.admin("/_sluice/role", json!({"account": account, "name": name})).unwrap();
        r["arn"].as_str().unwrap().to_owned()
    };
    let home_role = role_arn(ACCOUNT, "disc");
    let other_role = role_arn(OTHER_ACCOUNT, "disc");
    // (region, account, matcher role): one "orders" each, and a "billing" that stays plain.
    let places = [
        ("us-west-2", ACCOUNT, &home_role),
        ("eu-west-1", ACCOUNT, &home_role),
        ("us-west-2", OTHER_ACCOUNT, &other_role),
    ];
    let mut emulators = Vec::new();
    let mut matchers = Vec::new();
    for (i, (region, account, role)) in places.iter().enumerate() {
        let p = moto
            .admin(
                "/_sluice/proxy",
                json!({"account": account, "region": region, "name": "orders", "tags": {"env": "prod"}}),
            )
            .unwrap();
        let host = p["endpoint"].as_str().unwrap().to_owned();
        let emu = start_emulator_for(
            &h.dir.join(format!("emulator-{i}")),
            &host,
            5432,
            h.stack.postgres.port,
            &moto,
            &[("alice".to_owned(), h.stack.db_password.clone())],
        )
        .unwrap();
        matchers.push(json!({"types": ["rdsproxy"], "regions": [region], "tags": {"env": "prod"},
            "assume_role_arn": role, "connect_addr_override": format!("127.0.0.1:{}", emu.port),
            "tls": {"ca_cert_file": emu.ca_file}}));
        emulators.push((format!("orders-{region}-{account}"), host, emu));
    }
    let billing = moto
        .admin("/_sluice/proxy", json!({"region": "eu-west-1", "name": "billing", "tags": {"env": "prod"}}))
        .unwrap();

    let mut cfg: Config = h.stack.control.config.clone();
    cfg.discovery_service = serde_json::from_value(json!({"poll_interval": "1s", "aws": matchers})).unwrap();
    cfg.db_service.resources = serde_json::from_value(json!([{"labels": {"sluice.dev/origin": "cloud"}}])).unwrap();
    let cfg_path = restart_with_discovery(&mut h, cfg, &moto);

    let cloud_names = |h: &Harness| -> Vec<(String, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&h.sluice_ok(&["db", "ls", "--format", "json"]).unwrap()).unwrap();
        let mut n: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["labels"]["sluice.dev/origin"] == "cloud")
            .map(|d| (d["name"].as_str().unwrap().to_owned(), d["uri"].as_str().unwrap().to_owned()))
            .collect();
        n.sort();
        n
    };
    let mut want: Vec<(String, String)> =
        emulators.iter().map(|(name, host, _)| (name.clone(), format!("{host}:5432"))).collect();
    // The proxy whose name is unique keeps it.
    want.push(("billing".to_owned(), format!("{}:5432", billing["endpoint"].as_str().unwrap())));
    want.sort();
    wait_until(Duration::from_secs(30), "three renamed proxies and billing in sluice db ls", || {
        Ok((cloud_names(&h) == want).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\ngot {:?}\ncontrol.log:\n{}", cloud_names(&h), tail(&h.control_log(), 30)));

    // Many polls later (each source polled every second, one after the other), nothing flipped,
    // and `control db ls` (the admin view) agrees.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cloud_names(&h), want);
    let admin_ls = check_output("control db ls", &control_cli(&cfg_path, &moto, h.dir.path(), &["db", "ls"])).unwrap();
    for (name, _, _) in &emulators {
        assert!(admin_ls.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing:\n{admin_ls}");
    }
    assert!(!admin_ls.lines().any(|l| l.starts_with("orders ")), "{admin_ls}");

    // A session under each name reaches that proxy's emulator, and no other.
    let verified = |i: usize| -> usize {
        std::fs::read_to_string(h.dir.join(format!("emulator-{i}")).join("emulator.log"))
            .unwrap_or_default()
            .matches("IAM token verified")
            .count()
    };
    for (i, (name, _, _)) in emulators.iter().enumerate() {
        let before: Vec<usize> = (0..emulators.len()).map(verified).collect();
        h.sluice_ok(&["db", "login", name, "--db-user", "alice", "--db-name", "demo"]).unwrap();
        let env = parse_env_exports(&h.sluice_ok(&["db", "env", name]).unwrap()).unwrap();
        let out = psql(&env, &["-c", "select 1, current_user"]).unwrap();
        let got = check_output(&format!("psql to {name}"), &out).unwrap_or_else(|e| {
            panic!(
                "{e}\ncontrol:\n{}\nemulator:\n{}",
                tail(&h.control_log(), 20),
                tail(&h.dir.join(format!("emulator-{i}")).join("emulator.log"), 20)
            )
        });
        assert_eq!(got, "1|alice\n");
        let after: Vec<usize> = (0..emulators.len()).map(verified).collect();
        for j in 0..emulators.len() {
            let grew = after[j] > before[j];
            assert_eq!(grew, i == j, "session to {name}: emulator {j} verified a token ({before:?} -> {after:?})");
        }
        // Audit events are written off the connection path: wait for this session's start.
        let audited = sluice_tests::wait_until(std::time::Duration::from_secs(10), "the session's audit event", || {
            let a = h.audit()?;
            Ok(a.iter().any(|a| a.event == "db.session.start" && a.db.as_deref() == Some(name.as_str())).then_some(a))
        })
        .unwrap();
        assert!(
            audited
                .iter()
                .any(|a| a.event == "db.session.start" && a.db.as_deref() == Some(name.as_str()) && a.success),
            "no successful session start audited for {name}"
        );
    }

    // A certificate for the bare AWS name matches no database: it reaches neither proxy.
    h.sluice_ok(&["db", "login", &emulators[0].0, "--db-user", "alice", "--db-name", "demo"]).unwrap();
    let mut env = parse_env_exports(&h.sluice_ok(&["db", "env", &emulators[0].0]).unwrap()).unwrap();
    let bare = h.issue_cert("alice", "orders", "alice", "demo").unwrap();
    let (cert, key) = (h.dir.join("bare.crt"), h.dir.join("bare.key"));
    std::fs::write(&cert, &bare.cert_pem).unwrap();
    std::fs::write(&key, &bare.key_pem).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for (k, v) in env.iter_mut() {
        match k.as_str() {
            "PGSSLCERT" => *v = cert.to_string_lossy().into_owned(),
            "PGSSLKEY" => *v = key.to_string_lossy().into_owned(),
            _ => {}
        }
    }
    let before: Vec<usize> = (0..emulators.len()).map(verified).collect();
    let out = psql(&env, &["-c", "select 1"]).unwrap();
    assert!(!out.status.success(), "a certificate for \"orders\" connected");
    assert_eq!((0..emulators.len()).map(verified).collect::<Vec<_>>(), before);
}

/// A discovered MYSQL-family proxy is usable: listed as `protocol: mysql`, reached through
/// control's MySQL listener with the `mariadb` client and the option file of `sluice db config`,
/// control signing the token with the matcher's assumed role and the proxy's emulator (MySQL
/// mode) logging in to MariaDB.
#[test]
fn a_discovered_mysql_proxy_is_usable() {
    if skip_without_moto() || skip_without_mariadb() {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let moto_dir = TestDir::new("discovery-mysql-moto").unwrap();
    let moto = Moto::start(moto_dir.path(), 10).unwrap();
    let mut h = Harness::start("discovery-mysql").unwrap();
    let role_arn = moto.admin("/_sluice/role", json!({"name": "sluice-mysql", "external_id": "ext-my"})).unwrap();
    let role_arn = role_arn["arn"].as_str().unwrap().to_owned();
    let shop = moto
        .admin(
            "/_sluice/proxy",
            json!({"region": "ap-south-1", "name": "shop", "engine": "MYSQL", "tags": {"env": "prod"}}),
        )
        .unwrap();
    let shop_host = shop["endpoint"].as_str().unwrap().to_owned();

    let db = MariaDb::start(&h.dir.join("mariadb")).unwrap();
    let secret = "shop-secret-1";
    db.create_user("alice", secret).unwrap();
    db.sql("CREATE DATABASE demo").unwrap();
    let emu = start_mysql_emulator_for(
        &h.dir.join("shop-emulator"),
        &shop_host,
        3306,
        db.port(),
        &moto,
        &[("alice".to_owned(), secret.to_owned())],
    )
    .unwrap();

    let mut cfg: Config = h.stack.control.config.clone();
    let mysql_port = sluice_tests::sluice_control::demo::free_port().unwrap();
    cfg.proxy_service.mysql_listen_addr = Some(([127, 0, 0, 1], mysql_port).into());
    cfg.discovery_service = serde_json::from_value(json!({
        "poll_interval": "1s",
        "aws": [{"types": ["rdsproxy"], "regions": ["ap-south-1"], "assume_role_arn": role_arn,
                 "external_id": "ext-my", "connect_addr_override": format!("127.0.0.1:{}", emu.port),
                 "tls": {"ca_cert_file": emu.ca_file}}]
    }))
    .unwrap();
    cfg.db_service.resources = serde_json::from_value(json!([{"labels": {"sluice.dev/origin": "cloud"}}])).unwrap();
    restart_with_discovery(&mut h, cfg, &moto);

    let listed = wait_until(Duration::from_secs(30), "the MYSQL proxy listed", || {
        let v: serde_json::Value = serde_json::from_str(&h.sluice_ok(&["db", "ls", "--format", "json"])?)?;
        Ok(v.as_array().and_then(|a| a.iter().find(|d| d["name"] == "shop").cloned()))
    })
    .unwrap();
    assert_eq!(listed["protocol"], "mysql", "{listed}");

    h.sluice_ok(&["db", "login", "shop", "--db-user", "alice", "--db-name", "demo"]).unwrap();
    h.sluice_ok(&["db", "config", "shop"]).unwrap();
    let cnf = h.home.join("db/shop.cnf");
    let out = Command::new(db.client())
        .arg(format!("--defaults-extra-file={}", cnf.display()))
        .args(["-N", "-B", "-e", "SELECT CURRENT_USER(), DATABASE(), @@port"])
        .output()
        .unwrap();
    let text = check_output("mariadb to the discovered MySQL proxy", &out).unwrap_or_else(|e| {
        panic!(
            "{e}\ncontrol:\n{}\nemulator:\n{}",
            tail(&h.control_log(), 20),
            tail(&h.dir.join("shop-emulator").join("emulator.log"), 20)
        )
    });
    assert_eq!(text.trim(), format!("alice@%\tdemo\t{}", db.port()));
    let emu_log = std::fs::read_to_string(h.dir.join("shop-emulator").join("emulator.log")).unwrap();
    assert!(emu_log.contains("IAM token verified"), "{emu_log}");
    assert!(!emu_log.contains("AKIDSLUICEDEMO"), "the token was signed with the base keys, not the assumed role's");
}
