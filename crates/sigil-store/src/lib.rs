//! sigil-store: the trust authority's one persistence layer. Registration entries, attested
//! nodes, join tokens, issued identities, revocations and signing authorities, on an embedded
//! SQLite file or on PostgreSQL, behind the object-safe [`Store`] trait.
#![forbid(unsafe_code)]

mod error;
mod migrate;
mod model;
mod sql;
mod store;

pub use error::{JoinTokenError, StoreError};
pub use migrate::SCHEMA_VERSION;
pub use model::{
    AuthorityKind, AuthorityRecord, AuthorityState, DbRoleRecord, EntryFilter, IdentityKind,
    IssuedIdentity, LeaseFilter, LeaseRecord, ModelKeyRecord, NodeRecord, NodeRiskRecord,
    PolicyBundleRecord, QuarantineRecord, Revocation, SecretVersionRecord, UnknownName,
};
pub use sql::{
    Backend, BootstrapLock, CHANGES_CHANNEL, SqlStore, connect_postgres, listen_for_changes,
    postgres_connect_options,
};
pub use store::{Store, TlogAppend};
