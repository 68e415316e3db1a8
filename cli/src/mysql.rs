//! MySQL and MariaDB databases from the CLI: which client is installed (MariaDB's and MySQL 8's
//! spell "verify the server's certificate" differently), the command line `sluice db connect`
//! runs and the option file `sluice db config` writes for `--defaults-extra-file`. Unlike libpq,
//! neither client reads TLS settings from the environment, hence the option file.

use std::path::Path;
use std::process::Command;

/// Which client family: they take the same connection options but different TLS verification
/// options (`--ssl-verify-server-cert` was removed in MySQL 8.0, `--ssl-mode` is MySQL's only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    MariaDb,
    Mysql,
}

/// A client found on `PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The program name (`mariadb` or `mysql`).
    pub program: &'static str,
    pub flavour: Flavour,
}

/// The flavour from `--version`'s output: Debian's and MariaDB's own `mysql` are MariaDB's
/// client ("Distrib 10.11.6-MariaDB", "from 11.4.2-MariaDB"); anything else is MySQL's.
pub fn flavour_of(version_output: &str) -> Flavour {
    if version_output.to_ascii_lowercase().contains("mariadb") {
        Flavour::MariaDb
    } else {
        Flavour::Mysql
    }
}

/// The installed client: `mariadb` first (it is always MariaDB's), then `mysql`.
pub fn detect() -> Option<Client> {
    for program in ["mariadb", "mysql"] {
        let Ok(out) = Command::new(program).arg("--version").output() else { continue };
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let flavour = if program == "mariadb" { Flavour::MariaDb } else { flavour_of(&text) };
        return Some(Client { program, flavour });
    }
    None
}

/// Where and as whom to connect, with the certificate files of `sluice db login`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Empty: none (the client's default).
    pub database: String,
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// The TLS verification options of `flavour`, without their leading `--`.
fn verify_options(flavour: Flavour) -> &'static [&'static str] {
    match flavour {
        Flavour::MariaDb => &["ssl", "ssl-verify-server-cert"],
        Flavour::Mysql => &["ssl-mode=VERIFY_IDENTITY"],
    }
}

/// The client's command-line options for `t`. TCP is forced: for `localhost` both clients would
/// otherwise use the local server's Unix socket.
pub fn client_args(flavour: Flavour, t: &Target) -> Vec<String> {
    let mut args = vec![
        "--protocol=TCP".to_owned(),
        format!("--host={}", t.host),
        format!("--port={}", t.port),
        format!("--user={}", t.user),
    ];
    args.extend(verify_options(flavour).iter().map(|o| format!("--{o}")));
    args.push(format!("--ssl-ca={}", t.ca));
    args.push(format!("--ssl-cert={}", t.cert));
    args.push(format!("--ssl-key={}", t.key));
    if !t.database.is_empty() {
        args.push(format!("--database={}", t.database));
    }
    args
}

/// A value as option files read it: backslashes are escapes there, and quotes keep spaces and
/// `#` (a comment otherwise).
fn cnf_value(v: &str) -> String {
    let escaped = v.replace('\\', "\\\\").replace('"', "\\\"");
    if escaped.chars().any(|c| c.is_whitespace() || c == '#' || c == '\'') || escaped != v {
        format!("\"{escaped}\"")
    } else {
        escaped
    }
}

/// A `[client]` option file for `--defaults-extra-file`.
pub fn option_file(flavour: Flavour, t: &Target, name: &str) -> String {
    let mut out = format!("# Written by `sluice db config {name}`: connect with --defaults-extra-file=THIS_FILE\n");
    out.push_str("[client]\nprotocol=TCP\n");
    for (k, v) in [("host", t.host.as_str()), ("user", t.user.as_str())] {
        out.push_str(&format!("{k}={}\n", cnf_value(v)));
    }
    out.push_str(&format!("port={}\n", t.port));
    if !t.database.is_empty() {
        out.push_str(&format!("database={}\n", cnf_value(&t.database)));
    }
    for (k, v) in [("ssl-ca", &t.ca), ("ssl-cert", &t.cert), ("ssl-key", &t.key)] {
        out.push_str(&format!("{k}={}\n", cnf_value(v)));
    }
    for o in verify_options(flavour) {
        out.push_str(o);
        out.push('\n');
    }
    out
}

/// How to run `client` with the option file at `path` (it must be the first option).
pub fn with_option_file(program: &str, path: &Path) -> String {
    format!("{program} --defaults-extra-file={}", crate::shell_quote(&path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(database: &str) -> Target {
        Target {
            host: "127.0.0.1".into(),
            port: 3307,
            user: "alice".into(),
            database: database.into(),
            ca: "/h/.sluice/ca.pem".into(),
            cert: "/h/.sluice/db/shop.crt".into(),
            key: "/h/.sluice/db/shop.key".into(),
        }
    }

    #[test]
    fn version_strings_tell_the_flavour() {
        for v in [
            "mysql  Ver 15.1 Distrib 10.11.6-MariaDB, for debian-linux-gnu (x86_64) using  EditLine wrapper",
            "mariadb from 11.4.2-MariaDB, client 15.2 for Linux (x86_64) using readline 5.1",
        ] {
            assert_eq!(flavour_of(v), Flavour::MariaDb, "{v}");
        }
        for v in [
            "mysql  Ver 8.0.36-0ubuntu0.22.04.1 for Linux on x86_64 ((Ubuntu))",
            "mysql  Ver 8.4.0 for macos14 on arm64 (MySQL Community Server - GPL)",
        ] {
            assert_eq!(flavour_of(v), Flavour::Mysql, "{v}");
        }
    }

    #[test]
    fn mariadb_client_arguments() {
        assert_eq!(
            client_args(Flavour::MariaDb, &target("shop")),
            [
                "--protocol=TCP",
                "--host=127.0.0.1",
                "--port=3307",
                "--user=alice",
                "--ssl",
                "--ssl-verify-server-cert",
                "--ssl-ca=/h/.sluice/ca.pem",
                "--ssl-cert=/h/.sluice/db/shop.crt",
                "--ssl-key=/h/.sluice/db/shop.key",
                "--database=shop",
            ]
        );
    }

    #[test]
    fn mysql8_client_arguments() {
        let args = client_args(Flavour::Mysql, &target(""));
        assert_eq!(
            args,
            [
                "--protocol=TCP",
                "--host=127.0.0.1",
                "--port=3307",
                "--user=alice",
                "--ssl-mode=VERIFY_IDENTITY",
                "--ssl-ca=/h/.sluice/ca.pem",
                "--ssl-cert=/h/.sluice/db/shop.crt",
                "--ssl-key=/h/.sluice/db/shop.key",
            ]
        );
        assert!(!args.iter().any(|a| a.contains("verify-server-cert")), "MySQL 8 refuses it");
    }

    #[test]
    fn option_files() {
        let maria = option_file(Flavour::MariaDb, &target("shop"), "shop");
        let lines: Vec<&str> = maria.lines().skip_while(|l| *l != "[client]").collect();
        assert_eq!(
            lines,
            [
                "[client]",
                "protocol=TCP",
                "host=127.0.0.1",
                "user=alice",
                "port=3307",
                "database=shop",
                "ssl-ca=/h/.sluice/ca.pem",
                "ssl-cert=/h/.sluice/db/shop.crt",
                "ssl-key=/h/.sluice/db/shop.key",
                "ssl",
                "ssl-verify-server-cert",
            ]
        );
        let mysql = option_file(Flavour::Mysql, &target(""), "shop");
        assert!(mysql.ends_with("ssl-key=/h/.sluice/db/shop.key\nssl-mode=VERIFY_IDENTITY\n"), "{mysql}");
        assert!(!mysql.contains("database="), "{mysql}");
        let mut odd = target("");
        odd.ca = "/My Files/#1\\ca.pem".into();
        assert!(option_file(Flavour::MariaDb, &odd, "x").contains("ssl-ca=\"/My Files/#1\\\\ca.pem\"\n"));
    }
}
