//! The store's error type: what can go wrong when reading or writing trust-authority state.

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinTokenError {
    /// No token with this hash was ever created.
    #[error("unknown join token")]
    Unknown,
    /// The token exists but its expiry has passed.
    #[error("join token has expired")]
    Expired,
    /// The token was already consumed (tokens are single use).
    #[error("join token was already used")]
    AlreadyUsed,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The named record does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A uniqueness rule was violated (duplicate entry, ID, serial or token).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A join token could not be consumed.
    #[error("join token refused: {0}")]
    JoinToken(#[from] JoinTokenError),
    /// A stored row failed to parse or validate; the database was changed behind the store's back.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The database URL names a backend or form this store does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The database was migrated by a newer sigil; running older code against it could lose data.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); refusing to run"
    )]
    SchemaTooNew {
        /// The version recorded in the database.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The caller passed a value the store refuses to persist (e.g. a join token that is not a
    /// SHA-256 hex digest, or a revocation naming neither a serial nor a SPIFFE ID).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The database itself failed (connection, I/O, constraint not mapped above...).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Maps a unique-constraint violation to [`StoreError::Conflict`] with `what`, anything else
    /// to [`StoreError::Database`].
    pub(crate) fn conflict_or(err: sqlx::Error, what: impl FnOnce() -> String) -> Self {
        if is_unique_violation(&err) {
            Self::Conflict(what())
        } else {
            Self::Database(err)
        }
    }
}

/// Whether `err` is a unique (or primary key) constraint violation, on either backend.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
