//! The attestation key: a TPM-resident, restricted signing key whose public area the server
//! checks before trusting anything it signs.
use sha2::{Digest, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{Public, RsaScheme};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::error::VerifyError;

/// The largest marshalled TPMT_PUBLIC accepted.
pub const MAX_PUBLIC_LEN: usize = 1024;

/// TPM_ALG_SHA256, the name algorithm this verifier accepts.
const TPM_ALG_SHA256: u16 = 0x000B;

/// A checked attestation key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationKey {
    /// The TPM name of the key: nameAlg (big-endian u16) || SHA-256(TPMT_PUBLIC).
    pub(crate) name: Vec<u8>,
    /// RSA modulus, big-endian.
    pub(crate) modulus: Vec<u8>,
    /// RSA public exponent, big-endian.
    pub(crate) exponent: Vec<u8>,
}

/// Parses a marshalled TPMT_PUBLIC and checks it is an attestation key the way the
/// verifier needs: RSA with RSASSA-SHA256, SHA-256 names, and the attributes that make it a
/// TPM-bound signing key for TPM-generated data only — `restricted`, `sign`, `fixedTPM`,
/// `fixedParent`, `sensitiveDataOrigin`, not `decrypt`.
pub fn check_ak_public(tpmt_public: &[u8]) -> Result<AttestationKey, VerifyError> {
    let bad = |m: &str| VerifyError::AttestationKey(m.to_owned());
    if tpmt_public.is_empty() || tpmt_public.len() > MAX_PUBLIC_LEN {
        return Err(bad("public area size out of range"));
    }
    let public = Public::unmarshall(tpmt_public)
        .map_err(|e| VerifyError::AttestationKey(format!("does not parse: {e}")))?;
    // The name is computed over the bytes as sent; refuse anything the parser would have
    // read differently (trailing bytes, non-canonical encodings).
    let again = public
        .marshall()
        .map_err(|e| VerifyError::AttestationKey(format!("does not re-encode: {e}")))?;
    if again != tpmt_public {
        return Err(bad("public area is not canonically encoded"));
    }
    let Public::Rsa {
        object_attributes: attrs,
        name_hashing_algorithm,
        parameters,
        unique,
        ..
    } = &public
    else {
        return Err(bad("not an RSA key"));
    };
    let required = [
        (attrs.restricted(), "restricted"),
        (attrs.sign_encrypt(), "sign"),
        (attrs.fixed_tpm(), "fixedTPM"),
        (attrs.fixed_parent(), "fixedParent"),
        (attrs.sensitive_data_origin(), "sensitiveDataOrigin"),
    ];
    for (set, attr) in required {
        if !set {
            return Err(VerifyError::AttestationKey(format!(
                "attribute {attr} is not set"
            )));
        }
    }
    if attrs.decrypt() {
        return Err(bad("attribute decrypt is set"));
    }
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        return Err(bad("name algorithm is not SHA-256"));
    }
    match parameters.rsa_scheme() {
        RsaScheme::RsaSsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
        _ => return Err(bad("scheme is not RSASSA-SHA256")),
    }
    let modulus = unique.value().to_vec();
    if modulus.len() < 256 {
        return Err(bad("RSA key shorter than 2048 bits"));
    }
    let exponent = match parameters.exponent().value() {
        0 => 65537u32,
        e => e,
    };
    let exponent = exponent.to_be_bytes();
    let first = exponent.iter().position(|b| *b != 0).unwrap_or(3);
    let exponent = exponent.get(first..).unwrap_or(&[1]).to_vec();

    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(tpmt_public));
    Ok(AttestationKey {
        name,
        modulus,
        exponent,
    })
}
