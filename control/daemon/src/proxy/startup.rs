//! Setting a session up: the client's negotiation (driving `sluice_pgwire::ServerNegotiation`
//! over the socket), its identity (client certificate or local peer uid), the route it asks
//! for, the policy decision, the upstream session and the client's greeting.

use rand::RngCore;
use serde_json::json;
use sluice_pgwire::{
    self as pg, encode, sqlstate, ErrorFields, Event, NegotiationError, ServerNegotiation, StartupMessage, TlsOffer,
};
use std::net::IpAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;
use tracing::info;

use super::cancel::handle_cancel;
use super::{HandshakeFailure, ProxyContext, Ready};
use crate::audit::{SessionFields, SESSION_START};
use crate::ca::{identity_from_cert, Identity};
use crate::leg::Leg;
use crate::limits::ConnPermit;
use crate::metrics::METRICS;
use crate::policy::{self, Denial};
use crate::upstream::{self, Greeting, UpstreamError, UpstreamStream};

use sqlstate::INVALID_AUTHORIZATION_SPECIFICATION as DENIED;

/// A refusal to send the client before closing.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) fields: ErrorFields,
    /// What goes in the log and the audit event.
    pub(super) reason: String,
    /// Label of the handshake-failure metric.
    pub(super) kind: HandshakeFailure,
}

impl Refusal {
    pub(super) fn new(code: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Refusal { reason: message.clone(), fields: ErrorFields::fatal(code, message), kind: HandshakeFailure::Denied }
    }
    pub(super) fn kind(mut self, kind: HandshakeFailure) -> Self {
        self.kind = kind;
        self
    }
}

impl From<UpstreamError> for Refusal {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Rejected(fields) => {
                let reason = format!(
                    "upstream rejected the session: {} ({})",
                    fields.message().unwrap_or("no message"),
                    fields.code().unwrap_or("no code")
                );
                let hint = if fields.code() == Some(sqlstate::INVALID_PASSWORD) {
                    "RDS Proxy refused Sluice's IAM auth token: check the AWS credentials and IAM policy \
                     (rds-db:connect) of the Sluice control service"
                } else {
                    "the error came from the upstream database"
                };
                Refusal { fields: fields.with(b'H', hint), reason, kind: HandshakeFailure::UpstreamRejected }
            }
            UpstreamError::Iam(e) => {
                // A missing region is found before any mint is tried.
                if !matches!(e, crate::iam::IamError::NoRegion) {
                    METRICS.token_error();
                }
                let mut r = Refusal::new(
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("Sluice could not create an IAM auth token: {e}"),
                )
                .kind(HandshakeFailure::Token);
                // No credentials / a refused AssumeRole: say what fixes it (the trust policy).
                if matches!(e, crate::iam::IamError::NoCredentials(_) | crate::iam::IamError::AssumeRole { .. }) {
                    r.fields = r.fields.with(b'H', crate::troubleshoot::explain_iam(&e, None));
                }
                r
            }
            UpstreamError::UnsupportedAuth(_) | UpstreamError::CertNotAccepted(_) => {
                Refusal::new(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, e.to_string())
                    .kind(HandshakeFailure::UpstreamAuth)
            }
            other => Refusal::new(
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("Sluice could not reach the database: {other}"),
            )
            .kind(HandshakeFailure::UpstreamUnreachable),
        }
    }
}

/// Feeds the client's bytes to the negotiation until it has something to say, reading exactly
/// what it asks for: nothing past a packet leaves the socket, so a TLS handshake that follows
/// starts on a clean stream.
pub(super) async fn next_negotiation_event<S: AsyncRead + Unpin>(
    s: &mut S,
    neg: &mut ServerNegotiation,
) -> std::io::Result<Result<Event, NegotiationError>> {
    let mut chunk = Vec::new();
    loop {
        match neg.next_event() {
            Ok(Event::NeedMore(n)) => {
                chunk.resize(n, 0);
                s.read_exact(&mut chunk).await?;
                neg.feed(&chunk);
            }
            other => return Ok(other),
        }
    }
}

/// How a stretch of the negotiation ended.
enum Negotiated {
    /// Start TLS now (the answer to the SSLRequest was written).
    StartTls,
    Cancel(pg::CancelRequest),
    Startup(StartupMessage),
}

/// Runs the negotiation on `s`, writing its answers, until it needs TLS or ends. A refusal is
/// sent to the client and logged before this returns; the error is the handshake-failure label.
async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    neg: &mut ServerNegotiation,
) -> Result<Negotiated, HandshakeFailure> {
    loop {
        let event = match next_negotiation_event(s, neg).await {
            Ok(e) => e,
            Err(e) => {
                info!(error = %e, "client went away during startup");
                return Err(HandshakeFailure::ClientGone);
            }
        };
        match event {
            Ok(Event::NeedMore(_)) => {}
            Ok(Event::Reply(answer)) => {
                if upstream::write_all_flush(s, &[answer]).await.is_err() {
                    return Err(HandshakeFailure::ClientGone);
                }
            }
            Ok(Event::StartTls { reply }) => {
                if let Some(answer) = reply {
                    if upstream::write_all_flush(s, &[answer]).await.is_err() {
                        return Err(HandshakeFailure::ClientGone);
                    }
                }
                return Ok(Negotiated::StartTls);
            }
            Ok(Event::Cancel(c)) => return Ok(Negotiated::Cancel(c)),
            Ok(Event::Startup(m)) => return Ok(Negotiated::Startup(m)),
            Err(NegotiationError::TlsRequired) => {
                info!("plaintext startup refused");
                let e = NegotiationError::TlsRequired
                    .error_fields()
                    .with(b'H', "connect with sslmode=verify-full and the certificate from `sluice db login`");
                send_error(s, &e).await;
                return Err(HandshakeFailure::Plaintext);
            }
            Err(e) => {
                info!(error = %e, "invalid startup packet");
                send_error(s, &e.error_fields()).await;
                return Err(HandshakeFailure::Protocol);
            }
        }
    }
}

pub(super) async fn send_error<S: AsyncWrite + Unpin>(s: &mut S, fields: &ErrorFields) {
    let _ = s.write_all(&encode::error_response(fields)).await;
    let _ = s.flush().await;
    let _ = s.shutdown().await;
}

/// Runs the whole setup. `Ok(None)` is a finished short exchange (a cancel request); `Err(reason)`
/// means the client was refused or went away (already told and logged); `reason` labels the
/// handshake-failure metric.
pub(super) async fn handshake(
    ctx: &ProxyContext,
    mut tcp: TcpStream,
    fields: &mut SessionFields,
    permit: &mut ConnPermit<IpAddr>,
) -> Result<Option<Ready>, HandshakeFailure> {
    let mut neg = ServerNegotiation::new(TlsOffer::Required);
    // PostgreSQL 17 clients may start TLS directly (sslnegotiation=direct): a TLS record, not a
    // length-prefixed packet, comes first, and it must stay on the socket for the handshake.
    let mut first = [0u8; 1];
    let direct_tls = matches!(tcp.peek(&mut first).await, Ok(1) if neg.peeked_first_byte(first[0]).is_some());
    if !direct_tls {
        match negotiate(&mut tcp, &mut neg).await? {
            Negotiated::StartTls => {}
            Negotiated::Cancel(c) => {
                handle_cancel(ctx, c).await;
                return Ok(None);
            }
            // The machine refuses a plaintext StartupMessage where TLS is required.
            Negotiated::Startup(_) => return Err(HandshakeFailure::Plaintext),
        }
    }
    let mut client = match TlsAcceptor::from(ctx.server_tls.clone()).accept(tcp).await {
        Ok(s) => s,
        Err(e) => {
            info!(error = %e, "client TLS handshake failed");
            return Err(HandshakeFailure::Tls);
        }
    };
    let (identity, not_after) = match client_identity(&client, fields) {
        Ok(x) => x,
        Err(problem) => {
            let mut e = ErrorFields::fatal(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, problem.message);
            if let Some(hint) = problem.hint {
                e = e.with(b'H', hint);
            }
            send_error(&mut client, &e).await;
            return Err(problem.kind);
        }
    };
    // A valid client certificate: this connection no longer counts as an unauthenticated one.
    permit.authenticated();
    neg.tls_established();
    let startup = match negotiate(&mut client, &mut neg).await? {
        Negotiated::Startup(m) => m,
        Negotiated::Cancel(c) => {
            handle_cancel(ctx, c).await;
            return Ok(None);
        }
        Negotiated::StartTls => {
            send_error(&mut client, &ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, "TLS inside TLS")).await;
            return Err(HandshakeFailure::Protocol);
        }
    };
    match authorize_and_connect(ctx, &identity, &startup, &mut client, fields).await {
        Ok(our_pid_and_upstream) => {
            ctx.audit.emit(SESSION_START, fields, true, json!({}));
            let (our_pid, upstream) = our_pid_and_upstream;
            Ok(Some(Ready { client: Leg::Tls(client), upstream, our_pid, not_after }))
        }
        Err(refusal) => {
            info!(user = %fields.user, db = %fields.db_service, reason = %refusal.reason, "session refused");
            ctx.audit.emit(SESSION_START, fields, false, json!({ "error": refusal.reason }));
            send_error(&mut client, &refusal.fields).await;
            Err(refusal.kind)
        }
    }
}

/// Why a client certificate is not accepted.
pub(super) struct CertProblem {
    pub(super) kind: HandshakeFailure,
    pub(super) message: String,
    pub(super) hint: Option<&'static str>,
}

/// The identity in a TLS client's certificate and the certificate's expiry (unix seconds),
/// after re-checking that it has not expired (TLS lets an expired one through, so the client
/// learns why; there is no resumption to skip this). Logs a refusal; sets `fields.user`.
pub(super) fn client_identity(
    client: &tokio_rustls::server::TlsStream<TcpStream>,
    fields: &mut SessionFields,
) -> Result<(Identity, i64), CertProblem> {
    let cert = client.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
    let Some(cert) = cert else {
        info!("no client certificate");
        return Err(CertProblem {
            kind: HandshakeFailure::Certificate,
            message: "no client certificate".into(),
            hint: None,
        });
    };
    let identity = identity_from_cert(&cert).map_err(|e| {
        info!(error = %e, "client certificate has no usable identity");
        CertProblem { kind: HandshakeFailure::Certificate, message: format!("bad client certificate: {e}"), hint: None }
    })?;
    fields.user = identity.user.clone();
    if let Err(expired) = crate::tls::check_not_expired(&cert, time::OffsetDateTime::now_utc()) {
        let when = expired.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        info!(user = %identity.user, expired = %when, "client certificate expired");
        return Err(CertProblem {
            kind: HandshakeFailure::CertificateExpired,
            message: format!("client certificate expired at {when}"),
            hint: Some("run `sluice login` and `sluice db login` for a new certificate"),
        });
    }
    let not_after = crate::ca::not_after(&cert).map(|t| t.unix_timestamp()).unwrap_or(0);
    Ok((identity, not_after))
}

/// The startup exchange of a local plaintext client: the OS user behind the socket, mapped to
/// a Sluice user, stands in for a client certificate whose route is this socket's database.
pub(super) async fn local_handshake(
    ctx: &ProxyContext,
    mut stream: UnixStream,
    uid: Option<u32>,
    service: String,
    fields: &mut SessionFields,
) -> Result<Option<Ready>, HandshakeFailure> {
    use sqlstate::INVALID_AUTHORIZATION_SPECIFICATION as DENIED;
    // libpq never asks for encryption on a Unix socket; others may, and get the plain answer.
    let mut neg = ServerNegotiation::new(TlsOffer::None);
    let startup = match negotiate(&mut stream, &mut neg).await? {
        Negotiated::Startup(m) => m,
        Negotiated::Cancel(c) => {
            handle_cancel(ctx, c).await;
            return Ok(None);
        }
        Negotiated::StartTls => {
            send_error(&mut stream, &ErrorFields::fatal(sqlstate::PROTOCOL_VIOLATION, "no TLS on a local socket"))
                .await;
            return Err(HandshakeFailure::Protocol);
        }
    };
    let os_user = uid.and_then(|u| nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u)).ok().flatten());
    let os_name = os_user.map(|u| u.name).unwrap_or_else(|| format!("uid {}", uid.unwrap_or(u32::MAX)));
    let mapped = ctx.cfg.proxy_service.local_socket.as_ref().and_then(|l| l.users.get(&os_name)).cloned();
    let Some(user) = mapped else {
        fields.db_service = service;
        let refusal = Refusal::new(
            DENIED,
            format!("OS user {os_name:?} is not mapped to a Sluice user (proxy_service.local_socket.users)"),
        );
        info!(os_user = %os_name, reason = %refusal.reason, "session refused");
        ctx.audit.emit(SESSION_START, fields, false, json!({ "error": refusal.reason }));
        send_error(&mut stream, &refusal.fields).await;
        return Err(HandshakeFailure::UnmappedOsUser);
    };
    fields.user = user.clone();
    let identity = Identity {
        v: 1,
        user,
        route: Some(crate::ca::DbRoute { service, db_user: String::new(), db_name: String::new() }),
    };
    match authorize_and_connect(ctx, &identity, &startup, &mut stream, fields).await {
        Ok((our_pid, upstream)) => {
            ctx.audit.emit(SESSION_START, fields, true, json!({ "os_user": os_name }));
            Ok(Some(Ready { client: Leg::Plain(stream), upstream, our_pid, not_after: 0 }))
        }
        Err(refusal) => {
            info!(user = %fields.user, db = %fields.db_service, reason = %refusal.reason, "session refused");
            ctx.audit.emit(SESSION_START, fields, false, json!({ "error": refusal.reason }));
            send_error(&mut stream, &refusal.fields).await;
            Err(refusal.kind)
        }
    }
}

/// Sets the session up once the client is identified: the route it asks for, the policy
/// decision, the upstream session, then the client's greeting. Refusals are returned, not sent.
async fn authorize_and_connect<C: AsyncWrite + Unpin>(
    ctx: &ProxyContext,
    identity: &Identity,
    startup: &StartupMessage,
    client: &mut C,
    fields: &mut SessionFields,
) -> Result<(u32, UpstreamStream), Refusal> {
    // The audit record of a refusal names the route that was asked for.
    if let Some(route) = &identity.route {
        fields.db_service = route.service.clone();
    }
    if let Ok(asked) = policy::resolve_route(identity, startup) {
        (fields.db_user, fields.db_name) = (asked.db_user, asked.db_name);
    }
    let authorized = authorize(ctx, identity, startup, crate::config::PROTOCOL_POSTGRES).await?;
    // Protocol 3.2 is spoken to the client (only cancel keys differ); the upstream gets 3.0.
    let protocol = pg::choose_protocol(startup);
    let session = connect_upstream(ctx, &authorized, protocol.cancel_key_len).await?;
    greet_client(ctx, client, protocol, &session).await?;
    Ok((session.our_pid, session.stream))
}

/// What the policy allows a new session.
pub(super) struct Authorized {
    pub(super) decision: policy::Decision,
    /// The StartupMessage parameters passed on to the upstream.
    pub(super) params: Vec<(String, String)>,
}

/// The policy decision for a new session: the one place a connection meets the policy at setup,
/// decided from the in-memory snapshot (read again first only if the state changed).
///
/// `protocol` is the listener's: a database of the other protocol is refused.
pub(super) async fn authorize(
    ctx: &ProxyContext,
    identity: &Identity,
    startup: &StartupMessage,
    protocol: &str,
) -> Result<Authorized, Refusal> {
    let (view, _) = ctx.policy.current_async().await.map_err(|e| {
        if e.is_unavailable() {
            info!(error = %e, "session refused: no usable policy");
            return Refusal::new(sqlstate::CANNOT_CONNECT_NOW, e.to_string()).kind(HandshakeFailure::PolicyUnavailable);
        }
        METRICS.discovery_error();
        Refusal::new(sqlstate::INTERNAL_ERROR, format!("Sluice state error: {e}")).kind(HandshakeFailure::Internal)
    })?;
    if let Ok(Some(age)) = ctx.policy.check_feed() {
        if age > crate::cluster::watch::SILENCE_LIMIT {
            let max = ctx.policy.staleness().map(|(_, m)| m.as_secs()).unwrap_or_default();
            info!(
                policy_age_s = age.as_secs(),
                max_policy_staleness_s = max,
                "admitting from the cached policy: the auth server is unreachable"
            );
        }
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let decision = policy::authorize(identity, startup, &view, now).map_err(|d| match d {
        Denial::UnknownDatabase => Refusal::new(
            sqlstate::INVALID_CATALOG_NAME,
            format!(
                "database {:?} is not registered with Sluice",
                identity.route.as_ref().map(|r| r.service.as_str()).unwrap_or_default()
            ),
        )
        .kind(HandshakeFailure::UnknownDatabase),
        Denial::UnknownUser => Refusal::new(DENIED, format!("user {:?} does not exist", identity.user)),
        other => Refusal::new(DENIED, other.to_string()),
    })?;
    if decision.database.spec.protocol != protocol {
        let (what, listener) = if decision.database.spec.is_mysql() {
            ("a MySQL", "MySQL listener (proxy_service.mysql_listen_addr)")
        } else {
            ("a PostgreSQL", "PostgreSQL listener (proxy_service.postgres_listen_addr)")
        };
        return Err(Refusal::new(
            sqlstate::INVALID_CATALOG_NAME,
            format!(
                "database {:?} is {what} database: connect to Sluice's {listener}; `sluice db connect` picks it",
                decision.database.name
            ),
        )
        .kind(HandshakeFailure::UnknownDatabase));
    }
    let params =
        crate::startup_params::upstream_params(&startup.params, crate::rbac::allows_replication(&decision.roles))
            .map_err(|r| Refusal::new(r.code, r.message).kind(HandshakeFailure::StartupParameter))?;
    Ok(Authorized { decision, params })
}

/// An open upstream session, reachable by cancel requests under a key of ours.
struct UpstreamSession {
    stream: UpstreamStream,
    greeting: Greeting,
    our_pid: u32,
    our_secret: Vec<u8>,
}

/// Dials the upstream and registers its cancel route under a fresh key of ours, `key_len`
/// bytes long: upstream keys never leave Sluice, and keys of different upstreams cannot collide.
async fn connect_upstream(
    ctx: &ProxyContext,
    authorized: &Authorized,
    key_len: usize,
) -> Result<UpstreamSession, Refusal> {
    let d = &authorized.decision;
    let (stream, greeting, cancel_target) =
        upstream::connect(&d.database, &d.db_user, &d.db_name, &authorized.params, &ctx.minter, &ctx.upstream_tls)
            .await?;
    let mut our_secret = vec![0u8; key_len];
    rand::thread_rng().fill_bytes(&mut our_secret);
    let target = greeting.backend_key.is_some().then_some(cancel_target);
    let our_pid = ctx.register_cancel(&our_secret, target);
    Ok(UpstreamSession { stream, greeting, our_pid, our_secret })
}

/// Finishes the client's startup: the protocol negotiation if any, AuthenticationOk, the
/// upstream's greeting, our cancel key and ReadyForQuery.
async fn greet_client<C: AsyncWrite + Unpin>(
    ctx: &ProxyContext,
    client: &mut C,
    protocol: pg::ProtocolChoice,
    session: &UpstreamSession,
) -> Result<(), Refusal> {
    let mut out = protocol.negotiate.unwrap_or_default();
    out.extend(encode::auth_ok());
    for m in &session.greeting.messages {
        out.extend_from_slice(m);
    }
    out.extend(encode::backend_key_data(session.our_pid, &session.our_secret));
    out.extend(encode::ready_for_query(session.greeting.ready_status));
    if let Err(e) = upstream::write_all_flush(client, &out).await {
        ctx.cancels().remove(&session.our_pid);
        return Err(Refusal::new(sqlstate::CONNECTION_FAILURE, format!("client went away: {e}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_from_the_upstream_keep_their_labels() {
        let r = Refusal::from(UpstreamError::Rejected(ErrorFields::fatal(sqlstate::INVALID_PASSWORD, "no")));
        assert_eq!((r.kind.label(), r.fields.code()), ("upstream_rejected", Some(sqlstate::INVALID_PASSWORD)));
        assert!(r.fields.get(b'H').is_some_and(|h| h.contains("IAM")));
        let r = Refusal::from(UpstreamError::UnsupportedAuth("MD5".into()));
        assert_eq!(r.kind.label(), "upstream_auth");
        let r = Refusal::from(UpstreamError::ConnectTimeout { addr: "x:1".into() });
        assert_eq!((r.kind.label(), r.fields.code()), ("upstream_unreachable", Some("08001")));
    }
}
