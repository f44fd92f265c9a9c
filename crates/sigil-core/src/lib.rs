//! The vocabulary shared by every sigil crate: SPIFFE IDs, selectors, registration entries,
//! scopes, the revocation rule and an injectable clock. This crate does no I/O.
#![forbid(unsafe_code)]

mod clock;
mod entry;
mod revocation;
mod selector;
mod spiffe_id;

pub use clock::{Clock, ManualClock, SystemClock, UnixTime};
pub use entry::{
    DEFAULT_JWT_TTL_SECS, DEFAULT_X509_TTL_SECS, EntryError, EntryId, EntrySpec, MAX_JWT_TTL_SECS,
    MAX_X509_TTL_SECS, MIN_TTL_SECS, RegistrationEntry, node_has_all, validate_dns_name,
    validate_group, validate_node_selector, validate_scope,
};
pub use revocation::{Credential, RevocationSet, RevokedSvid};
pub use selector::{Selector, SelectorError, SelectorKind};
pub use spiffe_id::{MAX_SPIFFE_ID_LEN, SpiffeId, SpiffeIdError, TrustDomain};
