//! MCP sessions belong to the identity that opened them. The upstream names a session in
//! the `Mcp-Session-Id` header of its answer to `initialize`; the proxy binds that id to the
//! caller's SPIFFE ID, and a request presenting it under another identity is refused. An id
//! the proxy never saw answered (another proxy's, or one from before a restart) gets 404,
//! which the MCP transport defines as "start a new session".
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// The MCP session header.
pub const SESSION_HEADER: &str = "mcp-session-id";

/// Most sessions remembered; the oldest are forgotten first (their clients re-initialize).
const MAX_SESSIONS: usize = 65_536;

/// Why a session id is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionError {
    /// Never seen (or forgotten): the client starts a new session.
    Unknown,
    /// Bound to another identity.
    NotYours,
}

/// Session id → the SPIFFE ID that opened it.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    owner: HashMap<String, String>,
    order: VecDeque<String>,
}

impl Sessions {
    /// Whether `caller` may use session `id`.
    pub fn check(&self, id: &str, caller: &str) -> Result<(), SessionError> {
        // A poisoned lock only means a panic mid-update elsewhere: refuse.
        let inner = self.inner.lock().map_err(|_| SessionError::Unknown)?;
        match inner.owner.get(id) {
            Some(owner) if owner == caller => Ok(()),
            Some(_) => Err(SessionError::NotYours),
            None => Err(SessionError::Unknown),
        }
    }

    /// The upstream opened session `id` for `caller`. An id already bound to another
    /// identity keeps its owner (the upstream reusing an id is not a way to take it over).
    pub fn bind(&self, id: &str, caller: &str) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.owner.contains_key(id) {
            return;
        }
        while inner.owner.len() >= MAX_SESSIONS {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.owner.remove(&old);
                }
                None => break,
            }
        }
        inner.owner.insert(id.to_owned(), caller.to_owned());
        inner.order.push_back(id.to_owned());
    }

    /// Session `id` ended (`DELETE` answered with success).
    pub fn end(&self, id: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.owner.remove(id);
            inner.order.retain(|s| s != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_usable_only_by_the_identity_that_opened_it() {
        let s = Sessions::default();
        assert_eq!(s.check("abc", "spiffe://td/a"), Err(SessionError::Unknown));
        s.bind("abc", "spiffe://td/a");
        assert_eq!(s.check("abc", "spiffe://td/a"), Ok(()));
        assert_eq!(s.check("abc", "spiffe://td/b"), Err(SessionError::NotYours));
        // Another bind of the same id does not change its owner.
        s.bind("abc", "spiffe://td/b");
        assert_eq!(s.check("abc", "spiffe://td/b"), Err(SessionError::NotYours));
        s.end("abc");
        assert_eq!(s.check("abc", "spiffe://td/a"), Err(SessionError::Unknown));
    }
}
