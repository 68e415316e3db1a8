//! IAM bootstrap: the policies Sluice needs for what its config discovers and serves, sized against
//! IAM's inline policy limits, and (without `--manual`) attached with aws-sdk-iam.
//!
//! A policy naming every RDS Proxy outgrows IAM's limits fast (2,048 bytes for a user's inline
//! policies, 10,240 for a role's), which is where Teleport's users hit `LimitExceeded` at ~20 and
//! ~100 databases. Here an oversized policy is first compacted (one `dbuser:*/*` wildcard per
//! account and region) and the permissions of databases reached through an assumed role go into
//! that role's own policy, so each document stays under its limit instead of failing at AWS.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};
use thiserror::Error;

use crate::config::Config;
use crate::discovery::Arn;
use crate::iam::{CredentialSource, TokenMinter};
use crate::state::DiscoveredRow;

/// IAM's limit on a user's inline policies (all of them together), in bytes without whitespace.
pub const USER_POLICY_LIMIT: usize = 2_048;
/// IAM's limit on a role's inline policies.
pub const ROLE_POLICY_LIMIT: usize = 10_240;
/// The inline policy name Sluice writes.
pub const POLICY_NAME: &str = "SluiceDatabaseAccess";

pub const DISCOVERY_ACTIONS: [&str; 3] =
    ["rds:DescribeDBProxies", "rds:DescribeDBProxyEndpoints", "rds:ListTagsForResource"];

#[derive(Debug, Error)]
pub enum BootstrapError {
    #[error("{0}")]
    Invalid(String),
    #[error("policy for {target} is {size} bytes, over the {limit}-byte limit even after compaction")]
    TooLarge { target: String, size: usize, limit: usize },
    #[error("{0}")]
    Credentials(String),
    #[error("attaching the policy to {target}: {message}")]
    Attach { target: String, message: String },
}

/// Who a policy is attached to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    Role(String),
    User(String),
}

impl Target {
    /// From `--attach-to-role`/`--attach-to-user`: a name or an ARN.
    pub fn name(&self) -> &str {
        let s = match self {
            Target::Role(s) | Target::User(s) => s,
        };
        s.rsplit('/').next().unwrap_or(s)
    }

    pub fn limit(&self) -> usize {
        match self {
            Target::Role(_) => ROLE_POLICY_LIMIT,
            Target::User(_) => USER_POLICY_LIMIT,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Role(r) => write!(f, "role {r}"),
            Target::User(u) => write!(f, "user {u}"),
        }
    }
}

/// What one identity (the attach target, or a role Sluice assumes) must be allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub discovery: bool,
    /// `rds-db:connect` resources: `arn:aws:rds-db:REGION:ACCOUNT:dbuser:PRX-ID/*`.
    pub connect: BTreeSet<String>,
    pub assume_roles: BTreeSet<String>,
}

/// One policy document, ready to attach.
#[derive(Debug, Clone)]
pub struct PlannedPolicy {
    pub target: Target,
    pub document: Value,
    pub size: usize,
    pub limit: usize,
    pub compacted: bool,
}

impl PlannedPolicy {
    /// The document as IAM stores and counts it (no whitespace).
    pub fn compact_json(&self) -> String {
        self.document.to_string()
    }
}

fn connect_arn(region: &str, account: &str, resource_id: &str) -> String {
    format!("arn:aws:rds-db:{region}:{account}:dbuser:{resource_id}/*")
}

/// The role ARN's account, or `*`.
fn account_of(role_arn: Option<&str>) -> String {
    role_arn.and_then(|a| a.parse::<Arn>().ok()).map(|a| a.account_id).unwrap_or_else(|| "*".into())
}

/// Splits what the config needs by identity: `None` is the attach target (the default chain), a
/// role ARN is what is needed after assuming it.
pub fn required(cfg: &Config, discovered: &[DiscoveredRow]) -> BTreeMap<Option<String>, Permissions> {
    let mut out: BTreeMap<Option<String>, Permissions> = BTreeMap::new();
    out.entry(None).or_default();
    for m in &cfg.discovery_service.aws {
        let role = m.assume_role_arn.clone();
        if let Some(r) = &role {
            out.entry(None).or_default().assume_roles.insert(r.clone());
        }
        let p = out.entry(role.clone()).or_default();
        p.discovery = true;
        for region in &m.regions {
            let key = crate::discovery::source_key(m, region);
            let found: Vec<&DiscoveredRow> = discovered.iter().filter(|d| d.source == key).collect();
            if found.is_empty() {
                // Nothing discovered yet: allow the region's proxies in the role's account.
                p.connect.insert(connect_arn(region, &account_of(role.as_deref()), "*"));
            }
            for d in found {
                let labels = &d.item.resource.metadata.labels;
                let (Some(account), Some(r)) = (labels.get("account-id"), labels.get("region")) else { continue };
                p.connect.insert(connect_arn(r, account, &d.item.aws_resource_id));
            }
        }
    }
    // Databases served with a role from the config (static ones, and resource matchers' overrides).
    for db in &cfg.db_service.databases {
        let Some(region) = db.spec.region() else { continue };
        let role = db.spec.aws.assume_role_arn.clone();
        if let Some(r) = &role {
            out.entry(None).or_default().assume_roles.insert(r.clone());
        }
        out.entry(role.clone()).or_default().connect.insert(connect_arn(&region, &account_of(role.as_deref()), "*"));
    }
    for rm in &cfg.db_service.resources {
        if let Some(r) = rm.aws.as_ref().and_then(|a| a.assume_role_arn.clone()) {
            out.entry(None).or_default().assume_roles.insert(r);
        }
    }
    out
}

fn document(p: &Permissions) -> Value {
    let mut statements = Vec::new();
    if p.discovery {
        statements.push(
            json!({"Sid": "SluiceRDSProxyDiscovery", "Effect": "Allow", "Action": DISCOVERY_ACTIONS, "Resource": "*"}),
        );
    }
    if !p.connect.is_empty() {
        statements.push(
            json!({"Sid": "SluiceRDSConnect", "Effect": "Allow", "Action": "rds-db:connect", "Resource": p.connect}),
        );
    }
    if !p.assume_roles.is_empty() {
        statements.push(json!({"Sid": "SluiceAssumeRole", "Effect": "Allow", "Action": "sts:AssumeRole", "Resource": p.assume_roles}));
    }
    json!({"Version": "2012-10-17", "Statement": statements})
}

/// Replaces per-proxy connect ARNs with one wildcard per account and region.
pub fn compact(p: &Permissions) -> Permissions {
    let connect = p
        .connect
        .iter()
        .map(|arn| match arn.split(':').collect::<Vec<_>>()[..] {
            ["arn", part, "rds-db", region, account, "dbuser", _] => {
                format!("arn:{part}:rds-db:{region}:{account}:dbuser:*/*")
            }
            _ => arn.clone(),
        })
        .collect();
    Permissions { connect, ..p.clone() }
}

fn plan_one(target: Target, p: &Permissions) -> Result<PlannedPolicy, BootstrapError> {
    let limit = target.limit();
    let doc = document(p);
    let size = doc.to_string().len();
    if size <= limit {
        return Ok(PlannedPolicy { target, document: doc, size, limit, compacted: false });
    }
    let doc = document(&compact(p));
    let size = doc.to_string().len();
    if size <= limit {
        return Ok(PlannedPolicy { target, document: doc, size, limit, compacted: true });
    }
    Err(BootstrapError::TooLarge { target: target.to_string(), size, limit })
}

/// One policy for the attach target and one per assumed role.
pub fn plan(cfg: &Config, discovered: &[DiscoveredRow], target: Target) -> Result<Vec<PlannedPolicy>, BootstrapError> {
    let mut out = Vec::new();
    for (role, perms) in required(cfg, discovered) {
        let t = match role {
            None => target.clone(),
            Some(arn) => Target::Role(arn),
        };
        if perms == Permissions::default() {
            continue;
        }
        out.push(plan_one(t, &perms)?);
    }
    Ok(out)
}

/// The policy `control aws print-iam --types rdsproxy` prints: discovery and connect on every proxy.
pub fn print_iam_document(types: &[String]) -> Result<Value, BootstrapError> {
    if let Some(t) = types.iter().find(|t| t.as_str() != "rdsproxy") {
        return Err(BootstrapError::Invalid(format!("type {t:?} is not supported (rdsproxy is)")));
    }
    let p = Permissions {
        discovery: true,
        connect: [connect_arn("*", "*", "*")].into_iter().collect(),
        assume_roles: BTreeSet::new(),
    };
    Ok(document(&p))
}

/// A human report of one planned policy: size against the limit, compaction.
pub fn report(p: &PlannedPolicy) -> String {
    let mut s = format!("{}: policy {POLICY_NAME} is {} of {} bytes", p.target, p.size, p.limit);
    if p.compacted {
        s.push_str(" (compacted: per-proxy rds-db:connect resources replaced by one wildcard per account and region)");
    }
    s
}

/// Attaches every planned policy (PutRolePolicy / PutUserPolicy) with the default credential chain.
pub async fn attach(policies: &[PlannedPolicy]) -> Result<(), BootstrapError> {
    // Resolve first: "no credentials" deserves its own explanation, not an IAM call failure.
    let source = CredentialSource { region: "us-east-1".into(), assume_role_arn: None, external_id: None };
    TokenMinter::new()
        .credentials(&source)
        .await
        .map_err(|e| BootstrapError::Credentials(crate::troubleshoot::explain_iam(&e, None)))?;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    let client = aws_sdk_iam::Client::new(&sdk);
    for p in policies {
        let doc = p.compact_json();
        let err = |e: String| BootstrapError::Attach { target: p.target.to_string(), message: e };
        match &p.target {
            Target::Role(_) => {
                client
                    .put_role_policy()
                    .role_name(p.target.name())
                    .policy_name(POLICY_NAME)
                    .policy_document(doc)
                    .send()
                    .await
                    .map_err(|e| err(aws_sdk_iam::error::DisplayErrorContext(&e).to_string()))?;
            }
            Target::User(_) => {
                client
                    .put_user_policy()
                    .user_name(p.target.name())
                    .policy_name(POLICY_NAME)
                    .policy_document(doc)
                    .send()
                    .await
                    .map_err(|e| err(aws_sdk_iam::error::DisplayErrorContext(&e).to_string()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DbResource, Metadata};
    use crate::state::Discovered;

    fn cfg(yaml: &str) -> Config {
        serde_saphyr::from_str(&format!("data_dir: /x\n{yaml}")).unwrap()
    }

    fn rows(n: usize, source: &str) -> Vec<DiscoveredRow> {
        (0..n)
            .map(|i| {
                let labels = [("account-id", "123456789012"), ("region", "us-west-2")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()));
                let resource = DbResource {
                    kind: "db".into(),
                    version: "v3".into(),
                    metadata: Metadata { name: format!("p{i}"), description: String::new(), labels: labels.into() },
                    spec: serde_saphyr::from_str("protocol: postgres\nuri: h:5432").unwrap(),
                };
                DiscoveredRow {
                    source: source.into(),
                    item: Discovered { resource, aws_resource_id: format!("prx-{i:017}"), uid: format!("p{i}") },
                    stale: None,
                }
            })
            .collect()
    }

    const ONE: &str = "discovery_service:\n  aws:\n  - types: [rdsproxy]\n    regions: [us-west-2]\n";

    #[test]
    fn small_policy_names_each_proxy() {
        let c = cfg(ONE);
        let plan = plan(&c, &rows(3, "aws/rdsproxy/us-west-2/-"), Target::User("sluice".into())).unwrap();
        assert_eq!(plan.len(), 1);
        let doc = plan[0].compact_json();
        assert!(doc.contains("arn:aws:rds-db:us-west-2:123456789012:dbuser:prx-00000000000000002/*"), "{doc}");
        assert!(doc.contains("rds:DescribeDBProxyEndpoints"));
        assert!(!plan[0].compacted);
    }

    #[test]
    fn user_policy_is_compacted_past_the_2048_byte_limit() {
        let c = cfg(ONE);
        let rows = rows(30, "aws/rdsproxy/us-west-2/-");
        let p = plan(&c, &rows, Target::User("sluice".into())).unwrap().remove(0);
        assert!(p.compacted && p.size <= USER_POLICY_LIMIT, "{}", report(&p));
        assert!(p.compact_json().contains("arn:aws:rds-db:us-west-2:123456789012:dbuser:*/*"));
        // The same 30 fit a role uncompacted; 150 do not.
        assert!(!plan(&c, &rows, Target::Role("r".into())).unwrap()[0].compacted);
        let many = super::tests::rows(150, "aws/rdsproxy/us-west-2/-");
        let p = plan(&c, &many, Target::Role("r".into())).unwrap().remove(0);
        assert!(p.compacted && p.size <= ROLE_POLICY_LIMIT, "{}", report(&p));
    }

    #[test]
    fn assumed_roles_get_their_own_policy() {
        let c = cfg("discovery_service:\n  aws:\n  - types: [rdsproxy]\n    regions: [us-west-2, eu-west-1]\n    assume_role_arn: arn:aws:iam::222222222222:role/disc\n");
        let plan = plan(&c, &[], Target::Role("sluice".into())).unwrap();
        assert_eq!(plan.len(), 2);
        let own = plan[0].compact_json();
        assert!(own.contains("sts:AssumeRole") && own.contains("role/disc") && !own.contains("rds:Describe"), "{own}");
        assert_eq!(plan[1].target, Target::Role("arn:aws:iam::222222222222:role/disc".into()));
        let theirs = plan[1].compact_json();
        assert!(theirs.contains("arn:aws:rds-db:eu-west-1:222222222222:dbuser:*/*"), "{theirs}");
        assert_eq!(Target::Role("arn:aws:iam::2:role/disc".into()).name(), "disc");
    }
}
