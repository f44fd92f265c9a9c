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

/// The agent's Enforcer API (`sigil.agent.v1`): what a local enforcer (the sidecar proxy)
/// learns from the node agent beside it, e.g. the revocation list. Served on the agent's
/// Workload API socket.
pub mod enforcer {
    tonic::include_proto!("sigil.agent.v1");
}

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`), from the SPIFFE specification.
pub mod workload {
    tonic::include_proto!("_");
}
