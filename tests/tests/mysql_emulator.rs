//! MariaDB and the RDS Proxy emulator's MySQL mode, driven with the stock `mariadb` client: the
//! harness's private server, IAM-token logins over TLS, refusals (bad token, no TLS) and
//! `KILL QUERY` through a second emulator connection.

use sluice_tests::{skip_without_mariadb, MariaDb, TestDir};

#[test]
fn mariadb_harness_runs_sql_and_creates_users() {
    if skip_without_mariadb() {
        return;
    }
    let dir = TestDir::new("mariadb").unwrap();
    let db = MariaDb::start(&dir.join("mariadb")).unwrap();
    assert_eq!(db.sql("SELECT @@port").unwrap(), db.port().to_string());
    assert_eq!(db.sql("SELECT @@max_allowed_packet, @@local_infile").unwrap(), "1073741824\t1");
    assert!(db.socket().exists());
    db.create_user("bob", "it's a secret").unwrap();
    assert_eq!(db.sql("SELECT plugin FROM mysql.user WHERE user = 'bob'").unwrap(), "mysql_native_password");
    // The password works over TCP, and a wrong one does not.
    let login = |pw: &str| {
        std::process::Command::new(db.client())
            .args(["--no-defaults", "-h", "127.0.0.1", "-P", &db.port().to_string(), "-u", "bob"])
            .arg(format!("-p{pw}"))
            .args(["-N", "-B", "-e", "SELECT CURRENT_USER()"])
            .output()
            .unwrap()
    };
    let ok = login("it's a secret");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "bob@%");
    let bad = login("wrong");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("1045"), "{}", String::from_utf8_lossy(&bad.stderr));
}
