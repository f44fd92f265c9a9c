//! Benchmarks of the hot paths: X.509-SVID signing, CSR parsing, JWT minting and validation,
//! and X.509-SVID verification.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sigil_core::TrustDomain;
use sigil_pki::{
    AccessTokenClaims, CertificateAuthority, Confirmation, JwtAlgorithm, JwtKeySet, JwtSigner,
    KeyAlgorithm, KeyPair, SvidSpec, X509Bundle, parse_csr, validate_access_token,
    verify_x509_svid, x5t_s256,
};

const NOW: i64 = 1_700_000_000;

fn bench(c: &mut Criterion) {
    let td = TrustDomain::new("example.org").unwrap();
    let ca = CertificateAuthority::generate(&td, KeyAlgorithm::EcdsaP256, NOW, 86_400).unwrap();
    let kp = KeyPair::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let id = td.id("/ns/prod/sa/api").unwrap();
    let csr_der = kp.csr_der(Some(&id)).unwrap();
    let csr = parse_csr(&csr_der).unwrap();
    let spec = SvidSpec {
        spiffe_id: id.clone(),
        dns_names: vec!["api.example.org".into()],
        ttl_secs: 3600,
    };

    c.bench_function("x509_svid_sign_p256", |b| {
        b.iter(|| {
            ca.sign_x509_svid(black_box(&csr), black_box(&spec), NOW)
                .unwrap()
        })
    });

    c.bench_function("csr_parse_verify_p256", |b| {
        b.iter(|| parse_csr(black_box(&csr_der)).unwrap())
    });

    let signer = JwtSigner::generate(JwtAlgorithm::Es256).unwrap();
    let aud = vec!["https://api.example.org".to_owned()];
    c.bench_function("jwt_svid_mint_es256", |b| {
        b.iter(|| {
            signer
                .mint_jwt_svid(black_box(&id), &aud, 300, NOW)
                .unwrap()
        })
    });

    let svid = ca.sign_x509_svid(&csr, &spec, NOW).unwrap();
    let keys = JwtKeySet::from_jwks(&[signer.public_jwk()]).unwrap();
    let claims = AccessTokenClaims {
        groups: vec![],
        iss: "https://sigil.example.org".into(),
        sub: id.to_string(),
        aud: aud.clone(),
        client_id: "client-1".into(),
        scope: "read write".into(),
        jti: "jti-1".into(),
        iat: NOW,
        nbf: None,
        exp: NOW + 300,
        cnf: Confirmation {
            x5t_s256: x5t_s256(&svid.der),
            jkt: None,
        },
        ..Default::default()
    };
    let token = signer.mint_access_token(&claims).unwrap();
    c.bench_function("access_token_validate_es256", |b| {
        b.iter(|| {
            validate_access_token(
                black_box(&token),
                &keys,
                "https://sigil.example.org",
                "https://api.example.org",
                NOW,
                0,
            )
            .unwrap()
        })
    });

    let bundle = X509Bundle {
        trust_domain: td.clone(),
        authorities: vec![ca.cert_der().to_vec()],
    };
    c.bench_function("x509_svid_verify_p256", |b| {
        b.iter(|| verify_x509_svid(&[black_box(svid.der.as_slice())], &bundle, NOW).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
