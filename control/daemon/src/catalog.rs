//! The databases this control serves: static ones from the config plus the dynamic `kind: db`
//! resources that match a `db_service.resources` selector (whose `aws` block may override the
//! resource's role settings), and the resources discovery found in the cloud (matched the same way,
//! under the unique names `discovery::served_names` gives them). An agent builds the same list
//! from its own static databases and what the auth server shares ([`merge_shared`]).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::cluster::SharedDb;
use crate::config::{Config, DatabaseSpec};
use crate::rbac::{labels_match, LabelValues};
use crate::state::{State, StateError};

#[derive(Debug, Clone, Serialize)]
pub struct Database {
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub spec: DatabaseSpec,
    /// `static` (config), `dynamic` (`control db add`) or `cloud` (discovery).
    pub origin: &'static str,
    /// For `cloud` resources whose last fetch failed: why (they are still served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

/// The first `db_service.resources` matcher selecting these labels.
fn matcher_for<'a>(cfg: &'a Config, labels: &BTreeMap<String, String>) -> Option<&'a crate::config::ResourceMatcher> {
    cfg.db_service.resources.iter().find(|m| {
        let selector: BTreeMap<String, LabelValues> =
            m.labels.iter().map(|(k, v)| (k.clone(), LabelValues::One(v.clone()))).collect();
        labels_match(&selector, labels)
    })
}

fn apply_override(spec: &mut DatabaseSpec, matcher: &crate::config::ResourceMatcher) {
    if let Some(aws) = &matcher.aws {
        if aws.assume_role_arn.is_some() {
            spec.aws.assume_role_arn = aws.assume_role_arn.clone();
            spec.aws.external_id = aws.external_id.clone();
        }
        if aws.region.is_some() {
            spec.aws.region = aws.region.clone();
        }
    }
}

fn static_databases(cfg: &Config) -> Vec<Database> {
    cfg.db_service
        .databases
        .iter()
        .map(|d| Database {
            name: d.name.clone(),
            description: d.description.clone(),
            labels: d.static_labels.clone(),
            spec: d.spec.clone(),
            origin: "static",
            stale: None,
        })
        .collect()
}

/// The databases a process serves: its static ones, then those of `shared` (its own state's, or
/// what the auth server sent an agent) that one of its `db_service.resources` selectors matches,
/// with that selector's AWS overrides.
pub fn merge_shared<'a>(cfg: &Config, shared: impl IntoIterator<Item = &'a SharedDb>) -> Vec<Database> {
    let mut out = static_databases(cfg);
    for db in shared {
        let res = &db.resource;
        if out.iter().any(|d| d.name == res.metadata.name) {
            continue;
        }
        let Some(matcher) = matcher_for(cfg, &res.metadata.labels) else { continue };
        let mut spec = res.spec.clone();
        apply_override(&mut spec, matcher);
        out.push(Database {
            name: res.metadata.name.clone(),
            description: res.metadata.description.clone(),
            labels: res.metadata.labels.clone(),
            spec,
            origin: if db.origin == "cloud" { "cloud" } else { "dynamic" },
            stale: db.stale.clone(),
        });
    }
    out
}

/// A database the auth server shares with its agents, as it is listed to users: the resource
/// as stored (an agent's selector may override only its AWS settings).
pub fn shared(db: &SharedDb) -> Database {
    let res = &db.resource;
    Database {
        name: res.metadata.name.clone(),
        description: res.metadata.description.clone(),
        labels: res.metadata.labels.clone(),
        spec: res.spec.clone(),
        origin: if db.origin == "cloud" { "cloud" } else { "dynamic" },
        stale: db.stale.clone(),
    }
}

/// The dynamic resources (`control db add`), then the discovered ones under the names they are
/// served by (unique against every static and dynamic name, served or not, so that a selector
/// change does not rename them): what an auth server shares with its agents.
pub fn shared_databases(cfg: &Config, state: &State) -> Result<Vec<SharedDb>, StateError> {
    let dynamic = state.databases()?;
    let taken: BTreeSet<String> = cfg
        .db_service
        .databases
        .iter()
        .map(|d| d.name.clone())
        .chain(dynamic.iter().map(|r| r.metadata.name.clone()))
        .collect();
    let mut out: Vec<SharedDb> =
        dynamic.into_iter().map(|resource| SharedDb { resource, origin: "dynamic".into(), stale: None }).collect();
    let discovered = state.discovered()?;
    let names = crate::discovery::served_names(&discovered, &taken);
    for (row, name) in discovered.into_iter().zip(names) {
        let Some(name) = name else { continue };
        let mut resource = row.item.resource;
        resource.metadata.name = name;
        out.push(SharedDb { resource, origin: "cloud".into(), stale: row.stale });
    }
    Ok(out)
}

/// Every database served, static first; a dynamic resource never shadows a static one.
pub fn databases(cfg: &Config, state: &State) -> Result<Vec<Database>, StateError> {
    Ok(merge_shared(cfg, &shared_databases(cfg, state)?))
}

pub fn find(cfg: &Config, state: &State, name: &str) -> Result<Option<Database>, StateError> {
    Ok(databases(cfg, state)?.into_iter().find(|d| d.name == name))
}
