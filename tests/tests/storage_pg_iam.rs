//! The storage connection with `aws_iam`: a token minted per connection for the conn string's
//! host, port and user, checked by the RDS Proxy emulator in front of the storage PostgreSQL
//! (verify-full against the emulator's CA, the region read from the `*.rds.amazonaws.com` host),
//! with LISTEN/NOTIFY through the proxy. Its own test binary: the AWS credentials come from the
//! process environment, which is set before any other thread runs.

use std::time::Duration;

use sluice_tests::sluice_control::demo::{AwsCreds, Emulator};
use sluice_tests::sluice_control::pgconn::{PgAwsIam, PgConnError, PgConnector, PgStorage};
use sluice_tests::sluice_control::state::random_secret;
use sluice_tests::{runtime, StoragePg, TestDir};

#[test]
fn aws_iam_logs_in_through_rds_proxy() {
    let creds = AwsCreds::demo();
    // The standard chain reads these; IMDS is off so nothing leaves loopback.
    std::env::set_var("AWS_ACCESS_KEY_ID", &creds.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &creds.secret_key);
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::remove_var("AWS_SESSION_TOKEN");
    std::env::remove_var("AWS_PROFILE");

    let dir = TestDir::new("pgconn-iam").unwrap();
    let pg = StoragePg::start(dir.path()).unwrap();
    // The emulator logs in to PostgreSQL with a stored secret over plain loopback TCP, which the
    // harness admits for roles other than `sluice`.
    let backend_pw = random_secret(16);
    pg.pg.psql("postgres", &format!("CREATE ROLE sluice_proxy LOGIN PASSWORD '{backend_pw}'")).unwrap();
    pg.pg.psql("postgres", "GRANT CONNECT ON DATABASE sluice TO sluice_proxy").unwrap();
    let emu =
        Emulator::start(&dir.join("emulator"), pg.pg.port, &[creds], &[("sluice_proxy".into(), backend_pw)]).unwrap();
    let host = emu.endpoint.split(':').next().unwrap().to_owned();
    assert!(host.ends_with(".us-east-1.rds.amazonaws.com"), "{host}");
    let conn_string = format!(
        "host={host} hostaddr=127.0.0.1 port={} dbname=sluice user=sluice_proxy sslmode=verify-full sslrootcert={}",
        emu.port,
        emu.ca_file.display()
    );
    let storage = PgStorage {
        conn_string,
        password_file: None,
        aws_iam: Some(PgAwsIam { region: None, assume_role_arn: None, external_id: None }),
        pool_size: 2,
    };
    let connector = PgConnector::new(&storage).unwrap();
    runtime().unwrap().block_on(async {
        let (listener, mut rx) = connector.connect_listening().await.unwrap();
        let user: String = listener.query_one("select current_user", &[]).await.unwrap().get(0);
        assert_eq!(user, "sluice_proxy");
        listener.batch_execute("LISTEN sluice_change").await.unwrap();
        let other = connector.connect().await.unwrap();
        other.execute("select pg_notify('sluice_change', 'via proxy')", &[]).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no notification through the proxy within 5 s")
            .expect("the notification stream ended");
        assert_eq!(n.payload(), "via proxy");
    });

    // A token signed for another region is refused by the proxy: the token is what logs in.
    let wrong = PgStorage {
        aws_iam: Some(PgAwsIam { region: Some("eu-west-1".into()), assume_role_arn: None, external_id: None }),
        ..storage
    };
    let e = runtime().unwrap().block_on(PgConnector::new(&wrong).unwrap().connect()).expect_err("wrong region");
    assert!(matches!(e, PgConnError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("IAM authentication failed"), "{e}");
}
