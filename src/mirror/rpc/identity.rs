//! Who is calling an agent, from the client certificate, and what each caller may do.
//!
//! Every certificate from the agent CA gets through the TLS handshake; the role comes
//! from a URI SAN in the certificate:
//!
//! | URI SAN | identity | may call |
//! | --- | --- | --- |
//! | [`CONTROLLER_URI`] | the controller | AssignRole, Fence, RenewLease, Put, Delete, reads |
//! | [`AGENT_NODE_URI_PREFIX`]`<node>` | the agent of that node | Replicate (as that node), reads |
//! | [`AGENT_URI`] | an agent of some node (a certificate shared by all nodes) | Replicate only where `--allow-shared-agent-identity` is set, reads |
//! | none of these | unidentified | Health only |
//!
//! Reads are Health, Manifest, Changes, Fetch and Get. So a node's certificate can
//! neither take over a device (roles, leases, fencing) nor write client data into it, and
//! the controller's certificate cannot push records into a mirror. A push is accepted
//! from the node its certificate names, and only when that node is the primary the
//! mirror's controller assigned: what the request says about its sender is never trusted.

use rustls_pki_types::CertificateDer;

/// URI SAN of the controller's certificate.
pub const CONTROLLER_URI: &str = "spiffe://hsmsecrets.io/controller";
/// URI SAN of an agent certificate shared by every node (it proves membership, not
/// which node).
pub const AGENT_URI: &str = "spiffe://hsmsecrets.io/agent";
/// URI SAN prefix of a node's own agent certificate: `spiffe://hsmsecrets.io/agent/<node>`.
pub const AGENT_NODE_URI_PREFIX: &str = "spiffe://hsmsecrets.io/agent/";

/// The role a caller's certificate gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Controller,
    /// An agent; the node its certificate names, or `None` for a shared certificate.
    Agent(Option<String>),
    /// A certificate from the CA without a role URI (or no certificate seen).
    Unidentified,
}

impl Identity {
    /// Reads the role from a DER certificate; unparsable or role-less is Unidentified.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Self {
        let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
            return Identity::Unidentified;
        };
        let (mut controller, mut shared_agent) = (false, false);
        let mut nodes: Vec<&str> = Vec::new();
        for uri in cert.valid_uri_names() {
            if uri == CONTROLLER_URI {
                controller = true;
            } else if uri == AGENT_URI {
                shared_agent = true;
            } else if let Some(node) = uri.strip_prefix(AGENT_NODE_URI_PREFIX)
                && !node.is_empty()
                && !nodes.contains(&node)
            {
                nodes.push(node);
            }
        }
        match nodes.as_slice() {
            // A certificate naming two nodes proves neither.
            [_, _, ..] => Identity::Unidentified,
            // A certificate naming a node and the controller is refused the controller's
            // rights: a mistake in issuance must not widen them.
            [node] => Identity::Agent(Some((*node).to_string())),
            [] if shared_agent => Identity::Agent(None),
            [] if controller => Identity::Controller,
            [] => Identity::Unidentified,
        }
    }

    /// The role of the first (leaf) certificate, if any.
    pub fn of_chain(chain: Option<&[CertificateDer<'static>]>) -> Self {
        chain
            .and_then(|c| c.first())
            .map_or(Identity::Unidentified, Identity::of_certificate)
    }

    pub fn describe(&self) -> String {
        match self {
            Identity::Controller => "the controller identity".into(),
            Identity::Agent(Some(node)) => format!("the agent identity of node {node}"),
            Identity::Agent(None) => "the shared agent identity".into(),
            Identity::Unidentified => "a certificate without an hsm-secrets role URI".into(),
        }
    }
}

/// What an RPC needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Any certificate from the CA.
    AnyCaller,
    /// The controller or an agent: a certificate the CA issued for hsm-secrets, not just
    /// any certificate of a CA that may be shared with other workloads.
    Member,
    Controller,
    Agent,
}

/// The rule of each RPC of the agent service.
pub fn needs(rpc: &str) -> Needs {
    match rpc {
        "AssignRole" | "Fence" | "RenewLease" | "Put" | "Delete" | "Archive" => Needs::Controller,
        "Replicate" => Needs::Agent,
        "Health" => Needs::AnyCaller,
        // Everything that returns secret material or its metadata, and any RPC added
        // later until it is given a rule here.
        _ => Needs::Member,
    }
}

/// Whether `caller` may call `rpc`; the refusal names the RPC and the identity needed.
pub fn authorize(rpc: &'static str, caller: &Identity) -> Result<(), crate::mirror::MirrorError> {
    let required = match (needs(rpc), caller) {
        (Needs::AnyCaller, _)
        | (Needs::Member, Identity::Controller | Identity::Agent(_))
        | (Needs::Controller, Identity::Controller)
        | (Needs::Agent, Identity::Agent(_)) => return Ok(()),
        (Needs::Controller, _) => "controller",
        (Needs::Agent, _) => "agent",
        (Needs::Member, _) => "controller or agent",
    };
    Err(crate::mirror::MirrorError::PermissionDenied {
        rpc,
        required,
        caller: caller.describe(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_writes_need_the_controller_replicate_an_agent_reads_a_member() {
        use Identity::*;
        let table = [
            ("AssignRole", [true, false, false]),
            ("Fence", [true, false, false]),
            ("RenewLease", [true, false, false]),
            ("Put", [true, false, false]),
            ("Delete", [true, false, false]),
            ("Replicate", [false, true, false]),
            ("Health", [true, true, true]),
            ("Manifest", [true, true, false]),
            ("Changes", [true, true, false]),
            ("Fetch", [true, true, false]),
            ("Get", [true, true, false]),
            ("SomethingNew", [true, true, false]),
        ];
        for (rpc, allowed) in table {
            for (caller, ok) in [Controller, Agent(Some("n1".into())), Unidentified]
                .into_iter()
                .zip(allowed)
            {
                let result = authorize(rpc, &caller);
                assert_eq!(result.is_ok(), ok, "{rpc} by {caller:?}");
                if let Err(e) = result {
                    let text = e.to_string();
                    assert!(text.contains(rpc), "{text}");
                    assert_eq!(e.code(), tonic::Code::PermissionDenied);
                }
            }
        }
    }
}
