//! Generated protobuf and gRPC code for sigil's node API, the agent's Enforcer API and the
//! SPIFFE Workload API.
#![forbid(unsafe_code)]
#![allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs
)]

/// sigil's node API (`sigil.node.v1`): attestation and SVID signing for node agents.
pub mod node {
    pub mod v1 {
        tonic::include_proto!("sigil.node.v1");
    }
}

/// The agent's own APIs (`sigil.agent.v1`), served on its Workload API socket: the Enforcer
/// API (what a local enforcer, the sidecar proxy, learns from the node agent beside it, e.g.
/// the revocation list) and the Secrets API (a workload's secrets and dynamic credentials).
pub mod enforcer {
    tonic::include_proto!("sigil.agent.v1");
}

/// The same package as [`enforcer`], by its package name.
pub use enforcer as agent;

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`), from the SPIFFE specification.
pub mod workload {
    tonic::include_proto!("_");
}
