//! C2SP `tlog-checkpoint` tree heads, signed as C2SP `signed-note`s with Ed25519.
//!
//! A checkpoint's text is three lines — the origin (the log's name, e.g.
//! `sigil.example/log`), the tree size in decimal, the root hash in standard base64 — then a
//! blank line and one signature line per key: `— <key name> base64(key ID (4 bytes) ||
//! signature)`. The key ID is the first 4 bytes of `SHA-256(name || "\n" || 0x01 || public
//! key)`. The public key is published as a `vkey`: `<name>+<key ID hex>+base64(0x01 || key)`.
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use signed_note::{Note, StandardSigner, StandardVerifier, VerifierList};
use tlog_tiles::Checkpoint;

use crate::LogError;
use crate::merkle::Hash;

/// Signature type byte of Ed25519 keys in signed notes.
const ALG_ED25519: u8 = 0x01;

/// A log's Ed25519 signing key, with its note name.
#[derive(Clone)]
pub struct LogKey {
    signer: StandardSigner,
    name: String,
    skey: String,
    vkey: String,
}

impl std::fmt::Debug for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogKey")
            .field("vkey", &self.vkey)
            .finish_non_exhaustive()
    }
}

impl LogKey {
    /// The key with this 32-byte Ed25519 seed, named `name` (the log's origin).
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Self, LogError> {
        if !signed_note::is_key_name_valid(name) {
            return Err(LogError::malformed("key name", name));
        }
        let signing = ed25519_dalek::SigningKey::from_bytes(seed);
        let verifying = signing.verifying_key();
        let mut public = vec![ALG_ED25519];
        public.extend_from_slice(verifying.as_bytes());
        let id = signed_note::key_id(name, &public);
        let mut private = vec![ALG_ED25519];
        private.extend_from_slice(seed);
        let skey = format!("PRIVATE+KEY+{name}+{id:08x}+{}", STANDARD.encode(&private));
        let vkey = signed_note::new_ed25519_verifier_key(name, &verifying);
        let signer =
            StandardSigner::new(&skey).map_err(|e| LogError::malformed("signer key", e))?;
        Ok(Self {
            signer,
            name: name.to_owned(),
            skey,
            vkey,
        })
    }

    /// Parses a signer key in the note format (`PRIVATE+KEY+<name>+<id>+<base64>`, as written
    /// by Go's `note.GenerateKey` and [`LogKey::skey`]).
    pub fn from_skey(skey: &str) -> Result<Self, LogError> {
        let skey = skey.trim();
        let bad = |d: &str| LogError::malformed("signer key", d);
        let parts: Vec<&str> = skey.splitn(5, '+').collect();
        let [priv1, priv2, name, _id, key64] = parts.as_slice() else {
            return Err(bad("expected PRIVATE+KEY+<name>+<id>+<key>"));
        };
        if *priv1 != "PRIVATE" || *priv2 != "KEY" {
            return Err(bad("expected PRIVATE+KEY+"));
        }
        let key = STANDARD
            .decode(key64)
            .map_err(|_| bad("key is not base64"))?;
        let Some((&ALG_ED25519, seed)) = key.split_first() else {
            return Err(bad("not an Ed25519 key"));
        };
        let seed: [u8; 32] = seed.try_into().map_err(|_| bad("wrong key length"))?;
        let key = Self::from_seed(name, &seed)?;
        if key.skey != skey {
            return Err(bad("key ID does not match the key"));
        }
        Ok(key)
    }

    /// The key's name (the log's origin).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The private key in the note format. Secret.
    pub fn skey(&self) -> &str {
        &self.skey
    }

    /// The public key in the note `vkey` format.
    pub fn vkey(&self) -> &str {
        &self.vkey
    }

    /// A signed checkpoint for the tree of `size` leaves with head `root`; the origin line is
    /// the key's name.
    pub fn sign_checkpoint(&self, size: u64, root: Hash) -> Result<Vec<u8>, LogError> {
        let cp = Checkpoint::new(&self.name, size, root, "")
            .map_err(|e| LogError::malformed("checkpoint", e))?;
        self.sign_note(&cp.to_bytes())
    }

    /// Signs any note text (lines ending in `\n`).
    pub fn sign_note(&self, text: &[u8]) -> Result<Vec<u8>, LogError> {
        let mut note = Note::new(text, &[]).map_err(|e| LogError::malformed("note", e))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| LogError::BadSignature(e.to_string()))?;
        Ok(note.to_bytes())
    }
}

/// A checkpoint whose signature by the expected key verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedCheckpoint {
    /// The origin line (equal to the key's name).
    pub origin: String,
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: Hash,
}

/// Verifies a signed checkpoint against `vkey`: a valid signature by that key is required
/// (signatures by other keys are ignored), and the origin line must be the key's name.
pub fn verify_checkpoint(signed: &[u8], vkey: &str) -> Result<VerifiedCheckpoint, LogError> {
    let verifier =
        StandardVerifier::new(vkey.trim()).map_err(|e| LogError::malformed("vkey", e))?;
    let name = signed_note::Verifier::name(&verifier).to_owned();
    let note = Note::from_bytes(signed).map_err(|e| LogError::malformed("signed note", e))?;
    note.verify(&VerifierList::new(vec![Box::new(verifier)]))
        .map_err(|e| LogError::BadSignature(format!("checkpoint not signed by {name}: {e}")))?;
    let cp =
        Checkpoint::from_bytes(note.text()).map_err(|e| LogError::malformed("checkpoint", e))?;
    if cp.origin() != name {
        return Err(LogError::BadSignature(format!(
            "checkpoint origin {:?} is not the key's name {name:?}",
            cp.origin()
        )));
    }
    Ok(VerifiedCheckpoint {
        origin: cp.origin().to_owned(),
        size: cp.size(),
        root: *cp.hash(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryTree;

    // The signed-note example of Go's golang.org/x/mod/sumdb/note (also in the C2SP spec's
    // reference implementation tests).
    const PN_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const PN_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const PN_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const PN_SIG: &str = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn signed_note_vector() {
        let key = LogKey::from_skey(PN_SKEY).unwrap();
        assert_eq!(key.vkey(), PN_VKEY);
        assert_eq!(key.skey(), PN_SKEY);
        let signed = key.sign_note(PN_TEXT.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(signed).unwrap(),
            format!("{PN_TEXT}\n{PN_SIG}")
        );
    }

    #[test]
    fn checkpoint_sign_verify_and_refusals() {
        let mut t = MemoryTree::new();
        for i in 0..5u8 {
            t.push(&[i]);
        }
        let key = LogKey::from_seed("sigil.test/log", &[7u8; 32]).unwrap();
        let signed = key.sign_checkpoint(t.size(), t.root()).unwrap();
        let text = String::from_utf8(signed.clone()).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("sigil.test/log"));
        assert_eq!(lines.next(), Some("5"));
        assert_eq!(
            lines.next().map(|l| STANDARD.decode(l).unwrap()),
            Some(t.root().0.to_vec())
        );
        assert_eq!(lines.next(), Some(""));
        assert!(lines.next().unwrap().starts_with("— sigil.test/log "));

        let cp = verify_checkpoint(&signed, key.vkey()).unwrap();
        assert_eq!((cp.size, cp.root), (5, t.root()));
        assert_eq!(cp.origin, "sigil.test/log");

        // Another key of the same name: refused.
        let other = LogKey::from_seed("sigil.test/log", &[8u8; 32]).unwrap();
        assert!(
            verify_checkpoint(&other.sign_checkpoint(5, t.root()).unwrap(), key.vkey()).is_err()
        );
        // Altered body: refused.
        let altered = text.replacen("\n5\n", "\n6\n", 1);
        assert!(matches!(
            verify_checkpoint(altered.as_bytes(), key.vkey()),
            Err(LogError::BadSignature(_))
        ));
        // Origin other than the key's name, even if validly signed: refused.
        let misnamed = LogKey::from_seed("elsewhere/log", &[7u8; 32]).unwrap();
        let note = misnamed
            .sign_note(format!("sigil.test/log\n5\n{}\n", STANDARD.encode(t.root().0)).as_bytes())
            .unwrap();
        assert!(verify_checkpoint(&note, misnamed.vkey()).is_err());
        // A key round-trips through its skey.
        let again = LogKey::from_skey(key.skey()).unwrap();
        assert_eq!(again.vkey(), key.vkey());
        assert!(LogKey::from_skey(&key.skey().replace("+KEY+", "+KEYS+")).is_err());
        assert!(LogKey::from_seed("bad name", &[1u8; 32]).is_err());
    }
}
