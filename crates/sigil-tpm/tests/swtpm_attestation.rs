//! The server's verification against evidence from real software TPMs (swtpm): the
//! credential sealed in software is activated by the TPM, quotes verify, logs replay, and
//! every refusal the verifier promises happens.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod swtpm;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use sigil_tpm::{
    Challenge, EkRoots, EventLogBuilder, Evidence, PendingAttestation, TpmDevice, TpmPolicy,
    VerifyError, begin_attestation, finish_attestation, qualifying_data,
};
use swtpm::{SwTpm, TestCa};
use tss_esapi::abstraction::{KeyCustomization, ak, ek};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::traits::{Marshall, UnMarshall};

/// The node key the quotes bind (any bytes: the verifier hashes what it is given).
const CSR_KEY: &[u8] = b"node CSR SubjectPublicKeyInfo";

struct Fixture {
    _tmp: tempfile::TempDir,
    trusted: TestCa,
    untrusted: TestCa,
    /// TPM states: two from the trusted CA, one from the untrusted.
    tpm_a: PathBuf,
    tpm_b: PathBuf,
    tpm_untrusted: PathBuf,
}

/// Manufacturing takes seconds: done once, each test serves a copy of the state.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let trusted = TestCa::new(&tmp.path().join("trusted-ca"));
        let untrusted = TestCa::new(&tmp.path().join("untrusted-ca"));
        let tpm_a = tmp.path().join("tpm-a");
        let tpm_b = tmp.path().join("tpm-b");
        let tpm_untrusted = tmp.path().join("tpm-untrusted");
        trusted.manufacture(&tpm_a);
        trusted.manufacture(&tpm_b);
        untrusted.manufacture(&tpm_untrusted);
        Fixture {
            _tmp: tmp,
            trusted,
            untrusted,
            tpm_a,
            tpm_b,
            tpm_untrusted,
        }
    })
}

/// A running copy of the TPM state in `state`.
fn serve(state: &Path) -> (tempfile::TempDir, SwTpm) {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(state).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let tpm = SwTpm::start(dir.path());
    (dir, tpm)
}

fn policy() -> TpmPolicy {
    TpmPolicy::new(EkRoots::from_pem(&fixture().trusted.roots_pem()).unwrap())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Measures a small boot into the TPM (firmware, Secure Boot state, separators) and
/// returns its event log.
fn boot(dev: &mut TpmDevice, secure_boot: bool) -> Vec<u8> {
    let mut log = EventLogBuilder::new();
    let d = log.event(0, 0x0000_0008, b"sigil test firmware 1.0");
    dev.extend_pcr(0, d).unwrap();
    let d = log.secure_boot(secure_boot);
    dev.extend_pcr(7, d).unwrap();
    for pcr in [0u8, 7] {
        let d = log.separator(u32::from(pcr));
        dev.extend_pcr(pcr, d).unwrap();
    }
    let d = log.event(4, 0x8000_0003, b"bootloader image");
    dev.extend_pcr(4, d).unwrap();
    log.finish()
}

/// What a device sends back: the activated credential and a quote bound to `csr_key`.
struct Answer {
    credential: Vec<u8>,
    attest: Vec<u8>,
    signature: Vec<u8>,
}

fn answer(dev: &mut TpmDevice, ch: &Challenge, csr_key: &[u8]) -> Answer {
    let credential = dev
        .activate_credential(&ch.sealed.credential_blob, &ch.sealed.encrypted_secret)
        .unwrap();
    let (attest, signature) = dev
        .quote(&qualifying_data(&ch.nonce, csr_key), &ch.pcrs)
        .unwrap();
    Answer {
        credential,
        attest,
        signature,
    }
}

fn finish(
    policy: &TpmPolicy,
    pending: &PendingAttestation,
    a: &Answer,
    log: &[u8],
    csr_key: &[u8],
) -> Result<sigil_tpm::AttestedNode, VerifyError> {
    finish_attestation(
        policy,
        pending,
        &Evidence {
            activated_credential: &a.credential,
            attest: &a.attest,
            signature: &a.signature,
            event_log: log,
        },
        csr_key,
        now(),
    )
}

/// A device on `state`, booted, with its challenge.
fn challenged(
    policy: &TpmPolicy,
    state: &Path,
    secure_boot: bool,
) -> (
    tempfile::TempDir,
    SwTpm,
    TpmDevice,
    Vec<u8>,
    Challenge,
    PendingAttestation,
) {
    let (dir, tpm) = serve(state);
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    let log = boot(&mut dev, secure_boot);
    let ek = dev.ek_certificate().unwrap();
    let (ch, pending) = begin_attestation(policy, &ek, dev.ak_public(), now()).unwrap();
    (dir, tpm, dev, log, ch, pending)
}

#[test]
fn a_tpm_with_an_ek_certificate_from_the_trusted_ca_attests() {
    let policy = TpmPolicy {
        require_secure_boot: true,
        ..policy()
    };
    let (_d, _t, mut dev, log, ch, pending) = challenged(&policy, &fixture().tpm_a, true);
    // The credential sealed in software is recovered by the TPM's ActivateCredential.
    let a = answer(&mut dev, &ch, CSR_KEY);
    let node = finish(&policy, &pending, &a, &log, CSR_KEY).unwrap();
    assert!(node.secure_boot);
    assert_eq!(node.ek_hash.len(), 64);
    assert!(
        node.selectors
            .contains(&format!("tpm:ek_hash:{}", node.ek_hash))
    );
    assert!(node.selectors.contains(&"tpm:secureboot:true".to_owned()));
    assert!(node.selectors.iter().any(|s| s.starts_with("tpm:pcr:7:")));
}

#[test]
fn the_ek_hash_is_stable_across_attestation_keys_and_differs_between_tpms() {
    let p = policy();
    let (_d, tpm_a, dev, _log, _ch, first) = challenged(&p, &fixture().tpm_a, true);
    drop(dev);
    // A second open makes a new AK (an agent reinstall); the EK is the same.
    let mut again = TpmDevice::open(&tpm_a.tcti()).unwrap();
    let ek = again.ek_certificate().unwrap();
    let (_, second) = begin_attestation(&p, &ek, again.ak_public(), now()).unwrap();
    assert_eq!(first.ek_hash(), second.ek_hash());
    let (_d2, _t2, _dev2, _log2, _ch2, other) = challenged(&p, &fixture().tpm_b, true);
    assert_ne!(first.ek_hash(), other.ek_hash());
}

#[test]
fn an_ek_certificate_from_an_untrusted_ca_is_refused() {
    let (_d, tpm) = serve(&fixture().tpm_untrusted);
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    let ek = dev.ek_certificate().unwrap();
    let r = begin_attestation(&policy(), &ek, dev.ak_public(), now());
    assert!(matches!(r, Err(VerifyError::EkCertificate(_))), "{r:?}");
    // The same certificate passes when its CA is the one trusted.
    let theirs = TpmPolicy::new(EkRoots::from_pem(&fixture().untrusted.roots_pem()).unwrap());
    assert!(begin_attestation(&theirs, &ek, dev.ak_public(), now()).is_ok());
}

/// An attestation key created by the TPM with some attributes cleared.
struct Weakened {
    restricted: bool,
    fixed: bool,
}

impl KeyCustomization for Weakened {
    fn attributes(&self, b: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
        b.with_restricted(self.restricted)
            .with_fixed_tpm(self.fixed)
            .with_fixed_parent(self.fixed)
    }
}

fn weakened_ak(tcti: &str, w: Weakened) -> Vec<u8> {
    let conf = tss_esapi::TctiNameConf::from_str(tcti).unwrap();
    let mut ctx = tss_esapi::Context::new(conf).unwrap();
    let ek = ek::create_ek_object_2(
        &mut ctx,
        tss_esapi::abstraction::AsymmetricAlgorithmSelection::Rsa(
            tss_esapi::interface_types::key_bits::RsaKeyBits::Rsa2048,
        ),
        None,
    )
    .unwrap();
    let created = ak::create_ak(
        &mut ctx,
        ek,
        HashingAlgorithm::Sha256,
        SignatureSchemeAlgorithm::RsaSsa,
        None,
        w,
    )
    .unwrap();
    ctx.flush_context(ek.into()).unwrap();
    created.out_public.marshall().unwrap()
}

#[test]
fn an_ak_without_restricted_or_fixed_tpm_is_refused() {
    let (_d, tpm) = serve(&fixture().tpm_a);
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    let ek = dev.ek_certificate().unwrap();
    drop(dev);
    for (w, attr) in [
        (
            Weakened {
                restricted: false,
                fixed: true,
            },
            "restricted",
        ),
        (
            Weakened {
                restricted: true,
                fixed: false,
            },
            "fixedTPM",
        ),
    ] {
        let public = weakened_ak(&tpm.tcti(), w);
        let r = begin_attestation(&policy(), &ek, &public, now());
        match r {
            Err(VerifyError::AttestationKey(m)) => assert!(m.contains(attr), "{m}"),
            other => panic!("expected an AK refusal for {attr}, got {other:?}"),
        }
    }
}

#[test]
fn an_ak_from_a_second_tpm_fails_credential_activation() {
    let p = policy();
    let (_da, tpm_a) = serve(&fixture().tpm_a);
    let mut dev_a = TpmDevice::open(&tpm_a.tcti()).unwrap();
    let log = boot(&mut dev_a, true);
    let ek_a = dev_a.ek_certificate().unwrap();
    let (_db, tpm_b) = serve(&fixture().tpm_b);
    let mut dev_b = TpmDevice::open(&tpm_b.tcti()).unwrap();
    // EK of TPM A (a genuine certificate), AK of TPM B.
    let (ch, pending) = begin_attestation(&p, &ek_a, dev_b.ak_public(), now()).unwrap();
    // TPM B cannot open a credential sealed to TPM A's EK...
    assert!(
        dev_b
            .activate_credential(&ch.sealed.credential_blob, &ch.sealed.encrypted_secret)
            .is_err()
    );
    // ...nor can TPM A, which does not hold the AK the credential names.
    assert!(
        dev_a
            .activate_credential(&ch.sealed.credential_blob, &ch.sealed.encrypted_secret)
            .is_err()
    );
    // So whatever B answers, with a quote that verifies, is refused.
    let (attest, signature) = dev_b
        .quote(&qualifying_data(&ch.nonce, CSR_KEY), &ch.pcrs)
        .unwrap();
    let a = Answer {
        credential: vec![0u8; 32],
        attest,
        signature,
    };
    let r = finish(&p, &pending, &a, &log, CSR_KEY);
    assert!(matches!(r, Err(VerifyError::CredentialActivation)), "{r:?}");
}

#[test]
fn a_quote_replayed_with_an_old_nonce_is_refused() {
    let p = policy();
    let (_d, _t, mut dev, log, ch1, pending1) = challenged(&p, &fixture().tpm_a, true);
    let first = answer(&mut dev, &ch1, CSR_KEY);
    assert!(finish(&p, &pending1, &first, &log, CSR_KEY).is_ok());
    // A new challenge, answered with a fresh activation but the old quote.
    let ek = dev.ek_certificate().unwrap();
    let (ch2, pending2) = begin_attestation(&p, &ek, dev.ak_public(), now()).unwrap();
    let second = answer(&mut dev, &ch2, CSR_KEY);
    let replayed = Answer {
        credential: second.credential,
        attest: first.attest,
        signature: first.signature,
    };
    let r = finish(&p, &pending2, &replayed, &log, CSR_KEY);
    assert!(matches!(r, Err(VerifyError::QualifyingData)), "{r:?}");
}

#[test]
fn a_quote_binding_another_csr_key_is_refused() {
    let p = policy();
    let (_d, _t, mut dev, log, ch, pending) = challenged(&p, &fixture().tpm_a, true);
    let a = answer(&mut dev, &ch, b"another node key");
    let r = finish(&p, &pending, &a, &log, CSR_KEY);
    assert!(matches!(r, Err(VerifyError::QualifyingData)), "{r:?}");
}

#[test]
fn an_event_log_that_does_not_replay_to_the_quoted_pcrs_is_refused() {
    let p = policy();
    let (_d, _t, mut dev, _log, ch, pending) = challenged(&p, &fixture().tpm_a, true);
    let a = answer(&mut dev, &ch, CSR_KEY);
    // A log claiming a different boot than the one measured.
    let mut other = EventLogBuilder::new();
    other.event(0, 0x0000_0008, b"sigil test firmware 1.0");
    other.secure_boot(true);
    other.separator(0);
    other.separator(7);
    other.event(4, 0x8000_0003, b"another bootloader");
    let r = finish(&p, &pending, &a, &other.finish(), CSR_KEY);
    assert!(matches!(r, Err(VerifyError::EventLog(_))), "{r:?}");
}

#[test]
fn secure_boot_disabled_is_refused_where_policy_requires_it() {
    let p = TpmPolicy {
        require_secure_boot: true,
        ..policy()
    };
    let (_d, _t, mut dev, log, ch, pending) = challenged(&p, &fixture().tpm_a, false);
    let a = answer(&mut dev, &ch, CSR_KEY);
    let r = finish(&p, &pending, &a, &log, CSR_KEY);
    assert!(matches!(r, Err(VerifyError::BootPolicy(_))), "{r:?}");
    // Without the requirement the node attests, and says so in its selectors.
    let node = finish(&policy(), &pending, &a, &log, CSR_KEY).unwrap();
    assert!(node.selectors.contains(&"tpm:secureboot:false".to_owned()));
}

#[test]
fn extending_pcr_7_after_boot_breaks_the_replay() {
    let p = policy();
    let (_d, _t, mut dev, log, ch, pending) = challenged(&p, &fixture().tpm_a, true);
    dev.extend_pcr(7, [0x42; 32]).unwrap();
    let a = answer(&mut dev, &ch, CSR_KEY);
    let r = finish(&p, &pending, &a, &log, CSR_KEY);
    assert!(matches!(r, Err(VerifyError::EventLog(_))), "{r:?}");
}

#[test]
fn a_pcr_other_than_its_golden_value_is_refused() {
    let mut p = policy();
    p.golden_pcrs.insert(4, [0u8; 32]);
    let (_d, _t, mut dev, log, ch, pending) = challenged(&p, &fixture().tpm_a, true);
    let a = answer(&mut dev, &ch, CSR_KEY);
    let r = finish(&p, &pending, &a, &log, CSR_KEY);
    assert!(matches!(r, Err(VerifyError::BootPolicy(_))), "{r:?}");
}

#[test]
fn an_expired_challenge_is_refused() {
    let p = policy();
    let (_d, _t, mut dev, log, ch, pending) = challenged(&p, &fixture().tpm_a, true);
    let a = answer(&mut dev, &ch, CSR_KEY);
    let late = now() + p.challenge_ttl_secs + 1;
    let r = finish_attestation(
        &p,
        &pending,
        &Evidence {
            activated_credential: &a.credential,
            attest: &a.attest,
            signature: &a.signature,
            event_log: &log,
        },
        CSR_KEY,
        late,
    );
    assert!(matches!(r, Err(VerifyError::ChallengeExpired)), "{r:?}");
}

#[test]
fn a_quote_with_a_broken_signature_is_refused() {
    let p = policy();
    let (_d, _t, mut dev, log, ch, pending) = challenged(&p, &fixture().tpm_a, true);
    let mut a = answer(&mut dev, &ch, CSR_KEY);
    if let Some(b) = a.attest.last_mut() {
        *b ^= 1;
    }
    let r = finish(&p, &pending, &a, &log, CSR_KEY);
    assert!(matches!(r, Err(VerifyError::Quote(_))), "{r:?}");
}

#[test]
fn a_pinned_ek_without_a_certificate_attests_as_the_same_node_and_an_unpinned_one_is_refused() {
    let (_d, tpm) = serve(&fixture().tpm_a);
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    let log = boot(&mut dev, true);
    let ek_public = dev.ek_public().unwrap();
    let from_public = sigil_tpm::ek_public_endorsement(&ek_public).unwrap();
    // The same device identity as its EK certificate gives.
    let cert = dev.ek_certificate().unwrap();
    let from_cert = sigil_tpm::verify_ek_certificate(&cert, &policy().roots, now()).unwrap();
    assert_eq!(from_public.ek_hash, from_cert.ek_hash);

    let unpinned = TpmPolicy {
        roots: EkRoots::none(),
        ..policy()
    };
    let err = sigil_tpm::begin_attestation_pinned(&unpinned, &ek_public, dev.ak_public(), now())
        .unwrap_err();
    assert!(err.to_string().contains("is not pinned"), "{err}");
    // With no manufacturer trusted, the certificate is refused too.
    assert!(matches!(
        begin_attestation(&unpinned, &cert, dev.ak_public(), now()),
        Err(VerifyError::EkCertificate(_))
    ));

    let mut pinned = unpinned.clone();
    pinned.ek_hashes.insert(from_public.ek_hash.clone());
    let (ch, pending) =
        sigil_tpm::begin_attestation_pinned(&pinned, &ek_public, dev.ak_public(), now()).unwrap();
    let a = answer(&mut dev, &ch, CSR_KEY);
    let node = finish(&pinned, &pending, &a, &log, CSR_KEY).unwrap();
    assert_eq!(node.ek_hash, from_public.ek_hash);

    // Another TPM's EK is not pinned.
    let (_d2, other) = serve(&fixture().tpm_b);
    let mut other = TpmDevice::open(&other.tcti()).unwrap();
    let err = sigil_tpm::begin_attestation_pinned(
        &pinned,
        &other.ek_public().unwrap(),
        other.ak_public(),
        now(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("is not pinned"), "{err}");
}

#[test]
fn an_ek_public_area_that_is_not_a_default_ek_is_refused() {
    let (_d, tpm) = serve(&fixture().tpm_a);
    let mut dev = TpmDevice::open(&tpm.tcti()).unwrap();
    let ek_public = dev.ek_public().unwrap();
    // The AK (a signing key) is not an EK, whatever its hash.
    let err = sigil_tpm::ek_public_endorsement(dev.ak_public()).unwrap_err();
    assert!(
        err.to_string().contains("attribute decrypt is not set"),
        "{err}"
    );
    // Trailing bytes, truncation, garbage.
    let mut long = ek_public.clone();
    long.push(0);
    for bad in [
        long,
        ek_public[..ek_public.len() - 1].to_vec(),
        b"garbage".to_vec(),
        Vec::new(),
    ] {
        assert!(sigil_tpm::ek_public_endorsement(&bad).is_err());
    }
    // The EK template with its policy cleared (anyone could use the key).
    let public = tss_esapi::structures::Public::unmarshall(&ek_public).unwrap();
    let tss_esapi::structures::Public::Rsa {
        object_attributes,
        name_hashing_algorithm,
        parameters,
        unique,
        ..
    } = public
    else {
        panic!("not RSA");
    };
    let no_policy = tss_esapi::structures::Public::Rsa {
        object_attributes,
        name_hashing_algorithm,
        auth_policy: Default::default(),
        parameters,
        unique,
    };
    let err = sigil_tpm::ek_public_endorsement(&no_policy.marshall().unwrap()).unwrap_err();
    assert!(err.to_string().contains("auth policy"), "{err}");
}
