//! The AWS API emulator for discovery tests: moto's server through `tests/support/moto_server.py`
//! (which patches moto to behave like AWS for RDS Proxy), plus the pieces a discovery test needs
//! around it: control started with `AWS_ENDPOINT_URL` pointing at moto, and an RDS Proxy emulator
//! named like a proxy moto created that verifies tokens signed with moto-minted keys.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sluice_control::config::Config;
use sluice_control::demo::{find_bin, wait_for_port, AwsCreds, ControlProc, Emulator, Proc};

/// A running moto server on loopback.
pub struct Moto {
    pub port: u16,
    pub proc: Proc,
}

/// Whether moto can be imported; discovery tests skip with a message only when it cannot.
pub fn moto_available() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.moto_server.werkzeug_app"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether a test that needs moto should skip: `true` (with a note) when moto is missing, and a
/// panic under `CI=true`, where a missing moto is a broken setup, not a reason to pass.
pub fn skip_without_moto() -> bool {
    if moto_available() {
        return false;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but python3 cannot import moto (run scripts/setup)");
    }
    eprintln!("SKIP: python3 cannot import moto (run scripts/setup)");
    true
}

impl Moto {
    /// Starts the wrapper; `page_size` forces small DescribeDBProxies/Endpoints pages.
    pub fn start(dir: &Path, page_size: usize) -> Result<Moto> {
        Moto::start_with_env(dir, page_size, &[])
    }

    /// As [`Moto::start`], with extra environment for moto (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`:
    /// after that many unauthenticated AWS calls, moto checks every signature and IAM policy).
    pub fn start_with_env(dir: &Path, page_size: usize, env: &[(&str, &str)]) -> Result<Moto> {
        std::fs::create_dir_all(dir)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support").join("moto_server.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .env("SLUICE_MOTO_PAGE_SIZE", page_size.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("moto.log"))?);
        let mut proc = Proc::spawn("moto", &mut cmd)?;
        let stdout = proc.take_stdout().ok_or_else(|| anyhow!("no moto stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let port = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(Ok(line))) => line
                .strip_prefix("READY ")
                .and_then(|p| p.trim().parse().ok())
                .ok_or_else(|| anyhow!("unexpected moto output {line:?}"))?,
            _ => bail!("moto did not become ready; see {}", dir.join("moto.log").display()),
        };
        Ok(Moto { port, proc })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, serde_json::Value)> {
        self.request_with(method, path, "Content-Type: application/json\r\n", body)
    }

    /// `headers`: complete header lines, each ending in CRLF.
    fn request_with(&self, method: &str, path: &str, headers: &str, body: &str) -> Result<(u16, serde_json::Value)> {
        let (status, body) = self.raw_request(method, path, headers, body)?;
        Ok((status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)))
    }

    fn raw_request(&self, method: &str, path: &str, headers: &str, body: &str) -> Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed answer {text:?}"))?;
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Ok((status, body.to_owned()))
    }

    /// An unsigned AWS call (moto checks no signature unless started with
    /// `INITIAL_NO_AUTH_ACTION_COUNT`, and not for that many calls): the Authorization header's
    /// credential scope only routes it to `service` in `region`. Fails unless moto answers 200.
    pub fn aws_call(&self, service: &str, region: &str, extra_headers: &str, body: &str) -> Result<String> {
        let headers = format!(
            "{extra_headers}Authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/{region}/{service}/aws4_request, \
             SignedHeaders=host, Signature=0\r\n"
        );
        let (status, text) = self.raw_request("POST", "/", &headers, body)?;
        if status != 200 {
            bail!("moto {service} call answered {status}: {text}");
        }
        Ok(text)
    }

    /// An IAM or STS query-protocol call (`Action=…&Version=…` and `params`); the XML answer.
    pub fn aws_query(&self, service: &str, params: &[(&str, &str)]) -> Result<String> {
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
        self.aws_call(service, "us-east-1", "Content-Type: application/x-www-form-urlencoded\r\n", &body)
    }

    /// Gives role `role` (see `/_sluice/role`) an inline policy and assumes it: the temporary
    /// credentials (with a session token).
    pub fn role_credentials(&self, role: &str, policy: &serde_json::Value) -> Result<AwsCreds> {
        let arn = self.admin("/_sluice/role", serde_json::json!({ "name": role }))?["arn"]
            .as_str()
            .ok_or_else(|| anyhow!("no role ARN"))?
            .to_owned();
        let policy = policy.to_string();
        self.aws_query(
            "iam",
            &[
                ("Action", "PutRolePolicy"),
                ("Version", "2010-05-08"),
                ("RoleName", role),
                ("PolicyName", "sluice-test"),
                ("PolicyDocument", &policy),
            ],
        )?;
        let xml = self.aws_query(
            "sts",
            &[
                ("Action", "AssumeRole"),
                ("Version", "2011-06-15"),
                ("RoleArn", &arn),
                ("RoleSessionName", "sluice-test"),
            ],
        )?;
        let field = |name: &str| {
            let open = format!("<{name}>");
            xml.split_once(&open)
                .and_then(|(_, rest)| rest.split_once(&format!("</{name}>")))
                .map(|(v, _)| v.to_owned())
                .ok_or_else(|| anyhow!("no {name} in the AssumeRole answer {xml}"))
        };
        Ok(AwsCreds {
            access_key: field("AccessKeyId")?,
            secret_key: field("SecretAccessKey")?,
            session_token: Some(field("SessionToken")?),
        })
    }

    /// POSTs to a `/_sluice/` test endpoint and fails unless it answers 200.
    pub fn admin(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let (status, v) = self.request("POST", path, &body.to_string())?;
        if status != 200 {
            bail!("moto {path} answered {status}: {v}");
        }
        Ok(v)
    }

    pub fn get(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        self.request("GET", path, "")
    }

    /// Creates a symmetric KMS key in `region` and returns its ARN.
    pub fn kms_create_key(&self, region: &str) -> Result<String> {
        let headers = "Content-Type: application/x-amz-json-1.1\r\nX-Amz-Target: TrentService.CreateKey\r\n";
        let text = self.aws_call("kms", region, headers, "{}")?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        v["KeyMetadata"]["Arn"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no key ARN in {v}"))
    }

    /// The next `count` RDS calls (-1: all, until `count` 0) fail with `status`/`code`.
    pub fn faults(&self, count: i64, status: u16, code: &str) -> Result<()> {
        self.admin("/_sluice/faults", serde_json::json!({"count": count, "status": status, "code": code}))?;
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.proc.stop(nix::sys::signal::Signal::SIGTERM);
    }
}

/// Starts control on `config` with AWS calls going to `moto` (`AWS_ENDPOINT_URL`, the standard
/// variable every AWS SDK honours) and the credential chain limited to `creds`.
pub fn spawn_control(
    dir: &Path,
    config: Config,
    pg_port: u16,
    api_port: u16,
    creds: &AwsCreds,
    moto: &Moto,
) -> Result<ControlProc> {
    std::fs::create_dir_all(dir)?;
    let config_path = dir.join("control.yaml");
    std::fs::write(&config_path, serde_yaml_to_string(&config)?)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("control.log"))?;
    let mut cmd = Command::new(find_bin("control")?);
    cmd.arg("start").arg("--config").arg(&config_path).stdout(Stdio::null()).stderr(log);
    aws_env(&mut cmd, creds, moto, dir);
    let mut proc = Proc::spawn("control", &mut cmd)?;
    wait_for_port(api_port, Duration::from_secs(30), &mut proc)?;
    wait_for_port(pg_port, Duration::from_secs(30), &mut proc)?;
    Ok(ControlProc { pg_port, api_port, config_path, config, proc })
}

/// The AWS environment of a process talking to moto, isolated from the developer's AWS config.
pub fn aws_env(cmd: &mut Command, creds: &AwsCreds, moto: &Moto, dir: &Path) {
    creds.apply(cmd);
    cmd.env("AWS_ENDPOINT_URL", moto.url())
        .env("AWS_CONFIG_FILE", dir.join("no-aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-aws-credentials"))
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION");
}

fn serde_yaml_to_string(config: &Config) -> Result<String> {
    // Go through JSON: serde_yaml is not a dependency of this crate, and YAML is a superset.
    Ok(serde_json::to_string_pretty(config)?)
}

/// An RDS Proxy emulator answering for `host` (`NAME.proxy-ID.REGION.rds.amazonaws.com`) with
/// tokens naming port `endpoint_port`, looking up unknown access keys in moto.
pub fn start_emulator_for(
    dir: &Path,
    host: &str,
    endpoint_port: u16,
    pg_port: u16,
    moto: &Moto,
    secrets: &[(String, String)],
) -> Result<Emulator> {
    let (port, cmd) = Emulator::command(dir, pg_port, secrets, &[])?;
    spawn_emulator_for(dir, host, endpoint_port, moto, port, cmd, false)
}

/// As [`start_emulator_for`], in MySQL mode in front of MariaDB on `mysql_port`.
pub fn start_mysql_emulator_for(
    dir: &Path,
    host: &str,
    endpoint_port: u16,
    mysql_port: u16,
    moto: &Moto,
    secrets: &[(String, String)],
) -> Result<Emulator> {
    let (port, cmd) = Emulator::command_mysql(dir, mysql_port, secrets, &[])?;
    spawn_emulator_for(dir, host, endpoint_port, moto, port, cmd, true)
}

fn spawn_emulator_for(
    dir: &Path,
    host: &str,
    endpoint_port: u16,
    moto: &Moto,
    port: u16,
    mut cmd: std::process::Command,
    mysql: bool,
) -> Result<Emulator> {
    let labels: Vec<&str> = host.split('.').collect();
    let [name, proxy_id, region, "rds", "amazonaws", "com"] = labels[..] else {
        bail!("{host} is not an RDS Proxy host");
    };
    let proxy_id = proxy_id.strip_prefix("proxy-").context("no proxy- label")?;
    cmd.args(["--name", name, "--region", region, "--proxy-id", proxy_id])
        .args(["--endpoint-port", &endpoint_port.to_string()])
        .args(["--credentials-url", &format!("{}/_sluice/credentials", moto.url())]);
    let mut emulator = Emulator::spawn(dir, port, cmd, false)?;
    emulator.mysql = mysql;
    Ok(emulator)
}
