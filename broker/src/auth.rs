//! Bearer-token authentication and per-token ACLs.
//!
//! Tokens are configured by their SHA-256 (hex), never in clear (`spoold --hash-token` prints
//! the hash of a token read from stdin). A request's `authorization: Bearer <token>` is hashed
//! and compared with **every** configured hash in constant time (`subtle`), so neither the
//! match nor its position leaks through timing. Tokens must be random and long (≥ 128 bits):
//! a fast hash is then as good as a slow one, and checking costs microseconds.
//!
//! ACL entries are name prefixes, as Kafka's "prefixed" ACLs: `"orders."` covers every topic
//! whose name starts with `orders.`; `"*"` covers everything. A token may:
//! - `admin`: create, delete, alter and grow topics matching;
//! - `produce`: write to topics matching;
//! - `consume`: read topics matching;
//! - `groups`: commit, fetch, list and delete offsets of groups matching (committing, and
//!   deleting only some topics' offsets, also need `consume` on each topic).
//!
//! Any of `admin`, `produce` or `consume` on a topic implies **describing** it (DescribeTopic,
//! ListTopics, ListOffsets), as Kafka's READ, WRITE and ALTER imply DESCRIBE: a producer
//! looks its topic's partitions up before it writes, a consumer its offsets before it reads.
//!
//! With no tokens configured, authentication is off and every request is allowed (the broker
//! then only listens on loopback, unless told otherwise).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::error::{BrokerError, ConfigError};

/// One configured token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who this token is (shows up in logs).
    pub name: String,
    /// SHA-256 of the token, 64 hex digits.
    pub sha256: String,
    /// Topic prefixes this token administers.
    #[serde(default)]
    pub admin: Vec<String>,
    /// Topic prefixes this token may produce to.
    #[serde(default)]
    pub produce: Vec<String>,
    /// Topic prefixes this token may consume from.
    #[serde(default)]
    pub consume: Vec<String>,
    /// Consumer-group prefixes this token may commit, fetch, list and delete offsets of.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// What a request wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Admin,
    Produce,
    Consume,
    Group,
    /// See a topic's partitions, configuration and offsets: implied by any of the others on
    /// the topic (not by `groups`, which names groups, not topics).
    Describe,
}

/// An authenticated caller's permissions.
#[derive(Debug)]
pub(crate) struct Acl {
    name: String,
    admin: Vec<String>,
    produce: Vec<String>,
    consume: Vec<String>,
    groups: Vec<String>,
}

/// Who is calling: attached to each request by the interceptor.
#[derive(Clone, Debug)]
pub(crate) enum Principal {
    /// Authentication is off.
    Anyone,
    /// A configured token.
    Token(Arc<Acl>),
}

fn matches(prefixes: &[String], name: &str) -> bool {
    prefixes
        .iter()
        .any(|p| p == "*" || name.starts_with(p.as_str()))
}

impl Principal {
    /// May this caller produce to at least one topic? (Asking for a producer id needs it.)
    pub(crate) fn may_produce_somewhere(&self) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Token(acl) => !acl.produce.is_empty(),
        }
    }

    /// May this caller do `action` on `name` (a topic, or a group for [`Action::Group`])?
    pub(crate) fn allows(&self, action: Action, name: &str) -> bool {
        match self {
            Principal::Anyone => true,
            Principal::Token(acl) => match action {
                Action::Admin => matches(&acl.admin, name),
                Action::Produce => matches(&acl.produce, name),
                Action::Consume => matches(&acl.consume, name),
                Action::Group => matches(&acl.groups, name),
                Action::Describe => {
                    matches(&acl.consume, name)
                        || matches(&acl.produce, name)
                        || matches(&acl.admin, name)
                }
            },
        }
    }

    /// `Ok` if allowed, else [`BrokerError::NotAuthorized`] naming what was refused.
    pub(crate) fn require(&self, action: Action, name: &str) -> Result<(), BrokerError> {
        if self.allows(action, name) {
            return Ok(());
        }
        let who = match self {
            Principal::Anyone => "anyone",
            Principal::Token(acl) => acl.name.as_str(),
        };
        let (verb, needs) = match action {
            Action::Admin => ("administer", "admin"),
            Action::Produce => ("produce to", "produce"),
            Action::Consume => ("consume from", "consume"),
            Action::Group => ("use the group", "groups"),
            Action::Describe => ("describe", "produce, consume or admin"),
        };
        Err(BrokerError::NotAuthorized(format!(
            "token {who:?} may not {verb} {name:?} (needs {needs} on it)"
        )))
    }
}

/// The principal the interceptor attached to a request.
pub(crate) fn principal<T>(req: &Request<T>) -> Principal {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or(Principal::Anyone)
}

/// The configured tokens.
#[derive(Debug)]
pub(crate) struct Auth {
    tokens: Vec<([u8; 32], Arc<Acl>)>,
}

/// SHA-256 of a token, as configured (64 lowercase hex digits).
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl Auth {
    pub(crate) fn new(tokens: &[TokenConfig]) -> Result<Auth, ConfigError> {
        let mut out = Vec::with_capacity(tokens.len());
        for t in tokens {
            let hash = parse_hash(&t.sha256).ok_or_else(|| {
                ConfigError::Invalid(format!("token {:?}: sha256 must be 64 hex digits", t.name))
            })?;
            out.push((
                hash,
                Arc::new(Acl {
                    name: t.name.clone(),
                    admin: t.admin.clone(),
                    produce: t.produce.clone(),
                    consume: t.consume.clone(),
                    groups: t.groups.clone(),
                }),
            ));
        }
        Ok(Auth { tokens: out })
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks the `authorization` header; constant time in the token and its position.
    fn authenticate(&self, header: Option<&str>) -> Result<Principal, Status> {
        if !self.enabled() {
            return Ok(Principal::Anyone);
        }
        let token = header
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                Status::unauthenticated("missing bearer token (authorization: Bearer <token>)")
            })?;
        let presented: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let mut found: Option<Arc<Acl>> = None;
        for (hash, acl) in &self.tokens {
            // Every hash is compared; no early exit.
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(acl.clone());
            }
        }
        found
            .map(Principal::Token)
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// A tonic interceptor attaching the caller's [`Principal`] to each request.
    pub(crate) fn interceptor(
        self: &Arc<Self>,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
        let auth = self.clone();
        move |mut req: Request<()>| {
            let header = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            let principal = auth.authenticate(header)?;
            req.extensions_mut().insert(principal);
            Ok(req)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&[TokenConfig {
            name: "deals".into(),
            sha256: hash_token("s3cret-token"),
            admin: vec![],
            produce: vec!["deals.".into()],
            consume: vec!["prices".into(), "deals.".into()],
            groups: vec!["deals-".into()],
        }])
        .unwrap()
    }

    #[test]
    fn tokens_and_prefixes() {
        let a = auth();
        assert!(a.authenticate(None).is_err());
        assert!(a.authenticate(Some("Bearer nope")).is_err());
        assert!(
            a.authenticate(Some("s3cret-token")).is_err(),
            "scheme required"
        );
        let p = a.authenticate(Some("Bearer s3cret-token")).unwrap();
        assert!(p.allows(Action::Produce, "deals.fr"));
        assert!(!p.allows(Action::Produce, "prices"));
        assert!(p.allows(Action::Consume, "prices"));
        assert!(!p.allows(Action::Admin, "deals.fr"));
        assert!(p.allows(Action::Group, "deals-1"));
        assert!(!p.allows(Action::Group, "other"));
        assert!(Principal::Anyone.allows(Action::Admin, "x"));
        let open = Auth::new(&[]).unwrap();
        assert!(matches!(open.authenticate(None), Ok(Principal::Anyone)));
        assert!(
            Auth::new(&[TokenConfig {
                sha256: "zz".into(),
                ..a_token()
            }])
            .is_err()
        );
    }

    fn a_token() -> TokenConfig {
        TokenConfig {
            name: "x".into(),
            sha256: hash_token("x"),
            admin: vec!["*".into()],
            produce: vec![],
            consume: vec![],
            groups: vec![],
        }
    }

    #[test]
    fn known_hash() {
        // sha256("abc")
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
