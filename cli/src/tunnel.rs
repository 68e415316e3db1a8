//! `sluice proxy db --tunnel NAME`: a local listener for clients that cannot present a client
//! certificate (GUI tools, JDBC pools), like `tsh proxy db --tunnel`. It accepts plaintext
//! PostgreSQL on 127.0.0.1 (or a Unix socket) with no password, and opens each session to Sluice
//! with TLS and the user's database certificate (from `sluice db login`), fetching a new one when
//! it nears expiry while the login is still valid. The startup message goes through as the client
//! sent it (Sluice checks it against the certificate); cancel requests are passed on as libpq
//! sends them. The negotiation with the local client is the same sans-IO machine Sluice's own
//! listener runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sluice_pgwire::{encode, sqlstate, ErrorFields, Event, ServerNegotiation, StartupMessage, TlsOffer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::{db_env, db_login, DbProfile, Paths};

/// A certificate this close to expiry is replaced before the next session.
const RENEW_BEFORE: Duration = Duration::from_secs(60);
/// Connecting to Sluice and its TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the tunnel listens.
pub enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

/// How sessions reach Sluice, with the certificate in use.
struct Upstream {
    /// Sluice's PostgreSQL endpoints, tried in order.
    hosts: Vec<(String, u16)>,
    tls: Arc<ClientConfig>,
    expires: OffsetDateTime,
    db_user: String,
    db_name: String,
}

struct Shared {
    paths: Paths,
    name: String,
    upstream: Mutex<Arc<Upstream>>,
}

async fn load(paths: &Paths, name: &str) -> Result<Upstream> {
    let env = db_env(paths, name).await?;
    let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    // libpq's multi-host form: PGHOST=a,b PGPORT=p,q (one port for all, or one each).
    let hosts: Vec<String> = get("PGHOST").split(',').map(str::to_owned).collect();
    let ports: Vec<u16> = get("PGPORT")
        .split(',')
        .map(|p| p.parse().with_context(|| format!("bad port {p:?}")))
        .collect::<Result<_>>()?;
    let hosts: Vec<(String, u16)> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| (h, ports.get(i).or(ports.first()).copied().unwrap_or(5433)))
        .collect();
    let read = |k: &str| std::fs::read(get(k)).with_context(|| format!("reading {}", get(k)));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read("PGSSLROOTCERT")?) {
        roots.add(cert.context("the cluster CA")?)?;
    }
    let chain = CertificateDer::pem_slice_iter(&read("PGSSLCERT")?)
        .collect::<Result<Vec<_>, _>>()
        .context("the certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&read("PGSSLKEY")?).context("the certificate's key")?;
    let mut tls = ClientConfig::builder_with_provider(sluice_api::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![b"postgresql".to_vec()];
    let meta: DbProfile = serde_json::from_slice(&std::fs::read(paths.db_file(name, "json"))?)?;
    let expires = OffsetDateTime::parse(&meta.expires, &Rfc3339).context("the certificate's expiry")?;
    Ok(Upstream { hosts, tls: Arc::new(tls), expires, db_user: meta.db_user, db_name: meta.db_name })
}

impl Shared {
    /// The upstream to open the next session with, after fetching a new certificate if this one
    /// is about to expire.
    async fn current(&self) -> Result<Arc<Upstream>> {
        let mut up = self.upstream.lock().await;
        if up.expires - OffsetDateTime::now_utc() > RENEW_BEFORE {
            return Ok(up.clone());
        }
        db_login(&self.paths, &self.name, &up.db_user, &up.db_name)
            .await
            .context("the database certificate expired and a new one could not be fetched (run `sluice login`)")?;
        *up = Arc::new(load(&self.paths, &self.name).await?);
        eprintln!("fetched a new certificate for {} (valid until {})", self.name, up.expires);
        Ok(up.clone())
    }
}

/// Runs the tunnel until interrupted.
pub async fn run(paths: Paths, name: String, listen: Listen) -> Result<()> {
    let upstream = load(&paths, &name).await?;
    let user = upstream.db_user.clone();
    let dbname = if upstream.db_name.is_empty() { user.clone() } else { upstream.db_name.clone() };
    let shared = Arc::new(Shared { paths, name: name.clone(), upstream: Mutex::new(Arc::new(upstream)) });
    match listen {
        Listen::Tcp(port) => {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.context("binding 127.0.0.1")?;
            let port = listener.local_addr()?.port();
            say(&format!(
                "Started DB tunnel for {name} on 127.0.0.1:{port}\n\
                 Use this connection string: postgres://{user}@127.0.0.1:{port}/{dbname}?sslmode=disable\n\
                 or: psql \"host=127.0.0.1 port={port} user={user} dbname={dbname} sslmode=disable\""
            ));
            loop {
                let (conn, _) = listener.accept().await?;
                let _ = conn.set_nodelay(true);
                tokio::spawn(session(conn, shared.clone()));
            }
        }
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener =
                tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
            // Only this user's clients: the tunnel speaks with this user's certificate.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            say(&format!(
                "Started DB tunnel for {name} on {}\nor: psql \"host={} user={user} dbname={dbname}\"",
                path.display(),
                path.parent().unwrap_or(&path).display()
            ));
            loop {
                let (conn, _) = listener.accept().await?;
                tokio::spawn(session(conn, shared.clone()));
            }
        }
    }
}

/// Prints the tunnel's address; a reader that went away must not take the tunnel down.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// One local client, until either side closes.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(mut client: S, shared: Arc<Shared>) {
    let mut neg = ServerNegotiation::new(TlsOffer::None);
    let startup = match negotiate(&mut client, &mut neg).await {
        Ok(Some(Step::Startup(m))) => m,
        Ok(Some(Step::Cancel(bytes))) => {
            forward_cancel(&shared, &bytes).await;
            return;
        }
        Ok(None) => return,
        Err(e) => {
            eprintln!("tunnel: {e:#}");
            return;
        }
    };
    let mut upstream = match open(&shared, &startup).await {
        Ok(s) => s,
        Err(e) => {
            let fields = ErrorFields::fatal(sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, format!("{e:#}"));
            let _ = client.write_all(&encode::error_response(&fields)).await;
            let _ = client.shutdown().await;
            eprintln!("tunnel: {e:#}");
            return;
        }
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

enum Step {
    Startup(StartupMessage),
    /// The CancelRequest, as the client sent it.
    Cancel(Vec<u8>),
}

/// The local client's negotiation: encryption requests are answered `N`, then a StartupMessage
/// or a CancelRequest. `None` when the client went away.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, neg: &mut ServerNegotiation) -> Result<Option<Step>> {
    let mut chunk = Vec::new();
    loop {
        match neg.next_event() {
            Ok(Event::NeedMore(n)) => {
                chunk.resize(n, 0);
                if s.read_exact(&mut chunk).await.is_err() {
                    return Ok(None);
                }
                neg.feed(&chunk);
            }
            Ok(Event::Reply(answer)) => {
                s.write_all(&[answer]).await?;
                s.flush().await?;
            }
            Ok(Event::StartTls { .. }) => bail!("the client asked for TLS, which the tunnel does not offer"),
            Ok(Event::Cancel(c)) => return Ok(Some(Step::Cancel(encode::cancel_request(c.pid, &c.secret)))),
            Ok(Event::Startup(m)) => return Ok(Some(Step::Startup(m))),
            Err(e) => {
                let _ = s.write_all(&encode::error_response(&e.error_fields())).await;
                let _ = s.shutdown().await;
                return Err(anyhow!("{e}"));
            }
        }
    }
}

/// Opens a session to Sluice (SSLRequest, TLS with the certificate) and sends it the client's
/// StartupMessage.
async fn open(shared: &Shared, startup: &StartupMessage) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let up = shared.current().await?;
    let mut last = anyhow!("no Sluice endpoint to connect to");
    for (host, port) in &up.hosts {
        let attempt = async {
            let mut tcp = TcpStream::connect((host.as_str(), *port)).await?;
            tcp.set_nodelay(true)?;
            tcp.write_all(&encode::ssl_request()).await?;
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer).await?;
            if answer[0] != b'S' {
                bail!("{host}:{port} does not offer TLS");
            }
            let name = ServerName::try_from(host.clone())?;
            let mut tls = tokio_rustls::TlsConnector::from(up.tls.clone()).connect(name, tcp).await?;
            tls.write_all(&encode::startup(startup.version, &startup.params)).await?;
            tls.flush().await?;
            Ok(tls)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(tls)) => return Ok(tls),
            Ok(Err(e)) => last = e.context(format!("connecting to Sluice at {host}:{port}")),
            Err(_) => last = anyhow!("connecting to Sluice at {host}:{port} timed out"),
        }
    }
    Err(last)
}

/// Passes a cancel request on to Sluice (plaintext, as libpq sends it), which routes it to the
/// session that owns the key.
async fn forward_cancel(shared: &Shared, request: &[u8]) {
    let up = shared.upstream.lock().await.clone();
    for (host, port) in &up.hosts {
        if let Ok(Ok(mut tcp)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), *port))).await
        {
            if tcp.write_all(request).await.is_ok() {
                let _ = tcp.shutdown().await;
                return;
            }
        }
    }
    eprintln!("tunnel: could not pass a cancel request on to Sluice");
}
