//! The databases this control serves: static ones from the config plus the dynamic `kind: db`
//! resources that match a `db_service.resources` selector (whose `aws` block may override the
//! resource's role settings).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Config, DatabaseSpec};
use crate::rbac::{labels_match, LabelValues};
use crate::state::{State, StateError};

#[derive(Debug, Clone, Serialize)]
pub struct Database {
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub spec: DatabaseSpec,
    /// `static` (config) or `dynamic` (state).
    pub origin: &'static str,
}

/// Every database served, static first; a dynamic resource never shadows a static one.
pub fn databases(cfg: &Config, state: &State) -> Result<Vec<Database>, StateError> {
    let mut out: Vec<Database> = cfg
        .db_service
        .databases
        .iter()
        .map(|d| Database {
            name: d.name.clone(),
            description: d.description.clone(),
            labels: d.static_labels.clone(),
            spec: d.spec.clone(),
            origin: "static",
        })
        .collect();
    for res in state.databases()? {
        if out.iter().any(|d| d.name == res.metadata.name) {
            continue;
        }
        let matcher = cfg.db_service.resources.iter().find(|m| {
            let selector: BTreeMap<String, LabelValues> =
                m.labels.iter().map(|(k, v)| (k.clone(), LabelValues::One(v.clone()))).collect();
            labels_match(&selector, &res.metadata.labels)
        });
        let Some(matcher) = matcher else { continue };
        let mut spec = res.spec.clone();
        if let Some(aws) = &matcher.aws {
            if aws.assume_role_arn.is_some() {
                spec.aws.assume_role_arn = aws.assume_role_arn.clone();
                spec.aws.external_id = aws.external_id.clone();
            }
            if aws.region.is_some() {
                spec.aws.region = aws.region.clone();
            }
        }
        out.push(Database {
            name: res.metadata.name.clone(),
            description: res.metadata.description.clone(),
            labels: res.metadata.labels.clone(),
            spec,
            origin: "dynamic",
        });
    }
    Ok(out)
}

pub fn find(cfg: &Config, state: &State, name: &str) -> Result<Option<Database>, StateError> {
    Ok(databases(cfg, state)?.into_iter().find(|d| d.name == name))
}
