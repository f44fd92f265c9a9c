//! The quote: the TPM's signed statement of its PCR values, bound to the server's nonce and
//! the node's CSR key through the qualifying data.
use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use sha2::{Digest, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::structure_tags::AttestationType;
use tss_esapi::structures::{Attest, AttestInfo, Signature};
use tss_esapi::traits::UnMarshall;

use crate::ak::AttestationKey;
use crate::error::VerifyError;

/// The largest marshalled TPMS_ATTEST or TPMT_SIGNATURE accepted.
pub const MAX_QUOTE_LEN: usize = 2048;

/// The qualifying data a quote must carry: SHA-256(nonce || SHA-256(CSR public key DER)),
/// so one quote answers one challenge for one node key.
pub fn qualifying_data(nonce: &[u8], csr_public_key_der: &[u8]) -> [u8; 32] {
    let key_hash = Sha256::digest(csr_public_key_der);
    let mut h = Sha256::new();
    h.update(nonce);
    h.update(key_hash);
    h.finalize().into()
}

/// The PCR digest a verified quote attests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotedPcrs {
    /// SHA-256 over the selected SHA-256 PCR values, in index order.
    pub(crate) digest: Vec<u8>,
}

/// Verifies a quote: the signature (RSASSA-SHA256 by `ak`) over the TPMS_ATTEST bytes as
/// sent, then that it is a TPM-generated quote whose qualifying data is `expected_qd` and
/// whose selection is exactly the SHA-256 bank's `pcrs`.
pub fn verify_quote(
    ak: &AttestationKey,
    attest: &[u8],
    signature: &[u8],
    expected_qd: &[u8],
    pcrs: &[u8],
) -> Result<QuotedPcrs, VerifyError> {
    let bad = |m: &str| VerifyError::Quote(m.to_owned());
    if attest.is_empty() || attest.len() > MAX_QUOTE_LEN {
        return Err(bad("attestation size out of range"));
    }
    if signature.is_empty() || signature.len() > MAX_QUOTE_LEN {
        return Err(bad("signature size out of range"));
    }
    let sig = Signature::unmarshall(signature)
        .map_err(|e| VerifyError::Quote(format!("signature does not parse: {e}")))?;
    let Signature::RsaSsa(sig) = sig else {
        return Err(bad("signature is not RSASSA"));
    };
    if sig.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err(bad("signature hash is not SHA-256"));
    }
    RsaPublicKeyComponents {
        n: ak.modulus.as_slice(),
        e: ak.exponent.as_slice(),
    }
    .verify(&RSA_PKCS1_2048_8192_SHA256, attest, sig.signature().value())
    .map_err(|_| bad("signature does not verify with the attestation key"))?;

    // Signed by the AK, so the TPM produced these bytes; the magic check in the parser
    // says they are TPM-generated (not a digest the TPM was asked to sign).
    let parsed = Attest::unmarshall(attest)
        .map_err(|e| VerifyError::Quote(format!("attestation does not parse: {e}")))?;
    if parsed.attestation_type() != AttestationType::Quote {
        return Err(bad("attestation is not a quote"));
    }
    if parsed.extra_data().value() != expected_qd {
        return Err(VerifyError::QualifyingData);
    }
    let AttestInfo::Quote { info } = parsed.attested() else {
        return Err(bad("attestation is not a quote"));
    };
    let selections = info.pcr_selection().get_selections();
    let [selection] = selections else {
        return Err(bad("quote must select exactly one PCR bank"));
    };
    if selection.hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err(bad("quote does not select the SHA-256 bank"));
    }
    let mut selected: Vec<u8> = selection
        .selected()
        .into_iter()
        .filter_map(|slot| u8::try_from(u32::from(slot).trailing_zeros()).ok())
        .collect();
    selected.sort_unstable();
    let mut want = pcrs.to_vec();
    want.sort_unstable();
    want.dedup();
    if selected != want {
        return Err(VerifyError::Quote(format!(
            "quote covers PCRs {selected:?}, not {want:?}"
        )));
    }
    Ok(QuotedPcrs {
        digest: info.pcr_digest().value().to_vec(),
    })
}
