//! Whether a user may hold a session to a database route: one pure decision, made at connect
//! time and again for every live session whenever the state may have changed (user removed,
//! roles changed, a lock placed, the database deregistered), so a session ends as soon as it would
//! no longer be allowed to start.
//!
//! The inputs are read from the state in one go, off the async threads ([`PolicyView::load`]).

use std::collections::HashMap;

use crate::catalog::{self, Database};
use crate::config::Config;
use crate::rbac::{check_access, AccessRequest, Role};
use crate::state::{Lock, State, StateError, User};

/// A session's route: who, to which database, as which database user and name.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub user: &'a str,
    pub db_service: &'a str,
    pub db_user: &'a str,
    pub db_name: &'a str,
}

/// Why a route is not (or no longer) allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    UnknownDatabase,
    UnknownUser,
    /// Roles deny it or do not allow it; the text says which.
    Denied(String),
    Locked {
        id: String,
        message: String,
    },
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::UnknownDatabase => write!(f, "the database is not registered with Sluice"),
            Denial::UnknownUser => write!(f, "the user does not exist"),
            Denial::Denied(why) => write!(f, "access denied: {why}"),
            Denial::Locked { id, message } if message.is_empty() => write!(f, "access is locked (lock {id})"),
            Denial::Locked { id, message } => write!(f, "access is locked (lock {id}): {message}"),
        }
    }
}

/// The state a decision reads.
#[derive(Debug, Clone, Default)]
pub struct PolicyView {
    pub databases: HashMap<String, Database>,
    pub users: HashMap<String, User>,
    pub roles: HashMap<String, Role>,
    pub locks: Vec<Lock>,
}

impl PolicyView {
    /// Reads everything a decision needs (blocking: SQLite).
    pub fn load(cfg: &Config, state: &State) -> Result<Self, StateError> {
        Ok(PolicyView {
            databases: catalog::databases(cfg, state)?.into_iter().map(|d| (d.name.clone(), d)).collect(),
            users: state.users()?.into_iter().map(|u| (u.name.clone(), u)).collect(),
            roles: state.roles()?.into_iter().map(|r| (r.metadata.name.clone(), r)).collect(),
            locks: state.active_locks()?,
        })
    }

    /// Reads what one connection's decision needs (blocking: SQLite).
    pub fn load_for(cfg: &Config, state: &State, user: &str, db_service: &str) -> Result<Self, StateError> {
        let users: HashMap<String, User> = state.user(user)?.into_iter().map(|u| (u.name.clone(), u)).collect();
        let roles = match users.get(user) {
            Some(u) => state.roles_of(u)?.into_iter().map(|r| (r.metadata.name.clone(), r)).collect(),
            None => HashMap::new(),
        };
        Ok(PolicyView {
            databases: catalog::find(cfg, state, db_service)?.into_iter().map(|d| (d.name.clone(), d)).collect(),
            users,
            roles,
            locks: state.active_locks()?,
        })
    }

    /// The roles `user` holds that exist (a role deleted after assignment grants nothing).
    pub fn roles_of(&self, user: &User) -> Vec<Role> {
        user.roles.iter().filter_map(|r| self.roles.get(r).cloned()).collect()
    }

    /// Decides a route; on success returns the database.
    pub fn decide(&self, route: Route<'_>) -> Result<&Database, Denial> {
        let db = self.databases.get(route.db_service).ok_or(Denial::UnknownDatabase)?;
        let user = self.users.get(route.user).ok_or(Denial::UnknownUser)?;
        let roles = self.roles_of(user);
        let req =
            AccessRequest { db_service: &db.name, labels: &db.labels, db_name: route.db_name, db_user: route.db_user };
        check_access(&user.name, &roles, req).map_err(|d| Denial::Denied(d.to_string()))?;
        if let Some(lock) = self.locks.iter().find(|l| l.matches(&user.name, &db.name)) {
            return Err(Denial::Locked { id: lock.id.clone(), message: lock.message.clone() });
        }
        Ok(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rbac::{Conditions, LabelValues, RoleMetadata, RoleSpec};

    fn view() -> PolicyView {
        let db = Database {
            name: "orders".into(),
            description: String::new(),
            labels: [("env".to_owned(), "prod".to_owned())].into_iter().collect(),
            spec: serde_saphyr::from_str(
                "protocol: postgres\nuri: x.proxy-abcdefghijkl.us-east-1.rds.amazonaws.com:5432",
            )
            .unwrap(),
            origin: "static",
            stale: None,
        };
        let role = Role {
            kind: "role".into(),
            version: "v7".into(),
            metadata: RoleMetadata { name: "dev".into(), description: String::new() },
            spec: RoleSpec {
                allow: Conditions {
                    db_labels: [("env".to_owned(), LabelValues::One("prod".into()))].into_iter().collect(),
                    db_names: vec!["app".into()],
                    db_users: vec!["alice".into()],
                },
                ..Default::default()
            },
        };
        PolicyView {
            databases: [("orders".to_owned(), db)].into_iter().collect(),
            users: [("alice".to_owned(), User { name: "alice".into(), roles: vec!["dev".into()] })]
                .into_iter()
                .collect(),
            roles: [("dev".to_owned(), role)].into_iter().collect(),
            locks: Vec::new(),
        }
    }

    const ROUTE: Route<'static> = Route { user: "alice", db_service: "orders", db_user: "alice", db_name: "app" };

    #[test]
    fn every_change_that_revokes_access_is_seen() {
        let v = view();
        assert_eq!(v.decide(ROUTE).map(|d| d.name.as_str()), Ok("orders"));

        let mut gone = v.clone();
        gone.users.clear();
        assert_eq!(gone.decide(ROUTE).unwrap_err(), Denial::UnknownUser);

        let mut no_role = v.clone();
        no_role.users.get_mut("alice").unwrap().roles = vec!["readonly".into()];
        assert!(matches!(no_role.decide(ROUTE), Err(Denial::Denied(_))));

        let mut narrowed = v.clone();
        narrowed.roles.get_mut("dev").unwrap().spec.allow.db_names = vec!["other".into()];
        assert!(matches!(narrowed.decide(ROUTE), Err(Denial::Denied(_))));

        let mut locked = v.clone();
        locked.locks.push(Lock {
            id: "l1".into(),
            user: Some("alice".into()),
            db: None,
            message: "incident".into(),
            expires_at: None,
            created_at: 0,
        });
        assert_eq!(locked.decide(ROUTE).unwrap_err().to_string(), "access is locked (lock l1): incident");

        let mut deregistered = v;
        deregistered.databases.clear();
        assert_eq!(deregistered.decide(ROUTE).unwrap_err(), Denial::UnknownDatabase);
    }
}
