//! A self-hosted PostgreSQL as the upstream, with certificate authentication and no AWS: its
//! server certificate, key and client CA come from `control auth sign --format=db`, its
//! pg_hba.conf accepts TCP only as `hostssl … cert`, and control (`auth: cert`) logs in with a
//! short-lived client certificate whose Common Name is the route's database user.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_tests::sluice_control::config::{DatabaseSpec, StaticDatabase, UpstreamAuth};
use sluice_tests::sluice_control::demo::{dev_role, find_bin, AwsCreds, ControlProc, DataplaneProc, PgOpts, Postgres};
use sluice_tests::{
    check_output, client_config_from_pem, connect, count_in, route_identity, runtime, tail, wait_until, ClientCert,
    TestDir,
};
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

/// PostgreSQL with the files of `auth sign`, and control serving it as `selfhosted` (and as
/// `wrongname`, whose URI names a host the server certificate was not issued for).
struct CertStack {
    // Drop order: control and the dataplane before PostgreSQL, the directory last.
    control: ControlProc,
    dataplane: Option<DataplaneProc>,
    postgres: Postgres,
    ca: sluice_tests::sluice_control::ca::CertAuthority,
    ca_pem: String,
    sign_stdout: String,
    files: PathBuf,
    dir: TestDir,
}

impl Drop for CertStack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- control.log ----\n{}", tail(&self.dir.join("control").join("control.log"), 40));
            eprintln!("---- postgres.log ----\n{}", tail(&self.postgres.dir.join("postgres.log"), 20));
        }
    }
}

fn database(name: &str, host: &str, port: u16) -> StaticDatabase {
    StaticDatabase {
        name: name.into(),
        description: String::new(),
        static_labels: [("env".to_owned(), "dev".to_owned())].into_iter().collect(),
        spec: DatabaseSpec {
            protocol: "postgres".into(),
            uri: format!("{host}:{port}"),
            aws: Default::default(),
            tls: Default::default(),
            connect_addr: Some(format!("127.0.0.1:{port}")),
            auth: UpstreamAuth::Cert,
        },
    }
}

fn start(name: &str, with_dataplane: bool) -> CertStack {
    let dir = TestDir::new(name).unwrap();
    let ctl_dir = dir.join("control");
    std::fs::create_dir_all(&ctl_dir).unwrap();
    // The same data_dir as the control started below: `auth sign` creates the CA it then uses.
    let sign_cfg = dir.join("sign.yaml");
    std::fs::write(&sign_cfg, format!("data_dir: {}\n", ctl_dir.join("data").display())).unwrap();
    let files = dir.join("server");
    let out = Command::new(find_bin("control").unwrap())
        .arg("--config")
        .arg(&sign_cfg)
        .args(["auth", "sign", "--format=db", "--host", "localhost,127.0.0.1", "--ttl", "24h", "--out"])
        .arg(&files)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let sign_stdout = check_output("control auth sign", &out).unwrap();

    let with_ext = |ext: &str| PathBuf::from(format!("{}{ext}", files.display()));
    let postgres = Postgres::start_opts(
        &dir.join("pg"),
        PgOpts {
            tls: Some((with_ext(".crt"), with_ext(".key"))),
            client_ca: Some(with_ext(".cas")),
            // Over TCP, a client certificate and nothing else.
            hba: Some("local all all trust\nhostssl all all 127.0.0.1/32 cert\n".into()),
            ..Default::default()
        },
    )
    .unwrap();
    postgres.psql("postgres", "CREATE ROLE app_user LOGIN").unwrap();
    postgres.psql("postgres", "CREATE DATABASE appdb OWNER app_user").unwrap();

    let dataplane = with_dataplane.then(|| DataplaneProc::start(&dir.join("dataplane")).unwrap());
    let dbs = vec![
        database("selfhosted", "localhost", postgres.port),
        database("wrongname", "db.elsewhere.example", postgres.port),
    ];
    // No AWS credentials at all: nothing on this path mints a token.
    let creds = AwsCreds { access_key: String::new(), secret_key: String::new(), session_token: None };
    let control = ControlProc::start(&ctl_dir, dbs, &creds, dataplane.as_ref().map(|d| d.socket.clone())).unwrap();
    let state = control.state().unwrap();
    state.upsert_role(&dev_role("dev", &["appdb"], &["app_user", "ghost"]).unwrap()).unwrap();
    state.add_user("alice", "pw-unused-here", &["dev".to_owned()]).unwrap();
    let ca = state.ensure_ca("sluice").unwrap();
    let ca_pem = ca.cert_pem.clone();
    if with_dataplane {
        let log = ctl_dir.join("control.log");
        wait_until(Duration::from_secs(10), "control's link to the dataplane", || {
            Ok((count_in(&log, "connected to the dataplane") > 0).then_some(()))
        })
        .unwrap();
    }
    CertStack { control, dataplane, postgres, ca, ca_pem, sign_stdout, files, dir }
}

impl CertStack {
    /// Alice's Sluice client certificate for `service` as `db_user` on `appdb`.
    fn cert(&self, service: &str, db_user: &str) -> ClientCert {
        self.cert_for(&route_identity("alice", service, db_user, "appdb"))
    }

    fn cert_for(&self, id: &sluice_tests::sluice_control::ca::Identity) -> ClientCert {
        let key = rcgen::KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc();
        let cert_pem = self
            .ca
            .issue_client(id, &key.public_key_pem(), now - time::Duration::minutes(1), now + time::Duration::hours(1))
            .unwrap();
        ClientCert { cert_pem, key_pem: key.serialize_pem() }
    }

    async fn connect(&self, service: &str, db_user: &str) -> Result<sluice_tests::Connected, tokio_postgres::Error> {
        let tls = client_config_from_pem(&self.ca_pem, Some(&self.cert(service, db_user))).unwrap();
        connect(self.control.pg_port, db_user, "appdb", tls).await
    }
}

/// Checks a session through Sluice: the right role, over TLS, authenticated by a certificate
/// whose subject is exactly the database user.
async fn check_session(c: &sluice_tests::Connected) {
    let row = c
        .client
        .query_one(
            "select current_user::text, s.ssl, s.client_dn, s.issuer_dn from pg_stat_ssl s \
             where s.pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let (user, ssl, dn, issuer): (String, bool, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(user, "app_user");
    assert!(ssl, "the upstream leg is not TLS");
    let dn = dn.expect("PostgreSQL saw no client certificate");
    assert_eq!(dn.trim_start_matches('/'), "CN=app_user", "client DN {dn:?}");
    assert!(issuer.as_deref().unwrap_or_default().contains("Sluice database CA"), "issuer {issuer:?}");
}

#[test]
fn cert_auth_upstream_logs_in_as_the_db_user_and_refuses_what_it_should() {
    let s = start("cert-upstream", false);
    assert!(s.sign_stdout.contains("ssl_ca_file"), "{}", s.sign_stdout);
    assert!(s.sign_stdout.contains("hostssl all all"), "{}", s.sign_stdout);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = PathBuf::from(format!("{}.key", s.files.display()));
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let rt = runtime().unwrap();

    // Straight to PostgreSQL (trusting its server certificate) without a client certificate:
    // PostgreSQL refuses, so what gets through Sluice below got through on Sluice's certificate.
    let db_ca_pem = std::fs::read_to_string(format!("{}.cas", s.files.display())).unwrap();
    assert_ne!(db_ca_pem, s.ca_pem, "the database CA is Sluice's user CA");
    let direct_tls = client_config_from_pem(&db_ca_pem, None).unwrap();
    let err = rt.block_on(connect(s.postgres.port, "app_user", "appdb", direct_tls)).err().expect("direct login");
    let db = err.as_db_error().unwrap_or_else(|| panic!("not PostgreSQL's refusal: {err:?}"));
    assert!(db.message().contains("requires a valid client certificate"), "{db:?}");
    // A user's own Sluice certificate whose Common Name is a database role does not get in
    // directly either: it chains to Sluice's user CA, which PostgreSQL does not trust.
    let own = s.cert_for(&route_identity("app_user", "selfhosted", "app_user", "appdb"));
    let direct_tls = client_config_from_pem(&db_ca_pem, Some(&own)).unwrap();
    let err = rt.block_on(connect(s.postgres.port, "app_user", "appdb", direct_tls)).err().expect("bypass login");
    assert!(err.as_db_error().is_none(), "refused only after the TLS handshake: {err:?}");

    let c = rt.block_on(s.connect("selfhosted", "app_user")).unwrap();
    rt.block_on(check_session(&c));

    // Ctrl-C reaches the server (a cancel request over TLS checked against Sluice's CA).
    let tls =
        MakeRustlsConnect::new(client_config_from_pem(&s.ca_pem, Some(&s.cert("selfhosted", "app_user"))).unwrap());
    let err = sluice_tests::cancel_a_sleep(&rt, &c, tls);
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    rt.block_on(c.close()).unwrap();

    // A database user with no role in PostgreSQL: PostgreSQL's own refusal reaches the client.
    let err = rt.block_on(s.connect("selfhosted", "ghost")).err().expect("ghost got in");
    let db = err.as_db_error().unwrap_or_else(|| panic!("not a database error: {err:?}"));
    assert_eq!(db.code(), &SqlState::INVALID_AUTHORIZATION_SPECIFICATION, "{db:?}");
    assert!(db.message().contains("\"ghost\""), "{db:?}");

    // The URI names a host the server certificate was not issued for: Sluice refuses the server.
    let err = rt.block_on(s.connect("wrongname", "app_user")).err().expect("wrong server name accepted");
    let db = err.as_db_error().unwrap_or_else(|| panic!("not a database error: {err:?}"));
    assert_eq!(db.code(), &SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, "{db:?}");
    let msg = db.message().to_lowercase();
    assert!(msg.contains("tls") && msg.contains("not valid for name"), "{db:?}");
    assert!(msg.contains("db.elsewhere.example") && msg.contains("auth sign"), "{db:?}");
    assert!(s.dataplane.is_none());
}

#[test]
fn cert_auth_sessions_are_handed_to_the_dataplane() {
    let s = start("cert-upstream-dp", true);
    let rt = runtime().unwrap();
    let c = rt.block_on(s.connect("selfhosted", "app_user")).unwrap();
    rt.block_on(check_session(&c));
    let rows: i64 =
        rt.block_on(c.client.query_one("select count(*) from generate_series(1, 5000)", &[])).unwrap().get(0);
    assert_eq!(rows, 5000);
    assert_eq!(count_in(&s.dir.join("control").join("control.log"), "session handed to the dataplane"), 1);
    rt.block_on(c.close()).unwrap();
}
