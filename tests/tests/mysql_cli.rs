//! The `sluice` CLI with a `protocol: mysql` database (a static one; sessions through the MySQL
//! listener are tested with the listener): `db ls` shows the protocol and, without a MySQL
//! listener, that it cannot be reached; `db login` issues the certificate as for PostgreSQL;
//! `db config` writes a 0600 option file the installed client reads back as the same options;
//! `db env` names the MySQL host, port and option file; `db connect` runs the MySQL client;
//! `proxy db --tunnel` refuses; PostgreSQL databases stay as they were.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use sluice_control::config::{DatabaseSpec, StaticDatabase};
use sluice_control::demo::free_port;
use sluice_tests::{parse_env_exports, Harness};

/// A static MySQL database alice's `dev` role may use (env=dev); its upstream is never dialled.
fn shop() -> StaticDatabase {
    let spec: DatabaseSpec =
        serde_json::from_value(serde_json::json!({"protocol": "mysql", "uri": "127.0.0.1:1"})).expect("a valid spec");
    StaticDatabase {
        name: "shop".into(),
        description: "MariaDB behind RDS Proxy".into(),
        static_labels: [("env".to_owned(), "dev".to_owned())].into(),
        spec,
    }
}

fn db_ls_json(h: &Harness) -> Vec<serde_json::Value> {
    let text = h.sluice_ok(&["db", "ls", "--format", "json"]).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap().as_array().unwrap().clone()
}

fn find<'a>(dbs: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    dbs.iter().find(|d| d["name"] == name).unwrap_or_else(|| panic!("{name} not listed: {dbs:?}"))
}

/// The MySQL client installed here, as `sluice` detects it: `mariadb` first, then `mysql`.
fn installed_client() -> Option<(&'static str, bool)> {
    for program in ["mariadb", "mysql"] {
        if let Ok(out) = Command::new(program).arg("--version").output() {
            if out.status.success() {
                let mariadb = program == "mariadb" || String::from_utf8_lossy(&out.stdout).contains("MariaDB");
                return Some((program, mariadb));
            }
        }
    }
    None
}

#[test]
fn mysql_databases_in_the_cli() {
    let mut h = Harness::start("mysql-cli").unwrap();
    h.restart_control(|c| c.db_service.databases.push(shop())).unwrap();
    h.login().unwrap();

    // No MySQL listener: listed as mysql, with nowhere to connect, and said so.
    let out = h.sluice(["db", "ls"]).unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap();
    assert!(header.contains("Protocol"), "{text}");
    let row = |text: &str, name: &str| -> Vec<String> {
        let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{text}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    let shop_row = row(&text, "shop");
    assert_eq!(&shop_row[shop_row.len() - 3..], ["mysql", "0", "env=dev"], "{text}");
    let demo_row = row(&text, "demo");
    assert_eq!(&demo_row[demo_row.len() - 3..], ["postgres", "0", "env=dev"], "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shop is a MySQL database") && stderr.contains("mysql_listen_addr"), "{stderr}");
    let dbs = db_ls_json(&h);
    assert_eq!(find(&dbs, "shop")["protocol"], "mysql");
    assert_eq!(find(&dbs, "shop")["endpoints"], serde_json::json!([]));
    assert_eq!(find(&dbs, "demo")["protocol"], "postgres");

    // The certificate is issued as for PostgreSQL, but there is nowhere to use it.
    let login = h.sluice_ok(&["db", "login", "shop", "--db-user", "alice", "--db-name", "demo"]).unwrap();
    assert!(login.contains("MySQL database"), "{login}");
    assert!(h.home.join("db/shop.crt").exists() && h.home.join("db/shop.key").exists());
    for args in [&["db", "config", "shop"][..], &["db", "env", "shop"], &["db", "connect", "shop"]] {
        let out = h.sluice(args).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains("no MySQL listener") && stderr.contains("mysql_listen_addr"), "{args:?}: {stderr}");
    }

    // With a MySQL listener address, clients are pointed at it.
    let port = free_port().unwrap();
    h.restart_control(|c| c.proxy_service.mysql_listen_addr = Some(([127, 0, 0, 1], port).into())).unwrap();
    let out = h.sluice(["db", "ls"]).unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("MySQL database"));
    let addr = format!("127.0.0.1:{port}");
    assert_eq!(find(&db_ls_json(&h), "shop")["endpoints"], serde_json::json!([addr]));

    // `db config`: the details, and an option file only this user can read.
    let config = h.sluice_ok(&["db", "config", "shop"]).unwrap();
    assert!(config.contains("Protocol:  mysql") && config.contains(&format!("Port:      {port}")), "{config}");
    let cnf = h.home.join("db/shop.cnf");
    assert!(config.contains(&format!("--defaults-extra-file={}", cnf.display())), "{config}");
    assert_eq!(std::fs::metadata(&cnf).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&cnf).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let home = h.home.display();
    for want in [
        "[client]".to_owned(),
        "protocol=TCP".into(),
        "host=127.0.0.1".into(),
        format!("port={port}"),
        "user=alice".into(),
        "database=demo".into(),
        format!("ssl-ca={home}/ca.pem"),
        format!("ssl-cert={home}/db/shop.crt"),
        format!("ssl-key={home}/db/shop.key"),
    ] {
        assert!(lines.contains(&want.as_str()), "{want} missing from\n{text}");
    }
    assert_eq!(lines[0], "[client]", "{text}");
    let client = installed_client();
    let verify = match client {
        Some((_, false)) => "ssl-mode=VERIFY_IDENTITY",
        // MariaDB's client, and what is written when none is installed.
        _ => "ssl-verify-server-cert",
    };
    assert!(lines.contains(&verify), "{verify} missing from\n{text}");
    // The client reads the file back as the options `db connect` passes.
    if let Some((program, _)) = client {
        let out = Command::new(program)
            .arg(format!("--defaults-extra-file={}", cnf.display()))
            .arg("--print-defaults")
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{printed}");
        for want in [
            "--host=127.0.0.1".to_owned(),
            format!("--port={port}"),
            "--user=alice".into(),
            "--database=demo".into(),
            format!("--ssl-key={home}/db/shop.key"),
            format!("--{verify}"),
        ] {
            assert!(printed.split_whitespace().any(|a| a == want), "{want} not read back: {printed}");
        }
    }

    // `db env`: host and port for the client, and the option file for TLS.
    let env_text = h.sluice_ok(&["db", "env", "shop"]).unwrap();
    let env = parse_env_exports(&env_text).unwrap();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["MYSQL_HOST", "MYSQL_TCP_PORT"], "{env_text}");
    assert_eq!(env[0].1, "127.0.0.1");
    assert_eq!(env[1].1, port.to_string());
    assert!(env_text.contains(&format!("--defaults-extra-file={}", cnf.display())), "{env_text}");

    // `db connect` runs the installed client with the certificate's options (`--version` makes
    // it stop before connecting: the listener is not there yet).
    if let Some((program, _)) = client {
        let out = h.sluice_ok(&["db", "connect", "shop", "--", "--version"]).unwrap();
        assert!(out.contains("Ver") || out.contains(program), "{out}");
    }

    // No tunnel for MySQL, said so.
    let out = h.sluice(["proxy", "db", "--tunnel", "shop"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("serves PostgreSQL only"), "{stderr}");

    // PostgreSQL databases are unchanged.
    h.sluice_ok(&["db", "login", "demo", "--db-user", "alice", "--db-name", "demo"]).unwrap();
    let env = parse_env_exports(&h.sluice_ok(&["db", "env", "demo"]).unwrap()).unwrap();
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["PGHOST", "PGPORT", "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGUSER", "PGDATABASE"]
    );
    assert_eq!(env[1].1, h.pg_port().to_string());

    // Logging out of the database removes its option file too.
    h.sluice_ok(&["db", "logout", "shop"]).unwrap();
    assert!(!cnf.exists());
}
