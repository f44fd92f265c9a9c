//! MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 §12.6): seals a secret to an EK
//! so that only the TPM holding that EK *and* a loaded object of the given name can recover
//! it with ActivateCredential. Composed from aws-lc primitives (RSA-OAEP, HMAC, AES-CFB).
use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};

use crate::ak::AttestationKey;
use crate::ek::Endorsement;
use crate::error::VerifyError;

/// A credential sealed to an EK, as the device passes it to TPM2_ActivateCredential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedCredential {
    /// TPM2B_ID_OBJECT contents: TPM2B outer HMAC || encrypted TPM2B credential.
    pub credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents: the seed, RSA-OAEP encrypted to the EK.
    pub encrypted_secret: Vec<u8>,
}

/// SP 800-108 counter-mode KDF with HMAC-SHA-256, as TPM 2.0 Part 1 §11.4.10.2 (KDFa)
/// frames it: HMAC(key, [i]₃₂ || label || 0x00 || contextU || contextV || [bits]₃₂).
fn kdfa_sha256(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let want = (bits as usize).div_ceil(8);
    let mut out = Vec::with_capacity(want + 32);
    let mut counter: u32 = 1;
    while out.len() < want {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(want);
    out
}

fn tpm2b(data: &[u8]) -> Result<Vec<u8>, VerifyError> {
    let len = u16::try_from(data.len()).map_err(|_| VerifyError::Crypto("TPM2B too long"))?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(data);
    Ok(out)
}

/// Seals `credential` (at most 32 bytes) to the EK of `ek` for the object named by `ak`,
/// assuming the TCG default EK template (RSA 2048, SHA-256 names, AES-128-CFB).
pub fn make_credential(
    ek: &Endorsement,
    ak: &AttestationKey,
    credential: &[u8],
) -> Result<SealedCredential, VerifyError> {
    if credential.len() > 32 {
        return Err(VerifyError::Crypto(
            "credential longer than the name digest",
        ));
    }
    let rng = SystemRandom::new();
    let mut seed = [0u8; 32];
    rng.fill(&mut seed)
        .map_err(|_| VerifyError::Crypto("random seed"))?;

    // The seed, encrypted to the EK with OAEP and the label "IDENTITY" (NUL included).
    let ek_key = PublicEncryptingKey::from_der(&ek.spki_der)
        .map_err(|_| VerifyError::Crypto("EK public key unusable for OAEP"))?;
    let oaep = OaepPublicEncryptingKey::new(ek_key).map_err(|_| VerifyError::Crypto("OAEP key"))?;
    let mut ct = vec![0u8; oaep.ciphertext_size()];
    let encrypted_seed = oaep
        .encrypt(&OAEP_SHA256_MGF1SHA256, &seed, &mut ct, Some(b"IDENTITY\0"))
        .map_err(|_| VerifyError::Crypto("OAEP encryption"))?
        .to_vec();

    // Inner: the credential as a TPM2B_DIGEST, AES-128-CFB (zero IV) under the storage key.
    let sym_key = kdfa_sha256(&seed, "STORAGE", &ak.name, &[], 128);
    let key =
        UnboundCipherKey::new(&AES_128, &sym_key).map_err(|_| VerifyError::Crypto("AES key"))?;
    let cfb = EncryptingKey::cfb128(key).map_err(|_| VerifyError::Crypto("AES-CFB"))?;
    let mut enc_identity = tpm2b(credential)?;
    cfb.less_safe_encrypt(
        &mut enc_identity,
        EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
    )
    .map_err(|_| VerifyError::Crypto("AES-CFB encryption"))?;

    // Outer integrity: HMAC(KDFa(seed, "INTEGRITY"), encIdentity || name).
    let hmac_key = kdfa_sha256(&seed, "INTEGRITY", &[], &[], 256);
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    ctx.update(&enc_identity);
    ctx.update(&ak.name);
    let outer = ctx.sign();

    let mut credential_blob = tpm2b(outer.as_ref())?;
    credential_blob.extend_from_slice(&enc_identity);
    Ok(SealedCredential {
        credential_blob,
        encrypted_secret: encrypted_seed,
    })
}

#[cfg(test)]
mod tests {
    use super::kdfa_sha256;

    #[test]
    fn kdfa_truncates_to_the_requested_bits() {
        let a = kdfa_sha256(b"key", "STORAGE", b"name", &[], 128);
        let b = kdfa_sha256(b"key", "STORAGE", b"name", &[], 256);
        assert_eq!(a.len(), 16);
        assert_eq!(b.len(), 32);
        // The bit count is part of the input, so a shorter key is not a prefix of a longer.
        assert_ne!(a.as_slice(), b.get(..16).unwrap_or_default());
    }
}
