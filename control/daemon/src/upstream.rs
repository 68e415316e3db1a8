//! The upstream leg: TCP to the RDS Proxy endpoint, SSLRequest, TLS verify-full, StartupMessage,
//! and the IAM token as the cleartext password, driving `sluice_pgwire::UpstreamStartup` over
//! the socket. With `auth: cert` (self-hosted PostgreSQL) the TLS handshake presents a client
//! certificate for the database user instead, and no password is sent. Returns the authenticated stream with the
//! server's greeting (parameter status, backend key) for control to pass on.
//!
//! `tls.mode: disable` (loopback targets only, checked by the config) skips the SSLRequest and
//! TLS, so the data plane can splice the leg as it is.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use sluice_mysqlwire as my;
pub use sluice_pgwire::Greeting;
use sluice_pgwire::{encode, ErrorFields, UpstreamEvent, UpstreamStartup, UpstreamStartupError};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::catalog::Database;
use crate::config::{ConfigError, TlsMode, UpstreamAuth};
use crate::iam::{CredentialSource, IamError, TokenMinter, TokenTarget};
use crate::leg::Leg;
use crate::tls::{TlsError, UpstreamTls};

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("database {db:?} is misconfigured: {source}")]
    Config { db: String, source: ConfigError },
    #[error("could not connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error(
        "timed out connecting to {addr} (check that the endpoint is reachable from Sluice: security groups, routes)"
    )]
    ConnectTimeout { addr: String },
    #[error("{addr} refused TLS; RDS Proxy must have RequireTLS enabled")]
    NoTls { addr: String },
    #[error("TLS to {addr} failed: {message}")]
    Tls { addr: String, message: String },
    #[error(transparent)]
    TlsConfig(#[from] TlsError),
    #[error(transparent)]
    Iam(#[from] IamError),
    #[error("upstream rejected the session")]
    Rejected(ErrorFields),
    #[error("upstream asked for {0} authentication; IAM authentication must be REQUIRED on the RDS Proxy")]
    UnsupportedAuth(String),
    #[error(
        "upstream asked for {0} authentication instead of accepting Sluice's client certificate \
         (auth: cert): pg_hba.conf must use `hostssl … cert` for Sluice's address"
    )]
    CertNotAccepted(String),
    /// A MySQL upstream answered with an ERR packet.
    #[error("upstream rejected the session: {} ({})", .0.message, .0.code)]
    MysqlRejected(sluice_mysqlwire::ErrPacket),
    /// The MySQL client relies on a capability the upstream lacks.
    #[error("the database does not support what the client uses ({0:?}); use a client without it")]
    MysqlCapabilities(sluice_mysqlwire::CapabilityFlags),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl UpstreamError {
    fn from_startup(e: UpstreamStartupError, dial: &(String, u16)) -> Self {
        match e {
            UpstreamStartupError::NoTls => UpstreamError::NoTls { addr: format!("{}:{}", dial.0, dial.1) },
            UpstreamStartupError::Rejected(fields) => UpstreamError::Rejected(fields),
            UpstreamStartupError::UnsupportedAuth(what) => UpstreamError::UnsupportedAuth(what),
            UpstreamStartupError::Protocol(what) => UpstreamError::Protocol(what),
            UpstreamStartupError::Wire(e) => UpstreamError::Protocol(e.to_string()),
        }
    }
}

/// Everything needed to send a CancelRequest to the upstream later.
#[derive(Clone)]
pub struct CancelTarget {
    pub dial: (String, u16),
    pub server_name: ServerName<'static>,
    /// `None` for a `tls.mode: disable` upstream.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub pid: u32,
    pub secret: Vec<u8>,
}

/// The authenticated upstream leg.
pub type UpstreamStream = Leg<TlsStream<TcpStream>, TcpStream>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn cfg_err(db: &Database) -> impl FnOnce(ConfigError) -> UpstreamError + '_ {
    move |source| UpstreamError::Config { db: db.name.clone(), source }
}

async fn dial_tcp(dial: &(String, u16)) -> Result<TcpStream, UpstreamError> {
    let addr = format!("{}:{}", dial.0, dial.1);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((dial.0.as_str(), dial.1)))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { addr: addr.clone() })?
        .map_err(|source| UpstreamError::Connect { addr: addr.clone(), source })?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Dials and, unless TLS is disabled, TLS-handshakes with the name checked.
async fn dial(
    dial: &(String, u16),
    server_name: ServerName<'static>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<UpstreamStream, UpstreamError> {
    let tcp = dial_tcp(dial).await?;
    match tls {
        Some(tls) => Ok(Leg::Tls(handshake_tls(dial, tcp, server_name, tls).await?)),
        None => Ok(Leg::Plain(tcp)),
    }
}

/// The SSLRequest exchange and the TLS handshake of a connection that only sends a
/// CancelRequest (a session's startup runs through [`UpstreamStartup`]).
async fn handshake_tls(
    dial: &(String, u16),
    mut tcp: TcpStream,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, UpstreamError> {
    tcp.write_all(&encode::ssl_request()).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(UpstreamError::NoTls { addr: format!("{}:{}", dial.0, dial.1) });
    }
    connect_tls(dial, tcp, server_name, tls).await
}

/// The TLS handshake, with the server name checked.
async fn connect_tls(
    dial: &(String, u16),
    tcp: TcpStream,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, UpstreamError> {
    let addr = format!("{}:{}", dial.0, dial.1);
    TlsConnector::from(tls).connect(server_name, tcp).await.map_err(|e| {
        let mut message = e.to_string();
        if message.contains("NotValidForName") || message.contains("not valid for name") {
            message.push_str(
                " (a certificate that relies on the legacy Common Name field instead of SANs is not accepted; \
                 rotate the RDS certificate, or set tls.server_name for custom endpoints; a self-hosted \
                 server's certificate must name the uri's host: control auth sign --format=db --host)",
            );
        }
        UpstreamError::Tls { addr, message }
    })
}

/// Where to dial, the host and port tokens are signed for, and the TLS name to check.
struct Endpoint {
    host: String,
    port: u16,
    dial: (String, u16),
    server_name: ServerName<'static>,
}

fn endpoint(db: &Database) -> Result<Endpoint, UpstreamError> {
    let (host, port) = db.spec.host_port().map_err(cfg_err(db))?;
    let dial = db.spec.dial_target().map_err(cfg_err(db))?;
    let name = db.spec.tls_server_name().map_err(cfg_err(db))?;
    let server_name = ServerName::try_from(name.clone()).map_err(|_| UpstreamError::Config {
        db: db.name.clone(),
        source: ConfigError::Invalid(format!("bad TLS server name {name:?}")),
    })?;
    Ok(Endpoint { host, port, dial, server_name })
}

/// An RDS IAM auth token for `db_user` at the endpoint, minted (or taken from the cache) before
/// dialing, so that a credentials problem is reported as such, not as a timeout. Failures are
/// counted where they are matched (the proxy's refusal), not here or in the minter.
async fn iam_token(db: &Database, at: &Endpoint, db_user: &str, minter: &TokenMinter) -> Result<String, UpstreamError> {
    let region = db.spec.region().ok_or(IamError::NoRegion)?;
    let source = CredentialSource {
        region: region.clone(),
        assume_role_arn: db.spec.aws.assume_role_arn.clone(),
        external_id: db.spec.aws.external_id.clone(),
    };
    let target = TokenTarget { host: at.host.clone(), port: at.port, user: db_user.to_owned(), region };
    Ok(minter.token(&source, &target).await?)
}

/// Opens an authenticated upstream session for `db_user`/`db_name`.
#[allow(clippy::too_many_arguments)]
pub async fn connect(
    db: &Database,
    db_user: &str,
    db_name: &str,
    extra_params: &[(String, String)],
    minter: &TokenMinter,
    upstream_tls: &UpstreamTls,
) -> Result<(UpstreamStream, Greeting, CancelTarget), UpstreamError> {
    let at = endpoint(db)?;
    // The session's config may present a client certificate; cancel requests need none.
    let (tls, cancel_tls) = match db.spec.tls.mode {
        TlsMode::VerifyFull => {
            (Some(upstream_tls.session_config(&db.spec, db_user)?), Some(upstream_tls.server_config(&db.spec)?))
        }
        TlsMode::Disable => (None, None),
    };
    let mut params = vec![("user".to_owned(), db_user.to_owned()), ("database".to_owned(), db_name.to_owned())];
    params.extend(extra_params.iter().cloned());
    let cert_auth = db.spec.auth == UpstreamAuth::Cert;
    let mut startup = if cert_auth {
        UpstreamStartup::without_password(params)
    } else {
        UpstreamStartup::new(tls.is_some(), params, iam_token(db, &at, db_user, minter).await?)
    };
    let Endpoint { dial, server_name, .. } = at;
    let mut s: UpstreamStream = Leg::Plain(dial_tcp(&dial).await?);
    let mut chunk = Vec::new();
    let greeting = loop {
        match startup.next_event() {
            Ok(UpstreamEvent::Send(bytes)) => write_all_flush(&mut s, &bytes).await?,
            Ok(UpstreamEvent::NeedMore(n)) => {
                chunk.resize(n, 0);
                s.read_exact(&mut chunk).await?;
                startup.feed(&chunk);
            }
            Ok(UpstreamEvent::StartTls) => {
                let (Leg::Plain(tcp), Some(config)) = (s, tls.clone()) else {
                    return Err(UpstreamError::Protocol("TLS asked for twice".into()));
                };
                s = Leg::Tls(connect_tls(&dial, tcp, server_name.clone(), config).await?);
                startup.tls_established();
            }
            Ok(UpstreamEvent::Done(greeting)) => break greeting,
            Err(UpstreamStartupError::UnsupportedAuth(what)) if cert_auth => {
                return Err(UpstreamError::CertNotAccepted(what))
            }
            Err(e) => return Err(UpstreamError::from_startup(e, &dial)),
        }
    };
    let (pid, secret) = greeting.backend_key.clone().unwrap_or_default();
    let cancel = CancelTarget { dial, server_name, tls: cancel_tls, pid, secret };
    Ok((s, greeting, cancel))
}

/// Sends a CancelRequest to the upstream, inside TLS as RDS Proxy requires (unless disabled).
pub async fn cancel(target: &CancelTarget) -> Result<(), UpstreamError> {
    let mut s = dial(&target.dial, target.server_name.clone(), target.tls.clone()).await?;
    s.write_all(&encode::cancel_request(target.pid, &target.secret)).await?;
    s.flush().await?;
    // The server closes after reading the request; wait briefly so it is read before we close.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
    Ok(())
}

/// Ensures writes are generic over stream kinds.
pub async fn write_all_flush<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

impl UpstreamError {
    fn from_mysql(e: my::UpstreamHandshakeError, dial: &(String, u16)) -> Self {
        match e {
            my::UpstreamHandshakeError::NoTls => UpstreamError::NoTls { addr: format!("{}:{}", dial.0, dial.1) },
            my::UpstreamHandshakeError::Rejected(err) => UpstreamError::MysqlRejected(err),
            my::UpstreamHandshakeError::UnsupportedAuth(what) => UpstreamError::UnsupportedAuth(what),
            my::UpstreamHandshakeError::Capabilities(c) => UpstreamError::MysqlCapabilities(c),
            other => UpstreamError::Protocol(other.to_string()),
        }
    }
}

/// A MySQL upstream session: the stream after the OK, what it said, and how to reach it again
/// (to send a `KILL QUERY` for it).
pub struct MysqlUpstream {
    pub stream: UpstreamStream,
    pub session: my::UpstreamSession,
}

/// What a MySQL login asks of the upstream, from the client's handshake response.
pub struct MysqlClient {
    pub capabilities: my::CapabilityFlags,
    pub charset: u8,
    pub max_packet_size: u32,
    pub connect_attrs: Vec<(String, String)>,
}

/// Opens an authenticated MySQL upstream session for `db_user` (default database `db_name`):
/// TCP, greeting, SSLRequest, TLS verify-full (unless disabled for loopback), the handshake
/// response, and the IAM token on the switch to `mysql_clear_password`.
pub async fn connect_mysql(
    db: &Database,
    db_user: &str,
    db_name: Option<&str>,
    client: MysqlClient,
    minter: &TokenMinter,
    upstream_tls: &UpstreamTls,
) -> Result<MysqlUpstream, UpstreamError> {
    let at = endpoint(db)?;
    if db.spec.auth == UpstreamAuth::Cert {
        return Err(UpstreamError::Config {
            db: db.name.clone(),
            source: ConfigError::Invalid("auth: cert is not supported for MySQL databases; use IAM".into()),
        });
    }
    let tls = match db.spec.tls.mode {
        TlsMode::VerifyFull => Some(upstream_tls.server_config(&db.spec)?),
        TlsMode::Disable => None,
    };
    let token = iam_token(db, &at, db_user, minter).await?;
    let Endpoint { dial, server_name, .. } = at;
    let mut hs = my::UpstreamHandshake::new(my::UpstreamLogin {
        user: db_user.to_owned(),
        database: db_name.filter(|d| !d.is_empty()).map(str::to_owned),
        client_capabilities: client.capabilities,
        charset: client.charset,
        max_packet_size: client.max_packet_size,
        connect_attrs: client.connect_attrs,
        password: token,
        tls: tls.is_some(),
    });
    let mut s: UpstreamStream = Leg::Plain(dial_tcp(&dial).await?);
    let mut chunk = Vec::new();
    let session = loop {
        match hs.next_event() {
            Ok(my::UpstreamEvent::Send(bytes)) => write_all_flush(&mut s, &bytes).await?,
            Ok(my::UpstreamEvent::NeedMore(n)) => {
                chunk.resize(n, 0);
                s.read_exact(&mut chunk).await?;
                hs.feed(&chunk);
            }
            Ok(my::UpstreamEvent::StartTls) => {
                let (Leg::Plain(tcp), Some(config)) = (s, tls.clone()) else {
                    return Err(UpstreamError::Protocol("TLS asked for twice".into()));
                };
                s = Leg::Tls(connect_tls(&dial, tcp, server_name.clone(), config).await?);
                hs.tls_established();
            }
            Ok(my::UpstreamEvent::Done(session)) => break *session,
            Err(e) => return Err(UpstreamError::from_mysql(e, &dial)),
        }
    };
    Ok(MysqlUpstream { stream: s, session })
}
