//! CA keys under a KEK (issue 12, design c7) against real parts: `control storage kek generate`
//! (the binary), and an AWS KMS KEK against moto's KMS with authentication on (Encrypt/Decrypt
//! signed with SigV4 by assumed-role credentials, which moto checks; the encryption context
//! binding a wrap to its cluster and CA), rotation file → KMS → file by re-wrapping, and the
//! blocking API called from a runtime worker, a blocking thread and a plain thread.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use sluice_tests::moto::{skip_without_moto, Moto};
use sluice_tests::sluice_control::demo::find_bin;
use sluice_tests::sluice_control::kek::{self, Kek, KekConfig, KekError, KeyRing, KmsConfig, SealedKey, Wrap};
use sluice_tests::TestDir;

const PEM: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgnot-a-real-key\n-----END PRIVATE KEY-----\n";

#[test]
fn control_storage_kek_generate() {
    let dir = TestDir::new("kek-generate").unwrap();
    let out = dir.join("kek");
    let run = || {
        Command::new(find_bin("control").unwrap())
            .args(["storage", "kek", "generate", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let id = String::from_utf8(first.stdout).unwrap().trim().to_owned();
    assert!(id.starts_with("file:") && id.len() == 21, "{id}");
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    // The id printed is the id the file loads as.
    assert_eq!(kek::load_file(&out).unwrap().id(), id);
    let text = std::fs::read(&out).unwrap();
    assert!(!String::from_utf8_lossy(&first.stderr).contains(String::from_utf8_lossy(&text).trim()));

    let second = run();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), text, "an existing KEK file must not change");
}

fn kms_config(moto: &Moto, arn: &str) -> KekConfig {
    KekConfig {
        file: None,
        aws_kms: Some(KmsConfig { key_id: arn.to_owned(), region: None, endpoint_url: Some(moto.url()) }),
    }
}

#[test]
fn kms_kek_against_moto() {
    if skip_without_moto() {
        return;
    }
    let dir = TestDir::new("kek-kms").unwrap();
    // Four setup calls go unchecked (PutRolePolicy, AssumeRole, two CreateKey); from then on
    // moto checks every SigV4 signature, the session token and the role's IAM policy.
    let moto = Moto::start_with_env(&dir.join("moto"), 100, &[("INITIAL_NO_AUTH_ACTION_COUNT", "4")]).unwrap();
    let policy = serde_json::json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"}]});
    let creds = moto.role_credentials("sluice-kek", &policy).unwrap();
    let arn = moto.kms_create_key("us-east-1").unwrap();
    let other_arn = moto.kms_create_key("us-east-1").unwrap();
    // The default credential chain, limited to these variables (the only test in this binary
    // that reads AWS variables, so setting them here races with nothing).
    std::env::set_var("AWS_ACCESS_KEY_ID", &creds.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &creds.secret_key);
    std::env::set_var("AWS_SESSION_TOKEN", creds.session_token.as_deref().unwrap());
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_CONFIG_FILE", dir.join("no-aws-config"));
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-aws-credentials"));
    for v in ["AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"] {
        std::env::remove_var(v);
    }

    let kms_ring = KeyRing::load(&kms_config(&moto, &arn), &[]).unwrap();
    assert_eq!(kms_ring.ids(), vec![format!("kms:{arn}")]);

    // Seal and open through KMS.
    let sealed = kms_ring.seal("c1", "db", PEM).unwrap();
    assert_eq!(sealed.wraps.len(), 1);
    assert_eq!(sealed.wraps[0].kek_id, format!("kms:{arn}"));
    assert!(!sealed.wraps[0].wrapped_dek.is_empty());
    assert_eq!(kms_ring.open("c1", "db", &sealed).unwrap().as_slice(), PEM);

    // The encryption context binds the wrap to the cluster and CA: KMS refuses it for another.
    for (cluster, ca) in [("c1", "host"), ("c2", "db")] {
        let e = kms_ring.open(cluster, ca, &sealed).unwrap_err();
        assert!(matches!(e, KekError::Authentication(_)), "{cluster}/{ca}: {e}");
    }
    // A flipped bit in the KMS ciphertext, or in the envelope, is refused as such.
    let mut bad = sealed.clone();
    let last = bad.wraps[0].wrapped_dek.len() - 1;
    bad.wraps[0].wrapped_dek[last] ^= 0x10;
    let e = kms_ring.open("c1", "db", &bad).unwrap_err().to_string();
    assert!(e.starts_with("CA key failed authentication"), "{e}");
    let mut bad = sealed.clone();
    bad.envelope[20] ^= 1;
    let e = kms_ring.open("c1", "db", &bad).unwrap_err().to_string();
    assert!(e.starts_with("CA key failed authentication"), "{e}");

    // moto does check the signature: a wrong secret is refused.
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "wrong-secret");
    let e = kms_ring.open("c1", "db", &sealed).unwrap_err();
    assert!(matches!(&e, KekError::Kms(m) if m.contains("Signature")), "{e}");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &creds.secret_key);

    // Another KMS key has no wrap: refused, listing the ids.
    let other_ring = KeyRing::load(&kms_config(&moto, &other_arn), &[]).unwrap();
    let e = other_ring.open("c1", "db", &sealed).unwrap_err().to_string();
    assert_eq!(e, format!("the CA key is wrapped for [kms:{arn}]; this node's KEKs are [kms:{other_arn}]"));

    // Rotation file → KMS with --keep-old: a node still on the file and one on KMS both open it;
    // after retiring the file wrap the file node is refused with the ids.
    let file_path = dir.join("kek-file");
    let file_kek = kek::generate_file(&file_path).unwrap();
    let file_cfg = KekConfig { file: Some(file_path.clone()), aws_kms: None };
    let file_ring = KeyRing::load(&file_cfg, &[]).unwrap();
    let from_file = file_ring.seal("c1", "db", PEM).unwrap();
    let rotating = KeyRing::load(&kms_config(&moto, &arn), std::slice::from_ref(&file_cfg)).unwrap();
    assert_eq!(rotating.open("c1", "db", &from_file).unwrap().as_slice(), PEM);
    let to_kms = Kek::load(&kms_config(&moto, &arn)).unwrap();
    let kms_wrap = rotating.rewrap("c1", "db", &from_file, &to_kms).unwrap();
    assert_eq!(kms_wrap.kek_id, format!("kms:{arn}"));
    let kept =
        SealedKey { envelope: from_file.envelope.clone(), wraps: vec![from_file.wraps[0].clone(), kms_wrap.clone()] };
    assert_eq!(file_ring.open("c1", "db", &kept).unwrap().as_slice(), PEM);
    assert_eq!(kms_ring.open("c1", "db", &kept).unwrap().as_slice(), PEM);
    let retired = SealedKey { envelope: from_file.envelope.clone(), wraps: vec![kms_wrap] };
    assert_eq!(kms_ring.open("c1", "db", &retired).unwrap().as_slice(), PEM);
    let e = file_ring.open("c1", "db", &retired).unwrap_err().to_string();
    assert_eq!(e, format!("the CA key is wrapped for [kms:{arn}]; this node's KEKs are [{}]", file_kek.id()));

    // And back KMS → file: unwrapped by KMS, wrapped by a new file KEK, which alone opens it.
    let new_file = kek::generate_file(&dir.join("kek-file-2")).unwrap();
    let file_wrap: Wrap = kms_ring.rewrap("c1", "db", &retired, &new_file).unwrap();
    let back = SealedKey { envelope: retired.envelope.clone(), wraps: vec![file_wrap] };
    assert_eq!(KeyRing::new(new_file, vec![]).open("c1", "db", &back).unwrap().as_slice(), PEM);

    // The blocking API works from a runtime worker, a blocking-pool thread and a plain thread.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let ring = std::sync::Arc::new(kms_ring);
    let (r1, r2) = (ring.clone(), ring.clone());
    let (s1, s2) = (sealed.clone(), sealed.clone());
    rt.block_on(async move {
        let on_worker = tokio::spawn(async move { r1.open("c1", "db", &s1).map(|k| k.to_vec()) }).await.unwrap();
        assert_eq!(on_worker.unwrap(), PEM);
        let on_blocking =
            tokio::task::spawn_blocking(move || r2.open("c1", "db", &s2).map(|k| k.to_vec())).await.unwrap();
        assert_eq!(on_blocking.unwrap(), PEM);
    });
    let r3 = ring.clone();
    let plain = std::thread::spawn(move || r3.seal("c1", "host", PEM)).join().unwrap().unwrap();
    assert_eq!(ring.open("c1", "host", &plain).unwrap().as_slice(), PEM);

    // With moto gone the call fails with an error naming KMS, not a hang or a panic.
    drop(moto);
    let e = ring.open("c1", "db", &sealed).unwrap_err();
    assert!(matches!(e, KekError::Kms(_)), "{e}");
}

/// `control storage kek rotate/retire/ls` on a sealed embedded state: a rotation with
/// `--keep-old` keeps nodes on the old KEK working while others move; after `retire` the old KEK
/// opens nothing and says which KEKs would; a plain rotation leaves only the new wrap; the CA
/// (its pin) never changes.
#[test]
fn kek_rotation_with_the_cli() {
    let dir = TestDir::new("kek-rotate").unwrap();
    let keys: Vec<_> = (1..=3)
        .map(|i| {
            let path = dir.join(format!("kek{i}"));
            let id = kek::generate_file(&path).unwrap().id().to_owned();
            (path, id)
        })
        .collect();
    let config_for = |k: usize| {
        let path = dir.join(format!("control-{k}.yaml"));
        let yaml = format!(
            "data_dir: {}\nauth_service:\n  storage:\n    type: sqlite\n    kek: {{file: {}}}\n",
            dir.join("data").display(),
            keys[k].0.display()
        );
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let run = |config: &std::path::Path, args: &[&str]| {
        let out = Command::new(find_bin("control").unwrap()).arg("--config").arg(config).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let ok = |config: &std::path::Path, args: &[&str]| {
        let (ok, text) = run(config, args);
        assert!(ok, "control {args:?}: {text}");
        text
    };
    let pin = |config: &std::path::Path| {
        ok(config, &["status"]).lines().find(|l| l.starts_with("CA pin")).unwrap().to_owned()
    };
    let (c1, c2, c3) = (config_for(0), config_for(1), config_for(2));
    let first = pin(&c1);
    assert_eq!(ok(&c1, &["storage", "kek", "ls"]).trim(), keys[0].1);
    // The sealed key is not in the file.
    let db = std::fs::read(dir.join("data").join("sluice.db")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains("PRIVATE KEY"), "the CA key is stored in plaintext");

    ok(&c1, &["storage", "kek", "rotate", "--to-file", keys[1].0.to_str().unwrap(), "--keep-old"]);
    assert_eq!(pin(&c1), first, "a node still on the old KEK stopped working");
    assert_eq!(pin(&c2), first, "a node on the new KEK cannot open the CA key");
    ok(&c2, &["storage", "kek", "retire", &keys[0].1]);
    let (opened, text) = run(&c1, &["status"]);
    assert!(!opened, "the retired KEK still opens the CA key");
    assert!(text.contains(&format!("wrapped for [{}]", keys[1].1)), "{text}");
    let (retired, text) = run(&c2, &["storage", "kek", "retire", &keys[1].1]);
    assert!(!retired && text.contains("only KEK"), "the last wrap was retired: {text}");

    ok(&c2, &["storage", "kek", "rotate", "--to-file", keys[2].0.to_str().unwrap()]);
    assert_eq!(ok(&c3, &["storage", "kek", "ls"]).trim(), keys[2].1);
    assert!(!run(&c2, &["status"]).0, "a replaced KEK still opens the CA key");
    assert_eq!(pin(&c3), first);
}
