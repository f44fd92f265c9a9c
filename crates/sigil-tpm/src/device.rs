//! The device side: the node's TPM, through the TSS Enhanced System API (libtss2). The same
//! code drives a hardware TPM (`device:/dev/tpmrm0`) and a software one (`swtpm:port=…`).
use std::str::FromStr;

use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot,
    SignatureScheme, SymmetricDefinition,
};
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, TctiNameConf};

use crate::error::DeviceError;

/// The TCTI of a Linux TPM through the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// Where Linux exposes the firmware's TCG event log.
pub const DEFAULT_EVENT_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";

/// The node's TPM, with its EK and a fresh attestation key loaded.
pub struct TpmDevice {
    ctx: Context,
    ek: KeyHandle,
    ak: KeyHandle,
    ak_public: Vec<u8>,
}

impl std::fmt::Debug for TpmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmDevice").finish_non_exhaustive()
    }
}

fn ek_alg() -> AsymmetricAlgorithmSelection {
    AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048)
}

impl TpmDevice {
    /// Opens the TPM at `tcti`, creates the EK from the TCG default template (RSA 2048) and
    /// an attestation key under it: restricted RSASSA-SHA256 signing, `fixedTPM`,
    /// `fixedParent`, `sensitiveDataOrigin`.
    pub fn open(tcti: &str) -> Result<Self, DeviceError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| DeviceError::Tcti {
            tcti: tcti.to_owned(),
            reason: e.to_string(),
        })?;
        let mut ctx = Context::new(conf).map_err(DeviceError::tpm("connect"))?;
        let ek = ek::create_ek_object_2(&mut ctx, ek_alg(), None)
            .map_err(DeviceError::tpm("create EK"))?;
        let created = ak::create_ak(
            &mut ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::RsaSsa,
            None,
            None,
        )
        .map_err(DeviceError::tpm("create AK"))?;
        let ak_public = created
            .out_public
            .marshall()
            .map_err(DeviceError::tpm("encode AK public"))?;
        let ak = ak::load_ak(&mut ctx, ek, None, created.out_private, created.out_public)
            .map_err(DeviceError::tpm("load AK"))?;
        Ok(Self {
            ctx,
            ek,
            ak,
            ak_public,
        })
    }

    /// The EK certificate from NV (RSA 2048 index), DER.
    pub fn ek_certificate(&mut self) -> Result<Vec<u8>, DeviceError> {
        let der = ek::retrieve_ek_pubcert(&mut self.ctx, ek_alg())
            .map_err(|_| DeviceError::NoEkCertificate)?;
        // NV areas are often larger than the certificate: keep the DER SEQUENCE only.
        Ok(trim_der(der))
    }

    /// The EK's public area (TPMT_PUBLIC, marshalled): what a TPM without an EK certificate
    /// sends, and what `sigil tpm ek-hash` hashes for an administrator to pin.
    pub fn ek_public(&mut self) -> Result<Vec<u8>, DeviceError> {
        let (public, _, _) = self
            .ctx
            .read_public(self.ek)
            .map_err(DeviceError::tpm("read EK public"))?;
        public
            .marshall()
            .map_err(DeviceError::tpm("encode EK public"))
    }

    /// The attestation key's public area (TPMT_PUBLIC, marshalled).
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// TPM2_ActivateCredential: recovers the credential sealed to this TPM's EK for the AK.
    pub fn activate_credential(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, DeviceError> {
        let blob = IdObject::try_from(credential_blob.to_vec())
            .map_err(DeviceError::tpm("read credential blob"))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
            .map_err(DeviceError::tpm("read encrypted secret"))?;
        // The EK's auth policy is PolicySecret(endorsement hierarchy).
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(DeviceError::tpm("start policy session"))?
            .ok_or(DeviceError::Tpm {
                op: "start policy session",
                source: tss_esapi::Error::WrapperError(
                    tss_esapi::WrapperErrorKind::WrongValueFromTpm,
                ),
            })?;
        let (attrs, mask) = SessionAttributesBuilder::new().build();
        let result = (|| {
            self.ctx
                .tr_sess_set_attributes(session, attrs, mask)
                .map_err(DeviceError::tpm("session attributes"))?;
            let policy =
                PolicySession::try_from(session).map_err(DeviceError::tpm("policy session"))?;
            self.ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(DeviceError::tpm("policy secret"))?;
            let (ak, ek) = (self.ak, self.ek);
            self.ctx
                .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                    ctx.activate_credential(ak, ek, blob, secret)
                })
                .map_err(DeviceError::tpm("activate credential"))
        })();
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        Ok(result?.value().to_vec())
    }

    /// TPM2_Quote over the SHA-256 bank's `pcrs`, with `qualifying_data`: returns the
    /// marshalled TPMS_ATTEST and TPMT_SIGNATURE.
    pub fn quote(
        &mut self,
        qualifying_data: &[u8],
        pcrs: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), DeviceError> {
        let slots = pcrs
            .iter()
            .map(|p| {
                1u32.checked_shl(u32::from(*p))
                    .ok_or(tss_esapi::Error::WrapperError(
                        tss_esapi::WrapperErrorKind::InvalidParam,
                    ))
                    .and_then(PcrSlot::try_from)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(DeviceError::tpm("PCR selection"))?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(DeviceError::tpm("PCR selection"))?;
        let qd = Data::try_from(qualifying_data.to_vec())
            .map_err(DeviceError::tpm("qualifying data"))?;
        let ak = self.ak;
        let (attest, signature) = self
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.quote(ak, qd, SignatureScheme::Null, selection)
            })
            .map_err(DeviceError::tpm("quote"))?;
        let attest = attest
            .marshall()
            .map_err(DeviceError::tpm("encode quote"))?;
        let signature = signature
            .marshall()
            .map_err(DeviceError::tpm("encode signature"))?;
        Ok((attest, signature))
    }

    /// TPM2_PCR_Extend of the SHA-256 bank of `pcr` with `digest` (used with a synthesized
    /// event log, and by tests to change the boot state).
    pub fn extend_pcr(&mut self, pcr: u8, digest: [u8; 32]) -> Result<(), DeviceError> {
        let handle = PcrHandle::try_from(u32::from(pcr)).map_err(DeviceError::tpm("PCR handle"))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(DeviceError::tpm("digest"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(handle, values)
            })
            .map_err(DeviceError::tpm("PCR extend"))
    }
}

impl Drop for TpmDevice {
    fn drop(&mut self) {
        // Without a resource manager (swtpm, or /dev/tpm0) transient objects outlive the
        // connection and the TPM has few slots: give them back.
        let _ = self.ctx.flush_context(self.ak.into());
        let _ = self.ctx.flush_context(self.ek.into());
    }
}

/// The DER SEQUENCE at the start of `bytes` (an NV area padded past the certificate).
fn trim_der(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = match (bytes.first(), bytes.get(1)) {
        (Some(0x30), Some(&l)) if l < 0x80 => Some(2 + usize::from(l)),
        (Some(0x30), Some(&l)) if (0x81..=0x84).contains(&l) => {
            let n = usize::from(l - 0x80);
            bytes
                .get(2..2 + n)
                .map(|b| 2 + n + b.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x)))
        }
        _ => None,
    };
    if let Some(len) = len
        && len <= bytes.len()
    {
        bytes.truncate(len);
    }
    bytes
}

/// Reads the event log at `path`.
pub fn read_event_log(path: &str) -> Result<Vec<u8>, DeviceError> {
    std::fs::read(path).map_err(|source| DeviceError::EventLog {
        path: path.to_owned(),
        source,
    })
}
