//! AWS discovery: every RDS Proxy (and custom proxy endpoint) in the configured accounts and regions
//! becomes a `cloud` database.
//!
//! The mapping from the AWS API's shapes to database resources is pure ([`proxy_database`],
//! [`endpoint_database`]) and unit-tested; [`run`] polls each (matcher, region) source with
//! aws-sdk-rds and reconciles the state; auth nodes sharing a PostgreSQL elect one poller per
//! source with a lease. A failed fetch never deletes: the source's
//! resources are kept and marked stale with the reason, so throttling or a revoked permission
//! does not make databases vanish from under connected users.
//!
//! Names: a discovered database is served under its AWS name (`<proxy>`, `<proxy>-<endpoint>`)
//! while that name is unique. Rows are stored per (source, AWS identity), never per name, and
//! [`served_names`] computes the served names over every discovered row at once: when two distinct
//! AWS resources share a name (same-named proxies in two regions or accounts), or a discovered name
//! equals a static or dynamic database's, every one of the discovered ones is served as
//! `<name>-<region>-<account-id>` (Teleport renames collisions the same way). The rule depends on
//! the set of resources only, not on which region was polled first, so names are stable across
//! polls; and since a certificate routes by name, one issued for one proxy cannot reach its
//! namesake. A name still shared after that (or over 128 characters) gets a hash of the identity.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_rds::error::{DisplayErrorContext, ProvideErrorMetadata};
use thiserror::Error;
use tracing::{info, warn};

use crate::config::{
    AwsMatcher, AwsSpec, Config, DatabaseSpec, DbResource, DiscoveryService, Metadata, TlsMode, TlsSpec,
};
use crate::iam::{CredentialSource, TokenMinter};
use crate::rbac::labels_match;
use crate::state::{discovery_lease, Discovered, DiscoveredRow, Fence, State, StateError};
use crate::troubleshoot;

pub const LABEL_ORIGIN: &str = "sluice.dev/origin";
pub const LABEL_DISCOVERY_TYPE: &str = "sluice.dev/discovery-type";
/// A single AWS call may not take longer than this (the SDK retries within it).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum DiscoveryError {
    #[error("{operation} in {region}: {code}: {message}")]
    Api { operation: &'static str, region: String, code: String, message: String },
    #[error("{0}")]
    Credentials(String),
    #[error("malformed ARN {0:?}")]
    Arn(String),
}

/// The parts of an ARN (`arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arn {
    pub partition: String,
    pub service: String,
    pub region: String,
    pub account_id: String,
    pub resource: String,
}

impl std::str::FromStr for Arn {
    type Err = DiscoveryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DiscoveryError::Arn(s.chars().take(200).collect());
        let mut parts = s.splitn(6, ':');
        if parts.next() != Some("arn") {
            return Err(bad());
        }
        let mut next = || parts.next().ok_or_else(bad);
        let (partition, service, region, account_id, resource) = (next()?, next()?, next()?, next()?, next()?);
        if partition.is_empty() || service.is_empty() || resource.is_empty() {
            return Err(bad());
        }
        Ok(Arn {
            partition: partition.to_owned(),
            service: service.to_owned(),
            region: region.to_owned(),
            account_id: account_id.to_owned(),
            resource: resource.to_owned(),
        })
    }
}

/// An RDS Proxy as DescribeDBProxies and ListTagsForResource describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyInfo {
    pub name: String,
    pub arn: String,
    pub status: String,
    pub engine_family: String,
    pub vpc_id: String,
    pub endpoint: String,
    pub require_tls: bool,
    pub tags: Vec<(String, String)>,
}

/// A proxy endpoint as DescribeDBProxyEndpoints describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub proxy_name: String,
    pub name: String,
    pub status: String,
    pub vpc_id: String,
    pub endpoint: String,
    pub target_role: String,
    pub is_default: bool,
}

/// Why a proxy or endpoint is not turned into a database.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Skip {
    #[error("RequireTLS is off; Sluice only connects to proxies that require TLS")]
    NoTls,
    #[error("status is {0:?}")]
    Status(String),
    #[error("engine family {0:?} is not known")]
    Engine(String),
    #[error("engine family {0:?} is not supported (POSTGRESQL and MYSQL are)")]
    Unsupported(String),
    #[error("no endpoint host")]
    NoEndpoint,
    #[error("the labels do not match the matcher's tags")]
    Tags,
    #[error("{0}")]
    Arn(String),
}

/// Proxy and endpoint states in which nothing can connect.
const UNUSABLE: &[&str] =
    &["creating", "deleting", "suspended", "suspending", "incompatible-network", "insufficient-resource-limits"];

/// The port and `DatabaseSpec::protocol` of an engine family Sluice serves. SQLSERVER proxies
/// are skipped: there is no TDS listener.
fn engine(engine_family: &str) -> Result<(u16, &'static str), Skip> {
    match engine_family {
        "POSTGRESQL" => Ok((5432, crate::config::PROTOCOL_POSTGRES)),
        "MYSQL" => Ok((3306, crate::config::PROTOCOL_MYSQL)),
        "SQLSERVER" => Err(Skip::Unsupported(engine_family.to_owned())),
        other => Err(Skip::Engine(other.to_owned())),
    }
}

/// Teleport's label key rule: AWS tags with other characters are dropped rather than failing.
pub fn valid_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 256
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b':' | b'*' | b'-'))
}

fn base_labels(p: &ProxyInfo, arn: &Arn) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> =
        p.tags.iter().filter(|(k, _)| valid_label_key(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    labels.insert("account-id".into(), arn.account_id.clone());
    labels.insert("region".into(), arn.region.clone());
    labels.insert("engine".into(), p.engine_family.clone());
    labels.insert("vpc-id".into(), p.vpc_id.clone());
    labels.insert(LABEL_ORIGIN.into(), "cloud".into());
    labels.insert(LABEL_DISCOVERY_TYPE.into(), "rdsproxy".into());
    labels
}

/// The proxy's ARN, port and protocol, or why it is not served.
fn check_proxy(p: &ProxyInfo) -> Result<(Arn, u16, &'static str), Skip> {
    if UNUSABLE.contains(&p.status.as_str()) {
        return Err(Skip::Status(p.status.clone()));
    }
    if !p.require_tls {
        return Err(Skip::NoTls);
    }
    let (port, protocol) = engine(&p.engine_family)?;
    let arn: Arn = p.arn.parse().map_err(|e: DiscoveryError| Skip::Arn(e.to_string()))?;
    if p.endpoint.is_empty() {
        return Err(Skip::NoEndpoint);
    }
    Ok((arn, port, protocol))
}

fn spec_for(
    m: &AwsMatcher,
    host: &str,
    port: u16,
    protocol: &str,
    region: &str,
    server_name: Option<String>,
) -> DatabaseSpec {
    DatabaseSpec {
        protocol: protocol.into(),
        uri: format!("{host}:{port}"),
        aws: AwsSpec {
            region: Some(region.to_owned()),
            assume_role_arn: m.assume_role_arn.clone(),
            external_id: m.external_id.clone(),
        },
        tls: TlsSpec {
            server_name: server_name.or_else(|| m.tls.server_name.clone()),
            ca_cert_file: m.tls.ca_cert_file.clone(),
            // Only proxies with RequireTLS are discovered; the token never crosses a plain leg.
            mode: TlsMode::VerifyFull,
        },
        connect_addr: m.connect_addr_override.clone(),
        auth: crate::config::UpstreamAuth::Iam,
    }
}

fn resource(name: String, description: String, labels: BTreeMap<String, String>, spec: DatabaseSpec) -> DbResource {
    DbResource { kind: "db".into(), version: "v3".into(), metadata: Metadata { name, description, labels }, spec }
}

/// The proxy's default endpoint as database `<proxy-name>`.
pub fn proxy_database(m: &AwsMatcher, p: &ProxyInfo) -> Result<Discovered, Skip> {
    let (arn, port, protocol) = check_proxy(p)?;
    let labels = base_labels(p, &arn);
    if !labels_match(&m.tags, &labels) {
        return Err(Skip::Tags);
    }
    let spec = spec_for(m, &p.endpoint, port, protocol, &arn.region, None);
    Ok(Discovered {
        resource: resource(p.name.clone(), format!("RDS Proxy in {}", arn.region), labels, spec),
        aws_resource_id: proxy_resource_id(&arn),
        uid: p.arn.clone(),
    })
}

/// A custom endpoint as database `<proxy-name>-<endpoint-name>`. The proxy's certificate is for
/// `*.proxy-ID.REGION.rds.amazonaws.com`, which does not cover `NAME.endpoint.proxy-…`, so TLS
/// checks the proxy's default host instead.
pub fn endpoint_database(m: &AwsMatcher, p: &ProxyInfo, e: &EndpointInfo) -> Result<Discovered, Skip> {
    let (arn, port, protocol) = check_proxy(p)?;
    if UNUSABLE.contains(&e.status.as_str()) {
        return Err(Skip::Status(e.status.clone()));
    }
    if e.endpoint.is_empty() {
        return Err(Skip::NoEndpoint);
    }
    let mut labels = base_labels(p, &arn);
    if !e.vpc_id.is_empty() {
        labels.insert("vpc-id".into(), e.vpc_id.clone());
    }
    labels.insert("endpoint-type".into(), e.target_role.clone());
    if !labels_match(&m.tags, &labels) {
        return Err(Skip::Tags);
    }
    let spec = spec_for(m, &e.endpoint, port, protocol, &arn.region, Some(p.endpoint.clone()));
    Ok(Discovered {
        resource: resource(
            format!("{}-{}", p.name, e.name),
            format!("RDS Proxy endpoint in {}", arn.region),
            labels,
            spec,
        ),
        aws_resource_id: proxy_resource_id(&arn),
        uid: format!("{}/endpoint/{}", p.arn, e.name),
    })
}

/// `prx-…` from `arn:aws:rds:REGION:ACCOUNT:db-proxy:prx-…`.
fn proxy_resource_id(arn: &Arn) -> String {
    arn.resource.rsplit(':').next().unwrap_or_default().to_owned()
}

/// Maps one region's proxies and endpoints, logging what is skipped and why.
pub fn map_region(m: &AwsMatcher, proxies: &[ProxyInfo], endpoints: &[EndpointInfo]) -> Vec<Discovered> {
    let mut out = Vec::new();
    for p in proxies {
        match proxy_database(m, p) {
            Ok(d) => out.push(d),
            Err(Skip::Tags) => {}
            Err(why) => {
                info!(proxy = %p.name, reason = %why, "skipping RDS Proxy");
                continue;
            }
        }
        for e in endpoints.iter().filter(|e| e.proxy_name == p.name && !e.is_default) {
            match endpoint_database(m, p, e) {
                Ok(d) => out.push(d),
                Err(Skip::Tags) => {}
                Err(why) => info!(proxy = %p.name, endpoint = %e.name, reason = %why, "skipping RDS Proxy endpoint"),
            }
        }
    }
    out.sort_by(|a, b| a.resource.metadata.name.cmp(&b.resource.metadata.name));
    out
}

/// The longest name a database may have (`config::validate_name`).
const MAX_NAME: usize = 128;

/// `-` and 8 hex digits of the identity's SHA-256: the last resort when a name stays ambiguous.
fn hash_suffix(uid: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(uid.as_bytes());
    format!("-{}", &hex::encode(digest)[..8])
}

/// `name` with `suffix`, shortening `name` so that the whole fits [`MAX_NAME`].
fn with_suffix(name: &str, suffix: &str) -> String {
    let mut keep = MAX_NAME.saturating_sub(suffix.len()).min(name.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &name[..keep])
}

/// The name each discovered row is served under, in the order of `rows`; `None` for a row that
/// is the same AWS resource as another row (two matchers finding one proxy), which is served once:
/// from a source whose last fetch succeeded, else the first source by key. `taken` holds the
/// names of the static and dynamic databases, which discovered ones never shadow.
///
/// A name is kept when no other discovered resource and no database in `taken` has it; otherwise
/// every resource having it is renamed `<name>-<region>-<account-id>`. Should a renamed one still
/// meet another name (a proxy literally called `orders-us-west-2-123456789012`), each resource
/// involved gets a hash of its identity appended instead, so the result is unique and depends
/// on the set of rows only, never on their order.
pub fn served_names(rows: &[DiscoveredRow], taken: &BTreeSet<String>) -> Vec<Option<String>> {
    let rank = |r: &DiscoveredRow| (r.stale.is_some(), r.source.clone());
    let mut chosen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let best = chosen.entry(row.item.uid.as_str()).or_insert(i);
        if rank(row) < rank(&rows[*best]) {
            *best = i;
        }
    }
    let base = |i: usize| rows[i].item.resource.metadata.name.as_str();
    let mut sharing: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in chosen.values() {
        *sharing.entry(base(i)).or_default() += 1;
    }
    let first_pass: BTreeMap<&str, String> = chosen
        .iter()
        .map(|(&uid, &i)| {
            let name = base(i);
            if sharing.get(name) == Some(&1) && !taken.contains(name) {
                return (uid, name.to_owned());
            }
            let labels = &rows[i].item.resource.metadata.labels;
            let name = match (labels.get("region"), labels.get("account-id")) {
                (Some(region), Some(account)) => with_suffix(name, &format!("-{region}-{account}")),
                _ => with_suffix(name, &hash_suffix(uid)),
            };
            (uid, name)
        })
        .collect();
    let mut uses: BTreeMap<&str, usize> = BTreeMap::new();
    for name in first_pass.values() {
        *uses.entry(name.as_str()).or_default() += 1;
    }
    let fin: BTreeMap<&str, String> = first_pass
        .iter()
        .map(|(&uid, name)| {
            if uses.get(name.as_str()) != Some(&1) || taken.contains(name) || name.len() > MAX_NAME {
                (uid, with_suffix(name, &hash_suffix(uid)))
            } else {
                (uid, name.clone())
            }
        })
        .collect();
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let uid = row.item.uid.as_str();
            if chosen.get(uid) == Some(&i) {
                fin.get(uid).cloned()
            } else {
                None
            }
        })
        .collect()
}

/// Identifies what one matcher finds in one region, so that a failure there marks only its
/// resources stale and a removed matcher's resources can be pruned.
pub fn source_key(m: &AwsMatcher, region: &str) -> String {
    format!("aws/rdsproxy/{region}/{}", m.assume_role_arn.as_deref().unwrap_or("-"))
}

fn api_error<E, R>(operation: &'static str, region: &str, e: aws_sdk_rds::error::SdkError<E, R>) -> DiscoveryError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().unwrap_or("error").to_owned();
    let message = match e.message() {
        Some(m) => m.to_owned(),
        None => DisplayErrorContext(&e).to_string(),
    };
    DiscoveryError::Api { operation, region: region.to_owned(), code, message }
}

/// One region's proxies, endpoints and tags.
pub async fn fetch_region(
    minter: &TokenMinter,
    m: &AwsMatcher,
    region: &str,
) -> Result<(Vec<ProxyInfo>, Vec<EndpointInfo>), DiscoveryError> {
    let source = CredentialSource {
        region: region.to_owned(),
        assume_role_arn: m.assume_role_arn.clone(),
        external_id: m.external_id.clone(),
    };
    // Resolve first, so that a refused AssumeRole is reported as such rather than as an RDS error.
    minter
        .credentials(&source)
        .await
        .map_err(|e| DiscoveryError::Credentials(troubleshoot::explain_iam(&e, m.external_id.as_deref())))?;
    let provider = minter.provider(&source).await;
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_owned()))
        .credentials_provider(provider)
        .timeout_config(aws_config::timeout::TimeoutConfig::builder().operation_timeout(CALL_TIMEOUT).build())
        .load()
        .await;
    let client = aws_sdk_rds::Client::new(&sdk);

    let mut proxies = Vec::new();
    let mut pages = client.describe_db_proxies().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| api_error("DescribeDBProxies", region, e))?;
        for p in page.db_proxies() {
            proxies.push(ProxyInfo {
                name: p.db_proxy_name().unwrap_or_default().to_owned(),
                arn: p.db_proxy_arn().unwrap_or_default().to_owned(),
                status: p.status().map(|s| s.as_str().to_owned()).unwrap_or_default(),
                engine_family: p.engine_family().unwrap_or_default().to_owned(),
                vpc_id: p.vpc_id().unwrap_or_default().to_owned(),
                endpoint: p.endpoint().unwrap_or_default().to_owned(),
                require_tls: p.require_tls().unwrap_or(false),
                tags: Vec::new(),
            });
        }
    }
    for p in &mut proxies {
        let out = client
            .list_tags_for_resource()
            .resource_name(&p.arn)
            .send()
            .await
            .map_err(|e| api_error("ListTagsForResource", region, e))?;
        p.tags = out
            .tag_list()
            .iter()
            .filter_map(|t| Some((t.key()?.to_owned(), t.value().unwrap_or_default().to_owned())))
            .collect();
    }
    let mut endpoints = Vec::new();
    if !proxies.is_empty() {
        let mut pages = client.describe_db_proxy_endpoints().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| api_error("DescribeDBProxyEndpoints", region, e))?;
            for e in page.db_proxy_endpoints() {
                endpoints.push(EndpointInfo {
                    proxy_name: e.db_proxy_name().unwrap_or_default().to_owned(),
                    name: e.db_proxy_endpoint_name().unwrap_or_default().to_owned(),
                    status: e.status().map(|s| s.as_str().to_owned()).unwrap_or_default(),
                    vpc_id: e.vpc_id().unwrap_or_default().to_owned(),
                    endpoint: e.endpoint().unwrap_or_default().to_owned(),
                    target_role: e.target_role().map(|r| r.as_str().to_owned()).unwrap_or_default(),
                    is_default: e.is_default().unwrap_or(false),
                });
            }
        }
    }
    Ok((proxies, endpoints))
}

/// What became of one poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// The results (or the stale mark of a failed fetch) are stored.
    Stored,
    /// The lease was lost before the write: another node polls this source now.
    Fenced,
    /// Storing failed (the state is unreachable, say); logged.
    Failed,
}

/// Runs a state call on a blocking thread: State calls are synchronous (and on PostgreSQL wait
/// for the network), and async workers must not be held by them.
async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&State) -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state)).await.map_err(|e| StateError::Task(e.to_string()))?
}

/// Polls one source and reconciles the state with what it found. With a `fence`, the writes
/// happen only while this node still holds the source's lease with that token.
pub async fn poll_source(
    state: &Arc<State>,
    minter: &TokenMinter,
    m: &AwsMatcher,
    region: &str,
    fence: Option<Fence>,
) -> Polled {
    let key = source_key(m, region);
    let outcome = match fetch_region(minter, m, region).await {
        Ok((proxies, endpoints)) => {
            let found = map_region(m, &proxies, &endpoints);
            let (k, n) = (key.clone(), found.len());
            let stored = blocking(state, move |s| s.replace_discovered_fenced(&k, &found, fence.as_ref())).await;
            match stored {
                Ok((added, updated, removed)) => {
                    info!(source = %key, databases = n, added, updated, removed, "discovery fetch done");
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => {
            let reason = e.to_string();
            let (k, r) = (key.clone(), reason.clone());
            let stored = blocking(state, move |s| s.mark_discovered_stale_fenced(&k, &r, fence.as_ref())).await;
            if let Ok(kept) = &stored {
                warn!(source = %key, error = %reason, kept_stale = kept, "discovery fetch failed; keeping the last good results");
            }
            stored.map(|_| ())
        }
    };
    match outcome {
        Ok(()) => Polled::Stored,
        Err(StateError::Fenced(lease)) => {
            warn!(source = %key, lease = %lease, "discovery results not stored: the lease moved to another node");
            Polled::Fenced
        }
        Err(e) => {
            warn!(source = %key, error = %e, "storing discovered databases");
            Polled::Failed
        }
    }
}

/// The sources the config asks for.
pub fn sources(d: &DiscoveryService) -> Vec<(AwsMatcher, String)> {
    let mut out = Vec::new();
    for m in &d.aws {
        for r in &m.regions {
            out.push((m.clone(), r.clone()));
        }
    }
    out
}

/// How often the config file is checked for discovery changes.
const CONFIG_WATCH: Duration = Duration::from_secs(1);
/// The longest a source's lease lasts without renewal: how long a dead poller's sources wait
/// for another node (at most `ttl + ttl/3`). Shorter poll intervals use the interval.
const MAX_LEASE_TTL: Duration = Duration::from_secs(30);
/// The shortest lease: renewing more often than every third of it is needless load.
const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

/// The lease of each source lasts `min(poll_interval, 30 s)` (at least 1 s): with renewals and
/// takeover attempts every third of it, a dead node's sources are polled by another within
/// `1.34 × poll_interval`, well inside two intervals.
pub fn lease_ttl(poll_interval: Duration) -> Duration {
    poll_interval.clamp(MIN_LEASE_TTL, MAX_LEASE_TTL)
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// This node's lease holder id, kept in `data_dir/discovery-holder` so that a restarted node
/// takes its own leases back at once (a single node on SQLite polls at start as it always
/// did) instead of waiting for them to expire. A data_dir belongs to one auth node (its
/// `node.db` is there too). Falls back to a per-process id if the file cannot be kept.
fn holder_id(data_dir: &Path) -> String {
    let path = data_dir.join(HOLDER_FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.len() <= 128 {
            return id.to_owned();
        }
    }
    let id = format!("node-{}", crate::state::random_secret(8));
    if let Err(e) = crate::private_fs::write_private(&path, format!("{id}\n").as_bytes()) {
        warn!(path = %path.display(), error = %e, "cannot keep the discovery holder id; using one for this process");
    }
    id
}

const HOLDER_FILE: &str = "discovery-holder";

/// (sources configured, how many of them this node polls now, by their live leases): for
/// `control status` on the node's own config.
pub fn lease_summary(cfg: &Config, state: &State) -> Result<(usize, usize), StateError> {
    let holder = std::fs::read_to_string(cfg.data_dir.join(HOLDER_FILE)).ok().map(|s| s.trim().to_owned());
    let sources = sources(&cfg.discovery_service);
    let mut here = 0;
    for (m, region) in &sources {
        if let Some((h, _, left)) = state.lease(&discovery_lease(&source_key(m, region)))? {
            if left > 0 && holder.as_deref() == Some(h.as_str()) {
                here += 1;
            }
        }
    }
    Ok((sources.len(), here))
}

/// One source as [`run`] schedules it.
struct Slot {
    matcher: AwsMatcher,
    region: String,
    key: String,
    lease: String,
    /// The token and when the renewal that confirmed it was sent, while this node holds it.
    held: Option<(u64, Instant)>,
    next_poll: Instant,
    polling: bool,
}

impl Slot {
    /// Whether this node may poll now: it holds the lease and renewed it within 2/3 of its
    /// ttl (the lease then has at least a third of its ttl left on any clock that runs at
    /// about the rate of the database's).
    fn fresh(&self, ttl: Duration) -> Option<u64> {
        self.held.filter(|(_, at)| at.elapsed() < ttl * 2 / 3).map(|(token, _)| token)
    }
}

/// Polls every source this node holds the lease of, at once on taking it and then every
/// `poll_interval`, until the task is aborted. Several auth nodes on one PostgreSQL thus poll
/// each source once between them (the lease `discovery/<source_key>`), and the results are
/// shared rows; with the embedded SQLite the one node holds every lease. When `config_path` is
/// given, a change to its `discovery_service` section takes effect at once (with an immediate
/// fetch); the rest of the config still needs a restart.
pub async fn run(cfg: Arc<Config>, state: Arc<State>, minter: Arc<TokenMinter>, config_path: Option<PathBuf>) {
    let holder = holder_id(&cfg.data_dir);
    let mut discovery = cfg.discovery_service.clone();
    let mut stamp = config_path.as_deref().and_then(modified);
    let mut slots: Vec<Slot> = Vec::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Polled)>();
    loop {
        let ttl = lease_ttl(discovery.poll_interval);
        let step = ttl / 3;
        // Sources no longer configured: give their leases up first, so that they are pruned
        // now (unless another node still polls them).
        let wanted: Vec<(AwsMatcher, String)> = sources(&discovery);
        let keys: Vec<String> = wanted.iter().map(|(m, r)| source_key(m, r)).collect();
        for gone in slots.iter().filter(|s| !keys.contains(&s.key)) {
            crate::metrics::METRICS.discovery_lease(&gone.key, None);
            if gone.held.is_some() {
                let (lease, h) = (gone.lease.clone(), holder.clone());
                if let Err(e) = blocking(&state, move |s| s.release_lease(&lease, &h)).await {
                    warn!(source = %gone.key, error = %e, "releasing a discovery lease");
                }
            }
        }
        let mut old = std::mem::take(&mut slots);
        for ((m, region), key) in wanted.into_iter().zip(keys.iter()) {
            match old.iter().position(|s| &s.key == key) {
                // A changed matcher polls again at once; the lease stays.
                Some(i) => {
                    let mut s = old.swap_remove(i);
                    s.matcher = m;
                    s.next_poll = Instant::now();
                    slots.push(s);
                }
                None => slots.push(Slot {
                    matcher: m,
                    region,
                    key: key.clone(),
                    lease: discovery_lease(key),
                    held: None,
                    next_poll: Instant::now(),
                    polling: false,
                }),
            }
        }
        let grace = ttl * 3;
        let prune = move |s: &State| s.prune_discovered(&keys, grace);
        match blocking(&state, prune.clone()).await {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "dropped databases of discovery sources no node polls any more"),
            Err(e) => warn!(error = %e, "pruning discovered databases"),
        }
        if !slots.is_empty() {
            info!(sources = slots.len(), interval = ?discovery.poll_interval, lease_ttl = ?ttl, holder = %holder, "AWS discovery is on");
        }
        let mut leases = tokio::time::interval(step);
        leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = tokio::time::interval(CONFIG_WATCH);
        let mut steps: u64 = 0;
        loop {
            let due = slots.iter().filter(|s| !s.polling && s.fresh(ttl).is_some()).map(|s| s.next_poll).min();
            tokio::select! {
                _ = leases.tick(), if !slots.is_empty() => {
                    steps += 1;
                    for slot in &mut slots {
                        renew(&state, &holder, slot, ttl).await;
                    }
                    // Rows of sources whose poller is gone and that no node configures.
                    if steps.is_multiple_of(9) {
                        if let Ok(n @ 1..) = blocking(&state, prune.clone()).await {
                            info!(removed = n, "dropped databases of discovery sources no node polls any more");
                        }
                    }
                }
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                    let now = Instant::now();
                    for slot in slots.iter_mut().filter(|s| !s.polling && s.next_poll <= now) {
                        let Some(token) = slot.fresh(ttl) else { continue };
                        slot.polling = true;
                        // The next poll is due an interval after this one started, as a fixed
                        // interval would have it.
                        slot.next_poll = now + discovery.poll_interval;
                        let fence = Fence { name: slot.lease.clone(), holder: holder.clone(), token };
                        let (state, minter, m, region, key, done) =
                            (state.clone(), minter.clone(), slot.matcher.clone(), slot.region.clone(), slot.key.clone(), done_tx.clone());
                        tokio::spawn(async move {
                            let polled = poll_source(&state, &minter, &m, &region, Some(fence)).await;
                            let _ = done.send((key, polled));
                        });
                    }
                }
                Some((key, polled)) = done_rx.recv(), if slots.iter().any(|s| s.polling) => {
                    if let Some(slot) = slots.iter_mut().find(|s| s.key == key) {
                        slot.polling = false;
                        if polled == Polled::Fenced && slot.held.take().is_some() {
                            crate::metrics::METRICS.discovery_lease(&slot.key, Some(false));
                            info!(source = %slot.key, lease = %slot.lease, holder = %holder, "discovery lease lost");
                        }
                    }
                }
                _ = watch.tick(), if config_path.is_some() => {
                    let Some(path) = config_path.as_deref() else { continue };
                    let now = modified(path);
                    if now == stamp {
                        continue;
                    }
                    stamp = now;
                    match Config::load(path) {
                        Ok(c) if c.discovery_service != discovery => {
                            info!("discovery configuration changed; fetching now");
                            discovery = c.discovery_service;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "config changed but does not load; keeping the running discovery"),
                    }
                }
                else => return,
            }
        }
    }
}

/// Takes or renews one source's lease. A holder that cannot renew keeps polling only while
/// its last renewal is under 2/3 of the ttl old ([`Slot::fresh`]); a node that takes a lease
/// over polls at once.
async fn renew(state: &Arc<State>, holder: &str, slot: &mut Slot, ttl: Duration) {
    let sent = Instant::now();
    let (lease, h) = (slot.lease.clone(), holder.to_owned());
    match blocking(state, move |s| s.acquire_lease(&lease, &h, ttl)).await {
        Ok(Some(token)) => {
            let before = slot.held.map(|(t, _)| t);
            if before != Some(token) {
                info!(source = %slot.key, lease = %slot.lease, holder = %holder, token, "discovery lease acquired; polling now");
                crate::metrics::METRICS.discovery_lease(&slot.key, Some(true));
                slot.next_poll = sent;
            }
            slot.held = Some((token, sent));
        }
        Ok(None) => {
            if slot.held.take().is_some() {
                info!(source = %slot.key, lease = %slot.lease, holder = %holder, "discovery lease lost to another node");
            }
            crate::metrics::METRICS.discovery_lease(&slot.key, Some(false));
        }
        Err(e) => {
            warn!(source = %slot.key, lease = %slot.lease, error = %e, "renewing the discovery lease");
            if slot.held.is_some() && slot.fresh(ttl).is_none() {
                slot.held = None;
                info!(source = %slot.key, lease = %slot.lease, holder = %holder, "discovery lease lost: not renewed in time");
                crate::metrics::METRICS.discovery_lease(&slot.key, Some(false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matcher() -> AwsMatcher {
        serde_saphyr::from_str("types: [rdsproxy]\nregions: [us-west-2]\nassume_role_arn: arn:aws:iam::222222222222:role/disc\nexternal_id: ext\n").unwrap()
    }

    fn proxy() -> ProxyInfo {
        ProxyInfo {
            name: "orders".into(),
            arn: "arn:aws:rds:us-west-2:123456789012:db-proxy:prx-0123456789abcdef0".into(),
            status: "available".into(),
            engine_family: "POSTGRESQL".into(),
            vpc_id: "vpc-1".into(),
            endpoint: "orders.proxy-abcdefghijkl.us-west-2.rds.amazonaws.com".into(),
            require_tls: true,
            tags: vec![("env".into(), "prod".into()), ("bad key!".into(), "x".into())],
        }
    }

    fn endpoint() -> EndpointInfo {
        EndpointInfo {
            proxy_name: "orders".into(),
            name: "ro".into(),
            status: "available".into(),
            vpc_id: "vpc-1".into(),
            endpoint: "ro.endpoint.proxy-abcdefghijkl.us-west-2.rds.amazonaws.com".into(),
            target_role: "READ_ONLY".into(),
            is_default: false,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn default_endpoint_becomes_proxy_database() {
        let d = proxy_database(&matcher(), &proxy()).unwrap();
        let r = &d.resource;
        assert_eq!(r.metadata.name, "orders");
        assert_eq!(r.metadata.description, "RDS Proxy in us-west-2");
        assert_eq!(r.spec.uri, "orders.proxy-abcdefghijkl.us-west-2.rds.amazonaws.com:5432");
        assert_eq!(r.spec.tls.server_name, None);
        assert_eq!(r.spec.aws.assume_role_arn.as_deref(), Some("arn:aws:iam::222222222222:role/disc"));
        assert_eq!(r.spec.aws.external_id.as_deref(), Some("ext"));
        assert_eq!(d.aws_resource_id, "prx-0123456789abcdef0");
        assert_eq!(
            r.metadata.labels,
            labels(&[
                ("account-id", "123456789012"),
                ("region", "us-west-2"),
                ("engine", "POSTGRESQL"),
                ("vpc-id", "vpc-1"),
                ("env", "prod"),
                ("sluice.dev/origin", "cloud"),
                ("sluice.dev/discovery-type", "rdsproxy"),
            ])
        );
        r.validate().unwrap();
    }

    #[test]
    fn custom_endpoint_checks_the_proxy_host() {
        let d = endpoint_database(&matcher(), &proxy(), &endpoint()).unwrap();
        let r = &d.resource;
        assert_eq!(r.metadata.name, "orders-ro");
        assert_eq!(r.metadata.description, "RDS Proxy endpoint in us-west-2");
        assert_eq!(r.spec.uri, "ro.endpoint.proxy-abcdefghijkl.us-west-2.rds.amazonaws.com:5432");
        assert_eq!(r.spec.tls.server_name.as_deref(), Some("orders.proxy-abcdefghijkl.us-west-2.rds.amazonaws.com"));
        assert_eq!(r.metadata.labels.get("endpoint-type").map(String::as_str), Some("READ_ONLY"));
    }

    #[test]
    fn ports_by_engine_and_skips() {
        let mut p = proxy();
        p.engine_family = "MYSQL".into();
        let mysql = proxy_database(&matcher(), &p).unwrap().resource;
        assert!(mysql.spec.uri.ends_with(":3306"));
        assert_eq!(mysql.spec.protocol, "mysql");
        mysql.spec.validate().unwrap();
        assert_eq!(mysql.metadata.labels.get("engine").map(String::as_str), Some("MYSQL"));
        let e = endpoint_database(&matcher(), &p, &endpoint()).unwrap().resource;
        assert_eq!((e.spec.protocol.as_str(), e.spec.uri.ends_with(":3306")), ("mysql", true));
        let postgres = proxy_database(&matcher(), &proxy()).unwrap().resource;
        assert_eq!(postgres.spec.protocol, "postgres");
        // Every label a PostgreSQL proxy gets, a MySQL one gets too (the engine's value aside).
        let keys = |l: &BTreeMap<String, String>| l.keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&mysql.metadata.labels), keys(&postgres.metadata.labels));
        p.engine_family = "SQLSERVER".into();
        assert_eq!(proxy_database(&matcher(), &p).unwrap_err(), Skip::Unsupported("SQLSERVER".into()));
        assert!(Skip::Unsupported("SQLSERVER".into()).to_string().contains("not supported"));
        p.engine_family = "ORACLE".into();
        assert_eq!(proxy_database(&matcher(), &p).unwrap_err(), Skip::Engine("ORACLE".into()));
        let mut p = proxy();
        p.require_tls = false;
        assert_eq!(proxy_database(&matcher(), &p).unwrap_err(), Skip::NoTls);
        for s in ["creating", "deleting", "suspended", "incompatible-network"] {
            let mut p = proxy();
            p.status = s.into();
            assert_eq!(proxy_database(&matcher(), &p).unwrap_err(), Skip::Status(s.into()));
        }
    }

    #[test]
    fn tag_matchers_see_every_label() {
        let mut m = matcher();
        m.tags = serde_saphyr::from_str("{env: prod}").unwrap();
        assert!(proxy_database(&m, &proxy()).is_ok());
        m.tags = serde_saphyr::from_str("{env: dev}").unwrap();
        assert_eq!(proxy_database(&m, &proxy()).unwrap_err(), Skip::Tags);
        m.tags = serde_saphyr::from_str("{region: us-west-2, engine: POSTGRESQL}").unwrap();
        assert!(proxy_database(&m, &proxy()).is_ok());
        m.tags = serde_saphyr::from_str("{endpoint-type: READ_ONLY}").unwrap();
        assert_eq!(proxy_database(&m, &proxy()).unwrap_err(), Skip::Tags);
        assert!(endpoint_database(&m, &proxy(), &endpoint()).is_ok());
        let all = map_region(&m, &[proxy()], &[endpoint()]);
        assert_eq!(all.len(), 1, "{all:?}");
    }

    #[test]
    fn default_endpoints_are_not_duplicated() {
        let mut def = endpoint();
        def.name = "default".into();
        def.is_default = true;
        let all = map_region(&matcher(), &[proxy()], &[def, endpoint()]);
        let names: Vec<_> = all.iter().map(|d| d.resource.metadata.name.as_str()).collect();
        assert_eq!(names, ["orders", "orders-ro"]);
    }

    #[test]
    fn arns() {
        let a: Arn = "arn:aws:rds:us-west-2:123456789012:db-proxy:prx-1".parse().unwrap();
        assert_eq!(
            (a.region.as_str(), a.account_id.as_str(), a.resource.as_str()),
            ("us-west-2", "123456789012", "db-proxy:prx-1")
        );
        assert!("arn:aws:rds".parse::<Arn>().is_err());
        assert!("nope:aws:rds:r:a:x".parse::<Arn>().is_err());
    }

    /// A discovered row for proxy `name` in `region` of `account`, found by `source`.
    fn row(source: &str, name: &str, region: &str, account: &str) -> DiscoveredRow {
        let mut p = proxy();
        p.name = name.into();
        p.arn = format!("arn:aws:rds:{region}:{account}:db-proxy:prx-{name}");
        DiscoveredRow { source: source.into(), item: proxy_database(&matcher(), &p).unwrap(), stale: None }
    }

    fn served(rows: &[DiscoveredRow], taken: &[&str]) -> BTreeMap<String, String> {
        let taken: BTreeSet<String> = taken.iter().map(|t| t.to_string()).collect();
        rows.iter().zip(served_names(rows, &taken)).filter_map(|(r, n)| Some((r.item.uid.clone(), n?))).collect()
    }

    #[test]
    fn unique_names_stay_plain() {
        let rows = [row("a", "orders", "us-west-2", "111111111111"), row("a", "billing", "us-west-2", "111111111111")];
        let got: BTreeSet<String> = served(&rows, &["demo"]).into_values().collect();
        assert_eq!(got, ["billing", "orders"].map(String::from).into());
    }

    #[test]
    fn same_name_in_two_regions_renames_both() {
        let rows =
            [row("west", "orders", "us-west-2", "111111111111"), row("east", "orders", "eu-west-1", "111111111111")];
        let got = served(&rows, &[]);
        assert_eq!(got[&rows[0].item.uid], "orders-us-west-2-111111111111");
        assert_eq!(got[&rows[1].item.uid], "orders-eu-west-1-111111111111");
    }

    #[test]
    fn same_name_in_two_accounts_renames_both() {
        let rows = [row("a", "orders", "us-west-2", "111111111111"), row("b", "orders", "us-west-2", "222222222222")];
        let got = served(&rows, &[]);
        assert_eq!(got[&rows[0].item.uid], "orders-us-west-2-111111111111");
        assert_eq!(got[&rows[1].item.uid], "orders-us-west-2-222222222222");
    }

    #[test]
    fn a_static_or_dynamic_name_is_never_shadowed() {
        let rows = [row("a", "orders", "us-west-2", "111111111111"), row("a", "billing", "us-west-2", "111111111111")];
        let got = served(&rows, &["orders"]);
        assert_eq!(got[&rows[0].item.uid], "orders-us-west-2-111111111111");
        assert_eq!(got[&rows[1].item.uid], "billing");
    }

    #[test]
    fn one_resource_seen_by_two_sources_is_served_once() {
        let a = row("a", "orders", "us-west-2", "111111111111");
        let mut b = row("b", "orders", "us-west-2", "111111111111");
        b.item.resource.spec.uri = "from-b:5432".into();
        let taken = BTreeSet::new();
        assert_eq!(served_names(&[a.clone(), b.clone()], &taken), [Some("orders".to_owned()), None]);
        assert_eq!(served_names(&[b.clone(), a.clone()], &taken), [None, Some("orders".to_owned())]);
        // A source whose last fetch failed gives way to one whose fetch succeeded.
        let mut stale_a = a.clone();
        stale_a.stale = Some("Throttling".into());
        assert_eq!(served_names(&[stale_a, b], &taken), [None, Some("orders".to_owned())]);
    }

    #[test]
    fn names_that_stay_ambiguous_get_a_hash() {
        // A proxy literally named like another's qualified name, in the same region and account.
        let rows = [
            row("a", "orders", "us-west-2", "111111111111"),
            row("b", "orders", "eu-west-1", "111111111111"),
            row("a", "orders-us-west-2-111111111111", "us-west-2", "111111111111"),
        ];
        let got = served(&rows, &[]);
        let names: BTreeSet<&String> = got.values().collect();
        assert_eq!(names.len(), 3, "{got:?}");
        assert_eq!(got[&rows[1].item.uid], "orders-eu-west-1-111111111111");
        for r in [&rows[0], &rows[2]] {
            let n = &got[&r.item.uid];
            assert!(n.starts_with("orders-us-west-2-111111111111-") && n.len() == 29 + 9, "{n}");
        }
        // Long names are shortened to fit, suffix and all.
        let long = "p".repeat(120);
        let rows = [row("a", &long, "us-west-2", "111111111111"), row("b", &long, "eu-west-1", "111111111111")];
        for n in served(&rows, &[]).values() {
            assert_eq!(n.len(), MAX_NAME, "{n}");
            crate::config::validate_name(n).unwrap();
        }
    }

    proptest! {
        /// Whatever the poll order (the order rows come back in), every resource keeps its name,
        /// and no two resources share one.
        #[test]
        fn names_are_unique_and_independent_of_order(
            specs in proptest::collection::vec((0..3usize, 0..3usize, 0..2usize, 0..2usize), 1..12),
            seed in any::<u64>(),
        ) {
            let names = ["orders", "billing", "orders-us-west-2-111111111111"];
            let regions = ["us-west-2", "eu-west-1", "ap-south-1"];
            let accounts = ["111111111111", "222222222222"];
            let rows: Vec<DiscoveredRow> = specs
                .iter()
                .map(|&(n, r, a, s)| row(&format!("src{s}"), names[n], regions[r], accounts[a]))
                .collect();
            let taken = ["billing"];
            let got = served(&rows, &taken);
            let distinct: BTreeSet<&String> = got.values().collect();
            prop_assert_eq!(distinct.len(), got.len());
            prop_assert!(got.values().all(|n| !taken.contains(&n.as_str())));
            let mut shuffled = rows.clone();
            let mut x = seed;
            for i in (1..shuffled.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (x >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(served(&shuffled, &taken), got);
        }

        #[test]
        fn arn_parser_never_panics(s in ".{0,300}") {
            let _ = s.parse::<Arn>();
        }

        #[test]
        fn arn_round_trips(region in "[a-z0-9-]{1,20}", account in "[0-9]{12}", res in "[a-z:/0-9-]{1,40}") {
            let a: Arn = format!("arn:aws:rds:{region}:{account}:{res}").parse().unwrap();
            prop_assert_eq!(a.region, region);
            prop_assert_eq!(a.account_id, account);
            prop_assert_eq!(a.resource, res);
        }
    }
}
