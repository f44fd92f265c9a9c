//! The attestation key: a TPM-resident, restricted signing key whose public area the server
//! checks before trusting anything it signs.
use sha2::{Digest, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{Public, PublicRsaParameters, RsaScheme};
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
    let public = parse_canonical_public(tpmt_public)
        .map_err(|m| VerifyError::AttestationKey(format!("public area {m}")))?;
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
    if let Some(attr) = first_unset(&required) {
        return Err(VerifyError::AttestationKey(format!(
            "attribute {attr} is not set"
        )));
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
    let exponent = rsa_exponent(parameters);

    let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(tpmt_public));
    Ok(AttestationKey {
        name,
        modulus,
        exponent,
    })
}

/// Parses a marshalled TPMT_PUBLIC of 1 to [`MAX_PUBLIC_LEN`] bytes. A TPM name is computed
/// over the bytes as sent, so anything the parser would read differently (trailing bytes,
/// non-canonical encodings) is refused. The error says what is wrong with the bytes.
pub(crate) fn parse_canonical_public(tpmt_public: &[u8]) -> Result<Public, String> {
    if tpmt_public.is_empty() || tpmt_public.len() > MAX_PUBLIC_LEN {
        return Err("size out of range".into());
    }
    let public = Public::unmarshall(tpmt_public).map_err(|e| format!("does not parse: {e}"))?;
    let again = public
        .marshall()
        .map_err(|e| format!("does not re-encode: {e}"))?;
    if again != tpmt_public {
        return Err("is not canonically encoded".into());
    }
    Ok(public)
}

/// The name of the first attribute in `required` that is not set.
pub(crate) fn first_unset<'a>(required: &[(bool, &'a str)]) -> Option<&'a str> {
    required.iter().find(|(set, _)| !set).map(|(_, name)| *name)
}

/// An RSA key's public exponent, big-endian without leading zeros (0 in the public area
/// means the default, 65537).
pub(crate) fn rsa_exponent(parameters: &PublicRsaParameters) -> Vec<u8> {
    let exponent = match parameters.exponent().value() {
        0 => 65537u32,
        e => e,
    }
    .to_be_bytes();
    let first = exponent.iter().position(|b| *b != 0).unwrap_or(3);
    exponent.get(first..).unwrap_or(&[1]).to_vec()
}
