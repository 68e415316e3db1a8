//! Roles and the access decision for a database session.
//!
//! A role (Teleport's `kind: role` shape) has `allow` and `deny` conditions over database labels,
//! database names and database users, with `*` wildcards. Access is granted when one role's allow
//! section matches all three, and no role's deny section matches; deny always wins.
//!
//! A deny section applies to the databases its `db_labels` match (no `db_labels` means every
//! database). Within those, it denies the listed `db_names` and `db_users`; a deny section that
//! lists labels but neither names nor users denies those databases outright.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub kind: String,
    #[serde(default = "default_version")]
    pub version: String,
    pub metadata: RoleMetadata,
    pub spec: RoleSpec,
}

fn default_version() -> String {
    "v7".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMetadata {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    #[serde(default)]
    pub allow: Conditions,
    #[serde(default)]
    pub deny: Conditions,
    /// What sessions of this role may ask for beyond a plain connection.
    #[serde(default, skip_serializing_if = "DbOptions::is_default")]
    pub db_options: DbOptions,
    /// Holders administer Sluice in the web console: watch and end live sessions, manage locks,
    /// read the audit log.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DbOptions {
    /// Replication connections (the `replication` startup parameter, physical or logical):
    /// such a session is not bound to `db_names`, so it must be allowed explicitly.
    #[serde(default)]
    pub replication: bool,
}

impl DbOptions {
    fn is_default(&self) -> bool {
        self == &DbOptions::default()
    }
}

/// Whether one of `roles` allows replication connections.
pub fn allows_replication(roles: &[Role]) -> bool {
    roles.iter().any(|r| r.spec.db_options.replication)
}

/// Label values may be one string or a list; `*` matches anything.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum LabelValues {
    One(String),
    Many(Vec<String>),
}

impl LabelValues {
    fn values(&self) -> &[String] {
        match self {
            LabelValues::One(s) => std::slice::from_ref(s),
            LabelValues::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub db_labels: BTreeMap<String, LabelValues>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_users: Vec<String>,
}

impl Role {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kind != "role" {
            return Err(ConfigError::Invalid(format!("expected kind: role, got {}", self.kind)));
        }
        crate::config::validate_name(&self.metadata.name)
    }
}

/// Glob match where `*` stands for any run of characters.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !value.starts_with(first) || value.len() < first.len() + last.len() || !value.ends_with(last) {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

fn any_match(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, value))
}

/// Every selector key must match some label (a `*` key matches any label, and `'*': '*'` matches
/// every database, including one with no labels).
pub fn labels_match(selector: &BTreeMap<String, LabelValues>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(key, want)| {
        let want = want.values();
        if key == "*" && want.iter().any(|w| w == "*") {
            return true;
        }
        labels.iter().any(|(k, v)| glob_match(key, k) && any_match(want, v))
    })
}

/// What is being asked for.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    pub db_service: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub db_name: &'a str,
    pub db_user: &'a str,
}

/// Why access was refused; the text reaches the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Decides a session. `roles` are the user's roles that exist (missing ones grant nothing).
pub fn check_access(user: &str, roles: &[Role], req: AccessRequest<'_>) -> Result<(), Denied> {
    for role in roles {
        let deny = &role.spec.deny;
        let applies = deny.db_labels.is_empty() || labels_match(&deny.db_labels, req.labels);
        if !applies || deny == &Conditions::default() {
            continue;
        }
        let name = &role.metadata.name;
        if deny.db_names.is_empty() && deny.db_users.is_empty() {
            return Err(Denied(format!("role {name:?} denies access to database {:?} by its labels", req.db_service)));
        }
        if any_match(&deny.db_names, req.db_name) {
            return Err(Denied(format!("role {name:?} denies database name {:?}", req.db_name)));
        }
        if any_match(&deny.db_users, req.db_user) {
            return Err(Denied(format!("role {name:?} denies database user {:?}", req.db_user)));
        }
    }
    let mut reasons = Vec::new();
    for role in roles {
        let allow = &role.spec.allow;
        if allow.db_labels.is_empty() || !labels_match(&allow.db_labels, req.labels) {
            continue;
        }
        if !any_match(&allow.db_names, req.db_name) {
            reasons.push(format!("database name {:?}", req.db_name));
            continue;
        }
        if !any_match(&allow.db_users, req.db_user) {
            reasons.push(format!("database user {:?}", req.db_user));
            continue;
        }
        return Ok(());
    }
    Err(Denied(if roles.is_empty() {
        format!("user {user:?} has no roles")
    } else if reasons.is_empty() {
        format!("no role of user {user:?} allows database {:?} (labels do not match)", req.db_service)
    } else {
        format!("no role of user {user:?} allows {} on database {:?}", reasons.join(" or "), req.db_service)
    }))
}

/// Whether a role could grant any access to a database with these labels (for `sluice db ls`).
pub fn can_see(roles: &[Role], labels: &BTreeMap<String, String>) -> bool {
    let denied = roles.iter().any(|r| {
        let d = &r.spec.deny;
        !d.db_labels.is_empty() && d.db_names.is_empty() && d.db_users.is_empty() && labels_match(&d.db_labels, labels)
    });
    !denied && roles.iter().any(|r| !r.spec.allow.db_labels.is_empty() && labels_match(&r.spec.allow.db_labels, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(y: &str) -> Role {
        serde_saphyr::from_str(y).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const DEV: &str = r#"
kind: role
metadata: {name: dev}
spec:
  allow:
    db_labels: {env: [dev, "stag*"]}
    db_names: ["*"]
    db_users: [alice, "app_*"]
  deny:
    db_names: [secrets]
"#;

    fn req<'a>(l: &'a BTreeMap<String, String>, name: &'a str, user: &'a str) -> AccessRequest<'a> {
        AccessRequest { db_service: "db1", labels: l, db_name: name, db_user: user }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("app_*", "app_user"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*e", "abde"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("exact", "exact"));
    }

    #[test]
    fn allow_by_labels_names_users() {
        let roles = vec![role(DEV)];
        let dev = labels(&[("env", "dev")]);
        let staging = labels(&[("env", "staging")]);
        let prod = labels(&[("env", "prod")]);
        assert!(check_access("alice", &roles, req(&dev, "app", "alice")).is_ok());
        assert!(check_access("alice", &roles, req(&staging, "app", "app_ro")).is_ok());
        let e = check_access("alice", &roles, req(&prod, "app", "alice")).unwrap_err();
        assert!(e.0.contains("labels do not match"), "{e}");
        let e = check_access("alice", &roles, req(&dev, "app", "bob")).unwrap_err();
        assert!(e.0.contains("database user \"bob\""), "{e}");
        let e = check_access("alice", &roles, req(&dev, "secrets", "alice")).unwrap_err();
        assert!(e.0.contains("denies database name \"secrets\""), "{e}");
    }

    #[test]
    fn deny_by_labels_wins_over_another_roles_allow() {
        let admin = role("kind: role\nmetadata: {name: admin}\nspec:\n  allow:\n    db_labels: {'*': '*'}\n    db_names: ['*']\n    db_users: ['*']\n");
        let no_prod = role("kind: role\nmetadata: {name: no-prod}\nspec:\n  deny:\n    db_labels: {env: prod}\n");
        let prod = labels(&[("env", "prod")]);
        let dev = labels(&[("env", "dev")]);
        let roles = vec![admin, no_prod];
        assert!(check_access("bob", &roles, req(&dev, "x", "y")).is_ok());
        let e = check_access("bob", &roles, req(&prod, "x", "y")).unwrap_err();
        assert!(e.0.contains("no-prod"), "{e}");
        assert!(can_see(&roles, &dev));
        assert!(!can_see(&roles, &prod));
    }

    #[test]
    fn no_roles_means_no_access() {
        let l = labels(&[]);
        assert!(check_access("eve", &[], req(&l, "x", "y")).is_err());
    }
}
