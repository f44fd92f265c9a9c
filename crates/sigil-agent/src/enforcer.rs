//! sigil's Enforcer API (`sigil.agent.v1.Enforcer`), on the Workload API socket: what a local
//! enforcer (the `sigil proxy` sidecar) learns from this agent — the signed policy bundles it
//! enforces and the revocation list, so it can refuse revoked X.509-SVIDs.
//!
//! Access follows the Workload API (the `workload.spiffe.io: true` header, and a caller
//! attested by its peer credentials), and is narrower: at least one registration entry of
//! this node that matches the caller must mark it as an enforcer (`enforcer: true`, set with
//! `sigil entry create --enforcer`). Other workloads get PermissionDenied, and an open stream
//! ends the same way once no matching entry is marked any more.
use std::sync::Arc;

use sigil_core::Selector;
use sigil_proto::enforcer as ep;
use tonic::{Request, Response, Status};

use crate::identity::{Identities, Snapshot};
use crate::peer::WorkloadAttestor;
use crate::workload_api::{
    ResponseStream, attest_caller, bundle_stream, matching, no_entry, serving,
};

/// The Enforcer service.
pub struct EnforcerApi {
    identities: Arc<Identities>,
    attestor: Arc<WorkloadAttestor>,
}

impl EnforcerApi {
    pub fn new(identities: Arc<Identities>, attestor: Arc<WorkloadAttestor>) -> Self {
        Self {
            identities,
            attestor,
        }
    }

    /// The stream every Enforcer call is: `render(snapshot)` now and on every change, for a
    /// caller that an enforcer entry of this node matches. It ends (PermissionDenied) once the
    /// node loses its identity or no matching entry marks the caller as an enforcer any more.
    async fn watch<R, T, F>(&self, req: &Request<R>, render: F) -> Result<ResponseStream<T>, Status>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&Snapshot) -> Option<T> + Send + 'static,
    {
        let selectors = attest_caller(&self.attestor, req).await?;
        let snap = serving(&self.identities)?;
        check_enforcer(&snap, &selectors)?;
        Ok(bundle_stream(&self.identities, move |snap| {
            if let Err(denied) = check_enforcer(snap, &selectors) {
                return Some(Err(denied));
            }
            render(snap).map(Ok)
        }))
    }
}

/// Whether `snap` lets a caller with `selectors` use the Enforcer API: an entry must match it,
/// and one of the matching entries must be marked as an enforcer.
fn check_enforcer(snap: &Snapshot, selectors: &[Selector]) -> Result<(), Status> {
    let entries = matching(snap, selectors);
    if entries.is_empty() {
        return Err(no_entry());
    }
    if !entries.iter().any(|e| e.spec.enforcer) {
        return Err(Status::permission_denied(
            "no registration entry marks this workload as an enforcer \
             (create its entry with `sigil entry create --enforcer`)",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl ep::enforcer_server::Enforcer for EnforcerApi {
    type WatchRevocationsStream = ResponseStream<ep::Revocations>;

    async fn watch_revocations(
        &self,
        req: Request<ep::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        // The full list now and on every change.
        let stream = self
            .watch(&req, |snap| snap.revocations.as_ref().map(|r| r.to_pb()))
            .await?;
        Ok(Response::new(stream))
    }

    type WatchPolicyStream = ResponseStream<ep::PolicyBundle>;

    async fn watch_policy(
        &self,
        req: Request<ep::WatchPolicyRequest>,
    ) -> Result<Response<Self::WatchPolicyStream>, Status> {
        let stream = self
            .watch(&req, |snap| {
                let policy = snap.policy.as_ref()?;
                let keys = snap
                    .bundle
                    .as_ref()
                    .map(|b| b.policy_authorities.clone())
                    .unwrap_or_default();
                let jwks = serde_json::json!({ "keys": keys }).to_string();
                Some(ep::PolicyBundle {
                    envelope: policy.envelope.clone(),
                    revision: i64::try_from(policy.content.revision).unwrap_or(i64::MAX),
                    policy_keys_jwks: jwks,
                })
            })
            .await?;
        Ok(Response::new(stream))
    }

    type WatchRiskStream = ResponseStream<ep::RiskTable>;

    async fn watch_risk(
        &self,
        req: Request<ep::WatchRiskRequest>,
    ) -> Result<Response<Self::WatchRiskStream>, Status> {
        let stream = self
            .watch(&req, |snap| snap.risks.as_ref().map(|r| (**r).clone()))
            .await?;
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::time::Duration;

    use sigil_core::{
        Clock, EntryId, EntrySpec, ManualClock, RegistrationEntry, Selector, SpiffeId, TrustDomain,
    };
    use sigil_proto::enforcer::enforcer_client::EnforcerClient;
    use sigil_proto::workload as wl;
    use tonic::transport::{Channel, Endpoint};

    use super::*;
    use crate::config::AgentConfig;
    use crate::identity::Snapshot;
    use crate::revocation::RevocationList;
    use sigil_core::RevokedSvid;

    const NOW: i64 = 1_700_000_000;

    fn my_uid() -> u32 {
        std::fs::metadata("/proc/self").unwrap().uid()
    }

    /// An entry for `uid` marked as an enforcer (the proxy's).
    fn entry(uid: u32) -> RegistrationEntry {
        let mut e = plain_entry(uid);
        e.spec.enforcer = true;
        e
    }

    /// An entry for `uid` that does not mark it as an enforcer.
    fn plain_entry(uid: u32) -> RegistrationEntry {
        RegistrationEntry {
            id: EntryId::random(),
            spec: EntrySpec {
                spiffe_id: SpiffeId::new("spiffe://td.test/proxy").unwrap(),
                parent_id: SpiffeId::new("spiffe://td.test/sigil/node/n1").unwrap(),
                selectors: vec![Selector::parse(&format!("unix:uid:{uid}")).unwrap()],
                x509_ttl_secs: 3600,
                jwt_ttl_secs: 300,
                dns_names: vec![],
                groups: vec![],
                scopes: vec![],
                enforcer: false,
                node_selectors: vec![],
            },
            revision: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn list(revision: i64, serials: &[&str]) -> RevocationList {
        RevocationList {
            revision,
            revoked: serials
                .iter()
                .map(|s| RevokedSvid {
                    serial: (*s).into(),
                    spiffe_id: String::new(),
                    revoked_at: NOW - 10,
                    expires_at: NOW + 3600,
                })
                .collect(),
        }
    }

    /// The agent's identities with no server (its snapshot set by the test), served on a real
    /// unix socket through the same router as `sigil agent`.
    struct Fixture {
        _dir: tempfile::TempDir,
        identities: Arc<Identities>,
        server: tokio::task::JoinHandle<()>,
        socket: std::path::PathBuf,
    }

    impl Fixture {
        fn mgr_dir(&self) -> &Path {
            self._dir.path()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    fn config(dir: &Path) -> AgentConfig {
        AgentConfig {
            trust_domain: TrustDomain::new("td.test").unwrap(),
            server_address: "127.0.0.1:1".into(),
            data_dir: dir.to_owned(),
            socket_path: None,
            join_token: None,
            attestor: None,
            tpm_tcti: None,
            tpm_event_log: None,
            trust_bundle: None,
            log_format: "text".into(),
            metrics_addr: None,
            secrets_dir: std::path::PathBuf::from("/run/sigil/secrets"),
            secret_files: Vec::new(),
            posture_rules: None,
            posture_interval_secs: 0,
            telemetry_broker: None,
        }
    }

    fn fixture(snap: impl FnOnce(&mut Snapshot)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(NOW));
        let identities = Identities::load(config(dir.path()), clock).unwrap();
        identities.publish_for_test(|s| {
            s.serving = true;
            snap(s);
        });
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = crate::serve(listener, identities.clone());
        Fixture {
            _dir: dir,
            identities,
            server,
            socket,
        }
    }

    async fn channel(socket: &Path) -> Channel {
        let path = socket.to_owned();
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .unwrap()
    }

    fn with_header<T>(msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        r
    }

    async fn next(
        s: &mut tonic::Streaming<ep::Revocations>,
    ) -> Result<Option<ep::Revocations>, Status> {
        tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("no message within 5 s")
    }

    fn serials(r: &ep::Revocations) -> Vec<&str> {
        r.revoked.iter().map(|x| x.serial.as_str()).collect()
    }

    #[tokio::test]
    async fn streams_the_full_list_now_and_on_every_change() {
        let f = fixture(|s| {
            s.entries = Arc::new(vec![entry(my_uid())]);
            s.revocations = Some(Arc::new(list(3, &["aa01"])));
        });
        let mut c = EnforcerClient::new(channel(&f.socket).await);
        let mut stream = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(first.revision, 3);
        assert_eq!(serials(&first), ["aa01"]);
        assert_eq!(first.revoked[0].expires_at, NOW + 3600);

        // A change unrelated to revocations sends nothing; a new list is sent in full.
        f.identities.publish_for_test(|s| s.attesting = false);
        f.identities
            .publish_for_test(|s| s.revocations = Some(Arc::new(list(4, &["aa01", "bb02"]))));
        let second = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(second.revision, 4);
        assert_eq!(serials(&second), ["aa01", "bb02"]);

        // The caller's entry goes away: the stream ends with PermissionDenied.
        f.identities
            .publish_for_test(|s| s.entries = Arc::new(vec![entry(my_uid() + 1)]));
        let err = next(&mut stream).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn sends_nothing_until_a_list_is_known() {
        let f = fixture(|s| s.entries = Arc::new(vec![entry(my_uid())]));
        let mut c = EnforcerClient::new(channel(&f.socket).await);
        let mut stream = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), stream.message())
                .await
                .is_err(),
            "an unknown list must not be sent as an empty one"
        );
        f.identities
            .publish_for_test(|s| s.revocations = Some(Arc::new(list(1, &[]))));
        let first = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(first.revision, 1);
        assert!(first.revoked.is_empty());
    }

    #[tokio::test]
    async fn refuses_without_the_header_or_a_matching_entry() {
        let f = fixture(|s| {
            s.entries = Arc::new(vec![entry(my_uid() + 1)]);
            s.revocations = Some(Arc::new(list(1, &["aa"])));
        });
        let ch = channel(&f.socket).await;
        let mut c = EnforcerClient::new(ch.clone());
        let err = c
            .watch_revocations(Request::new(ep::WatchRevocationsRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("no registration entry"), "{err:?}");

        // The Workload API is on the same socket and router.
        let mut w = wl::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch);
        let err = w
            .fetch_x509svid(Request::new(wl::X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = w
            .fetch_x509svid(with_header(wl::X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn refuses_a_workload_whose_entry_is_not_an_enforcer() {
        let f = fixture(|s| {
            s.entries = Arc::new(vec![plain_entry(my_uid())]);
            s.revocations = Some(Arc::new(list(1, &["aa"])));
        });
        let mut c = EnforcerClient::new(channel(&f.socket).await);
        let err = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message()
                .contains("no registration entry marks this workload as an enforcer"),
            "{err:?}"
        );
        let err = c
            .watch_policy(with_header(ep::WatchPolicyRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("as an enforcer"), "{err:?}");

        // The Workload API still serves the same caller: only the Enforcer API is narrower.
        let mut w =
            wl::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel(&f.socket).await);
        let err = w
            .fetch_x509svid(with_header(wl::X509svidRequest {}))
            .await
            .err();
        assert!(
            err.as_ref()
                .is_none_or(|e| !e.message().contains("enforcer")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn one_matching_enforcer_entry_is_enough() {
        let mut other = entry(my_uid());
        other.spec.spiffe_id = SpiffeId::new("spiffe://td.test/proxy-2").unwrap();
        let f = fixture(|s| {
            s.entries = Arc::new(vec![plain_entry(my_uid()), other]);
            s.revocations = Some(Arc::new(list(2, &["cc"])));
        });
        let mut c = EnforcerClient::new(channel(&f.socket).await);
        let mut stream = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next(&mut stream).await.unwrap().unwrap().revision, 2);
    }

    #[tokio::test]
    async fn an_entry_that_loses_the_flag_ends_open_streams() {
        let f = fixture(|s| {
            s.entries = Arc::new(vec![entry(my_uid())]);
            s.revocations = Some(Arc::new(list(1, &["aa"])));
        });
        let mut c = EnforcerClient::new(channel(&f.socket).await);
        let mut revocations = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(next(&mut revocations).await.unwrap().unwrap().revision, 1);
        let mut policy = c
            .watch_policy(with_header(ep::WatchPolicyRequest {}))
            .await
            .unwrap()
            .into_inner();

        // The same entry, updated to drop the flag (the caller still matches it).
        let mut dropped = entry(my_uid());
        dropped.spec.enforcer = false;
        dropped.revision = 2;
        f.identities
            .publish_for_test(|s| s.entries = Arc::new(vec![dropped]));
        let err = next(&mut revocations).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("as an enforcer"), "{err:?}");
        let err = tokio::time::timeout(Duration::from_secs(5), policy.message())
            .await
            .expect("the policy stream ends within 5 s")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);

        // A new call is refused too.
        let err = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn watch_policy_streams_each_accepted_bundle_with_the_policy_keys() {
        use sigil_policy::bundle::{BundleContent, PolicySigner};
        let signer = PolicySigner::generate().unwrap();
        let content = |revision: u64, not_after: i64| BundleContent {
            not_after,
            not_before: NOW - 5,
            policies: [(
                "a.cedar".to_owned(),
                "permit(principal, action == Action::\"list_models\", resource);".to_owned(),
            )]
            .into(),
            rate_limits: None,
            revision,
            schema: sigil_policy::SCHEMA.to_owned(),
            trust_domain: "td.test".to_owned(),
        };
        let jwk = signer.public_jwk();
        let f = fixture(|s| {
            s.entries = Arc::new(vec![entry(my_uid())]);
            s.bundle = Some(Arc::new(sigil_pki::TrustBundle {
                trust_domain: TrustDomain::new("td.test").unwrap(),
                x509_authorities: Vec::new(),
                jwt_authorities: Vec::new(),
                policy_authorities: vec![jwk.clone()],
                sequence: 1,
                refresh_hint_secs: 300,
            }));
        });
        let mut c = EnforcerClient::new(channel(&f.socket).await);
        let mut stream = c
            .watch_policy(with_header(ep::WatchPolicyRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), stream.message())
                .await
                .is_err(),
            "nothing before a bundle is known"
        );
        let r1 = signer.sign(&content(1, NOW + 60)).unwrap();
        assert!(f.identities.offer_policy(&r1).await.unwrap());
        let m = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((m.envelope.as_str(), m.revision), (r1.as_str(), 1));
        let keys: serde_json::Value = serde_json::from_str(&m.policy_keys_jwks).unwrap();
        assert_eq!(keys["keys"][0]["kid"], jwk.kid.clone().unwrap());
        assert_eq!(keys["keys"][0]["use"], "sigil-policy");
        // Refused (expired, older): nothing new is sent; a newer one is.
        assert!(
            f.identities
                .offer_policy(&signer.sign(&content(2, NOW)).unwrap())
                .await
                .is_err()
        );
        assert!(
            f.identities
                .offer_policy(&signer.sign(&content(0, NOW + 60)).unwrap())
                .await
                .is_err()
        );
        let r3 = signer.sign(&content(3, NOW + 60)).unwrap();
        assert!(f.identities.offer_policy(&r3).await.unwrap());
        let m = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.revision, 3);
        // Persisted for offline use and across restarts.
        let cache = f.mgr_dir().join("cache");
        let (_, rec) = crate::slotfile::SlotFile::open(&cache.join(crate::policy::STATE_FILE))
            .unwrap()
            .unwrap();
        let rec: serde_json::Value = serde_json::from_slice(&rec.unwrap()).unwrap();
        assert_eq!(rec["revision"], 3);
        assert_eq!(rec["envelope"], r3.as_str());
    }

    #[tokio::test]
    async fn refuses_when_the_node_has_no_identity() {
        let f = fixture(|s| {
            s.entries = Arc::new(vec![entry(my_uid())]);
            s.revocations = Some(Arc::new(list(1, &["aa"])));
            s.serving = false;
        });
        let mut c = EnforcerClient::new(channel(&f.socket).await);
        let err = c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn the_cached_list_is_loaded_without_expired_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = crate::cache::Cache::open(&dir.path().join("cache")).unwrap();
        let mut l = list(9, &["live"]);
        l.revoked.push(RevokedSvid {
            serial: "dead".into(),
            spiffe_id: String::new(),
            revoked_at: NOW - 100,
            expires_at: NOW,
        });
        cache.save_revocations(&l).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(NOW));
        let identities = Identities::load(config(dir.path()), clock).unwrap();
        let snap = identities.subscribe().borrow().clone();
        let got = snap.revocations.expect("the cached list is served");
        assert_eq!(got.revision, 9);
        let serials: Vec<&str> = got.revoked.iter().map(|r| r.serial.as_str()).collect();
        assert_eq!(serials, ["live"]);

        // A corrupt file is moved aside, and no list is assumed: the slot file, or the
        // previous layout's file.
        let file = crate::cache::Cache::REVOCATIONS_FILE;
        for (name, bytes) in [
            (file, b"SGLSLOTF garbage".as_slice()),
            ("revocations.json", b"{"),
        ] {
            std::fs::write(dir.path().join("cache").join(name), bytes).unwrap();
            let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(NOW));
            let identities = Identities::load(config(dir.path()), clock).unwrap();
            assert!(
                identities.subscribe().borrow().revocations.is_none(),
                "{name}"
            );
            assert!(
                dir.path()
                    .join("cache")
                    .join(format!("{name}.corrupt"))
                    .exists(),
                "{name}"
            );
        }
    }
}
