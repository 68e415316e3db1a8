//! IAM token minting cost (a fresh SigV4 presign; control reuses tokens with > 5 min left, so
//! this is paid about once per 10 minutes per (credentials, endpoint, user)).

use aws_credential_types::Credentials;
use criterion::{criterion_group, criterion_main, Criterion};
use sluice_control::iam::{generate_auth_token, TokenTarget};
use std::hint::black_box;
use std::time::SystemTime;

fn mint(c: &mut Criterion) {
    let creds = Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, None, "bench");
    let target = TokenTarget {
        host: "pg-proxy-1.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com".into(),
        port: 5432,
        user: "app_user".into(),
        region: "us-east-1".into(),
    };
    c.bench_function("iam_token/generate", |b| {
        b.iter(|| generate_auth_token(black_box(&creds), black_box(&target), SystemTime::now()))
    });
}

criterion_group!(benches, mint);
criterion_main!(benches);
