//! One client connection: TLS, IAM token check, backend login with the stored secret, relay.
//!
//! Mirrors RDS Proxy's observable behaviour towards a PostgreSQL client. Everything up to the
//! relay runs under one deadline, and reads are exact (never past the current packet) so that no
//! client byte is ever buffered across the TLS upgrade and the backend's greeting after
//! AuthenticationOk reaches the client untouched through the relay.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use sluice_pgwire::{
    decode_message, decode_startup, encode, parse_password, sqlstate, BackendMessage, ErrorFields, Framer,
    ProtocolVersion, StartupMessage, StartupPacket, WireError, MAX_SETUP_MESSAGE_LEN,
};
use thiserror::Error;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::scram::{self, ScramClient, ScramError, ServerFinalCheck};
use crate::sigv4::{verify_token, CredentialStore, Expectation, TokenError};

pub(crate) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Larger than copy_bidirectional's 8 KiB default so bulk COPY traffic moves in fewer syscalls.
const RELAY_BUFFER: usize = 64 * 1024;

pub struct ProxyConfig {
    pub endpoint_host: String,
    pub endpoint_port: u16,
    pub region: String,
    pub credentials: CredentialStore,
    /// Where unknown access keys are looked up (see `lookup`).
    pub credentials_url: Option<String>,
    /// The "Secrets Manager" password for each database user.
    pub secrets: HashMap<String, String>,
    pub backend: String,
    pub tls: TlsAcceptor,
    /// Serve clients without TLS (a non-TLS test upstream, so Sluice's upstream leg can be spliced
    /// as is). Real RDS Proxies with RequireTLS never do this.
    pub plaintext: bool,
}

#[derive(Debug, Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("handshake took longer than {HANDSHAKE_DEADLINE:?}")]
    Timeout,
    #[error("backend: {0}")]
    Backend(&'static str),
    #[error("backend SCRAM: {0}")]
    Scram(#[from] ScramError),
}

/// A logged-in client and its backend connection, ready to relay.
enum Session {
    Tls(Box<TlsStream<TcpStream>>, TcpStream),
    Plain(TcpStream, TcpStream),
}

/// Serves one client to completion; errors end only this connection.
pub async fn handle_connection(tcp: TcpStream, cfg: Arc<ProxyConfig>) {
    let result = match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(tcp, &cfg)).await {
        Ok(Ok(Some(Session::Tls(client, backend)))) => relay(*client, backend).await,
        Ok(Ok(Some(Session::Plain(client, backend)))) => relay(client, backend).await,
        Ok(Ok(None)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnError::Timeout),
    };
    if let Err(e) = result {
        warn!(error = %e, "connection failed");
    }
}

pub(crate) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    mut backend: TcpStream,
) -> Result<(), ConnError> {
    match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut backend, RELAY_BUFFER, RELAY_BUFFER).await {
        Ok((up, down)) => {
            info!(client_to_backend = up, backend_to_client = down, "connection closed");
            Ok(())
        }
        // A client that drops TCP without a TLS close_notify has still simply ended its session.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            info!("connection closed by client without close_notify");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn handshake(mut tcp: TcpStream, cfg: &ProxyConfig) -> Result<Option<Session>, ConnError> {
    loop {
        let (packet, raw) = read_startup(&mut tcp).await?;
        match packet {
            StartupPacket::GssEncRequest => tcp.write_all(b"N").await?,
            StartupPacket::SslRequest if cfg.plaintext => tcp.write_all(b"N").await?,
            StartupPacket::SslRequest => break,
            StartupPacket::Startup(startup) if cfg.plaintext => {
                return Ok(login(tcp, startup, cfg).await?.map(|(c, b)| Session::Plain(c, b)));
            }
            StartupPacket::Cancel(cancel) if cfg.plaintext => {
                forward_cancel(&cfg.backend, &raw).await?;
                info!(pid = cancel.pid, "forwarded cancel request");
                return Ok(None);
            }
            StartupPacket::Startup(_) => {
                let e = ErrorFields::fatal(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    "This RDS Proxy requires TLS connections",
                );
                return reject(&mut tcp, e, "client did not request TLS").await;
            }
            StartupPacket::Cancel(_) => {
                warn!("dropped a cancel request sent without TLS");
                return Ok(None);
            }
        }
    }
    tcp.write_all(b"S").await?;
    let mut tls = cfg.tls.accept(tcp).await.map_err(ConnError::Tls)?;
    let (packet, raw) = read_startup(&mut tls).await?;
    match packet {
        StartupPacket::Startup(startup) => {
            Ok(login(tls, startup, cfg).await?.map(|(c, b)| Session::Tls(Box::new(c), b)))
        }
        StartupPacket::Cancel(cancel) => {
            forward_cancel(&cfg.backend, &raw).await?;
            info!(pid = cancel.pid, "forwarded cancel request");
            Ok(None)
        }
        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
            Err(ConnError::Protocol("encryption request inside TLS"))
        }
    }
}

/// Sends the cancel packet verbatim, as PostgreSQL needs the exact key it handed out.
async fn forward_cancel(backend: &str, raw: &[u8]) -> Result<(), ConnError> {
    let mut conn = TcpStream::connect(backend).await?;
    conn.write_all(raw).await?;
    // The server closes after reading the packet; waiting for that keeps it from being lost.
    let mut byte = [0u8; 1];
    let _ = conn.read(&mut byte).await;
    Ok(())
}

async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    startup: StartupMessage,
    cfg: &ProxyConfig,
) -> Result<Option<(S, TcpStream)>, ConnError> {
    let Some(user) = startup.user().map(str::to_owned) else {
        let e = ErrorFields::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        );
        return reject(&mut client, e, "startup packet has no user").await;
    };
    tracing::Span::current().record("user", user.as_str());
    let database = startup.database().unwrap_or(&user).to_owned();

    // Like PostgreSQL: offer 3.0 and list the protocol options we do not know.
    let unknown_options: Vec<String> =
        startup.params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
    if startup.version.minor > 0 || !unknown_options.is_empty() {
        client.write_all(&encode::negotiate_protocol_version(0, &unknown_options)).await?;
    }
    client.write_all(&encode::auth_cleartext()).await?;
    client.flush().await?;

    let raw = read_message(&mut client).await?;
    let Some((msg, _)) = decode_message(&raw, MAX_SETUP_MESSAGE_LEN)? else {
        return Err(ConnError::Protocol("truncated message"));
    };
    if msg.tag != b'p' {
        return Err(ConnError::Protocol("expected a password message"));
    }
    let token = parse_password(msg.body)?;
    match check_token(cfg, token, &user).await {
        Ok(()) => {}
        Err(reason) => {
            let e = ErrorFields::fatal(
                sqlstate::INVALID_PASSWORD,
                format!("IAM authentication failed for user \"{user}\""),
            );
            return reject(&mut client, e, reason).await;
        }
    }

    let Some(secret) = cfg.secrets.get(&user) else {
        let e = ErrorFields::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("This RDS proxy has no credentials for the role {user}. Check the credentials for this role and try again."),
        );
        return reject(&mut client, e, "no secret for this user").await;
    };
    let mut backend = match TcpStream::connect(&cfg.backend).await {
        Ok(s) => s,
        Err(err) => {
            let e = ErrorFields::fatal(sqlstate::CONNECTION_FAILURE, "RDS Proxy could not connect to the database");
            return reject(&mut client, e, err).await;
        }
    };
    backend.set_nodelay(true)?;
    let mut params = vec![("user".to_owned(), user.clone()), ("database".to_owned(), database)];
    params
        .extend(startup.params.into_iter().filter(|(k, _)| k != "user" && k != "database" && !k.starts_with("_pq_.")));
    backend.write_all(&encode::startup(ProtocolVersion::V3_0, &params)).await?;

    match backend_login(&mut backend, secret).await? {
        BackendLogin::Ok => {}
        BackendLogin::Refused(raw) => {
            client.write_all(&raw).await?;
            client.flush().await?;
            let _ = client.shutdown().await;
            return Ok(None);
        }
        BackendLogin::Unsupported(why) => {
            let e = ErrorFields::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, why);
            return reject(&mut client, e, why).await;
        }
    }
    info!(backend = %cfg.backend, "logged in to the backend");
    client.write_all(&encode::auth_ok()).await?;
    client.flush().await?;
    Ok(Some((client, backend)))
}

/// Verifies an IAM token for `user` against this proxy's endpoint, region and known access keys,
/// asking `credentials_url` about an unknown key; the one check both engines share.
pub async fn check_token(cfg: &ProxyConfig, token: &str, user: &str) -> Result<(), TokenError> {
    let expect = Expectation { host: &cfg.endpoint_host, port: cfg.endpoint_port, region: &cfg.region, db_user: user };
    let mut verified = verify_token(token, &expect, &cfg.credentials, OffsetDateTime::now_utc());
    if let (Err(TokenError::UnknownAccessKey(akid)), Some(url)) = (&verified, &cfg.credentials_url) {
        match crate::lookup::fetch(url, akid).await {
            Ok(Some(creds)) => {
                let mut store = CredentialStore::default();
                store.insert(akid.clone(), creds);
                verified = verify_token(token, &expect, &store, OffsetDateTime::now_utc());
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "looking up an access key"),
        }
    }
    let v = verified?;
    info!(access_key_id = %v.access_key_id, expires_at = %v.expires_at, "IAM token verified");
    Ok(())
}

enum BackendLogin {
    Ok,
    /// The backend's ErrorResponse, to be passed on verbatim.
    Refused(Vec<u8>),
    Unsupported(&'static str),
}

enum ScramState {
    NotStarted,
    SentFirst(ScramClient),
    SentFinal(ServerFinalCheck),
    Verified,
}

/// Answers the backend's authentication requests until AuthenticationOk.
async fn backend_login(backend: &mut TcpStream, password: &str) -> Result<BackendLogin, ConnError> {
    let mut scram = ScramState::NotStarted;
    loop {
        let raw = read_message(backend).await?;
        let Some((msg, _)) = decode_message(&raw, MAX_SETUP_MESSAGE_LEN)? else {
            return Err(ConnError::Protocol("truncated message"));
        };
        match (BackendMessage::parse(msg)?, scram) {
            // Unless SCRAM finished, AuthenticationOk has not proven the backend knows the secret.
            (BackendMessage::AuthenticationOk, ScramState::NotStarted | ScramState::Verified) => {
                return Ok(BackendLogin::Ok)
            }
            (BackendMessage::AuthenticationCleartextPassword, ScramState::NotStarted) => {
                backend.write_all(&encode::password(password)).await?;
                scram = ScramState::NotStarted;
            }
            (BackendMessage::AuthenticationSasl { mechanisms }, ScramState::NotStarted) => {
                if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
                    return Ok(BackendLogin::Unsupported("The database offers no SASL mechanism this proxy supports"));
                }
                let client = ScramClient::random();
                let first = client.client_first();
                backend.write_all(&encode::sasl_initial_response(scram::MECHANISM, first.as_bytes())).await?;
                scram = ScramState::SentFirst(client);
            }
            (BackendMessage::AuthenticationSaslContinue(data), ScramState::SentFirst(client)) => {
                let password = password.to_owned();
                let (reply, check) = tokio::task::spawn_blocking(move || client.client_final(&data, &password))
                    .await
                    .map_err(|_| ConnError::Backend("SCRAM computation was aborted"))??;
                backend.write_all(&encode::sasl_response(reply.as_bytes())).await?;
                scram = ScramState::SentFinal(check);
            }
            (BackendMessage::AuthenticationSaslFinal(data), ScramState::SentFinal(check)) => {
                check.verify(&data)?;
                scram = ScramState::Verified;
            }
            (BackendMessage::AuthenticationMd5Password { .. }, _) => {
                return Ok(BackendLogin::Unsupported(
                    "The database must use SCRAM-SHA-256 password authentication, not MD5",
                ));
            }
            (BackendMessage::AuthenticationOther(_), _) => {
                return Ok(BackendLogin::Unsupported(
                    "The database asked for an authentication method this proxy does not support",
                ));
            }
            (BackendMessage::ErrorResponse(e), _) => {
                warn!(code = e.code(), message = e.message(), "backend refused the login");
                return Ok(BackendLogin::Refused(raw));
            }
            (BackendMessage::NoticeResponse(_), state) => scram = state,
            _ => return Err(ConnError::Backend("unexpected message during authentication")),
        }
    }
}

/// Sends a FATAL error, closes, and logs why; the client only ever sees the error itself.
async fn reject<S: AsyncWrite + Unpin, T>(
    stream: &mut S,
    error: ErrorFields,
    reason: impl std::fmt::Display,
) -> Result<Option<T>, ConnError> {
    warn!(sqlstate = error.code(), %reason, "rejected connection");
    stream.write_all(&encode::error_response(&error)).await?;
    stream.flush().await?;
    let _ = stream.shutdown().await;
    Ok(None)
}

/// Reads exactly one packet: no byte past it is taken off the stream.
async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S, mut framer: Framer) -> Result<Vec<u8>, ConnError> {
    let mut chunk = Vec::new();
    loop {
        if let Some(frame) = framer.next_frame()? {
            return Ok(frame.to_vec());
        }
        chunk.resize(framer.needed(), 0);
        stream.read_exact(&mut chunk).await?;
        framer.push(&chunk);
    }
}

/// Reads exactly one untyped startup-phase packet, returning it decoded and raw.
async fn read_startup<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(StartupPacket, Vec<u8>), ConnError> {
    let raw = read_frame(stream, Framer::startup()).await?;
    match decode_startup(&raw)? {
        Some((packet, used)) if used == raw.len() => Ok((packet, raw)),
        _ => Err(ConnError::Protocol("truncated startup packet")),
    }
}

/// Reads exactly one typed message (tag, length, body) during connection setup.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, ConnError> {
    let raw = read_frame(stream, Framer::typed(MAX_SETUP_MESSAGE_LEN)).await?;
    debug!(tag = ?raw.first().map(|&t| char::from(t)), len = raw.len().saturating_sub(1), "setup message");
    Ok(raw)
}
