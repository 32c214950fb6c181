//! Who is calling an agent, from the client certificate, and what each caller may do.
//!
//! Every certificate from the agent CA gets through the TLS handshake; the role comes
//! from a URI SAN in the certificate:
//!
//! | URI SAN | identity | may call |
//! | --- | --- | --- |
//! | [`CONTROLLER_URI`] | the controller | AssignRole, Fence, RenewLease, Put, Delete, reads |
//! | [`AGENT_URI`] | an agent (node plugin) | Replicate, reads |
//! | none of these | unidentified | Health only |
//!
//! Reads are Health, Manifest, Changes, Fetch and Get. So a node's certificate, which sits
//! on every node, can neither take over a device (roles, leases, fencing) nor write client
//! data into it; and the controller's certificate cannot push records into a mirror. The
//! agent certificate is shared by all nodes, so Replicate trusts every holder of it: a
//! mirror accepts pushes only from the primary its controller assigned, by name.

use rustls_pki_types::CertificateDer;

/// URI SAN of the controller's certificate.
pub const CONTROLLER_URI: &str = "spiffe://hsmsecrets.io/controller";
/// URI SAN of every agent's (node plugin's) certificate.
pub const AGENT_URI: &str = "spiffe://hsmsecrets.io/agent";

/// The role a caller's certificate gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    Controller,
    Agent,
    /// A certificate from the CA without a role URI (or no certificate seen).
    Unidentified,
}

impl Identity {
    /// Reads the role from a DER certificate; unparsable or role-less is Unidentified.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Self {
        let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
            return Identity::Unidentified;
        };
        let mut identity = Identity::Unidentified;
        for uri in cert.valid_uri_names() {
            match uri {
                // A certificate naming both is refused the controller's rights: a mistake
                // in issuance must not widen them.
                CONTROLLER_URI if identity == Identity::Unidentified => {
                    identity = Identity::Controller
                }
                AGENT_URI => identity = Identity::Agent,
                _ => {}
            }
        }
        identity
    }

    /// The role of the first (leaf) certificate, if any.
    pub fn of_chain(chain: Option<&[CertificateDer<'static>]>) -> Self {
        chain
            .and_then(|c| c.first())
            .map_or(Identity::Unidentified, Identity::of_certificate)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Identity::Controller => "the controller identity",
            Identity::Agent => "an agent identity",
            Identity::Unidentified => "a certificate without an hsm-secrets role URI",
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
        "AssignRole" | "Fence" | "RenewLease" | "Put" | "Delete" => Needs::Controller,
        "Replicate" => Needs::Agent,
        "Health" => Needs::AnyCaller,
        // Everything that returns secret material or its metadata, and any RPC added
        // later until it is given a rule here.
        _ => Needs::Member,
    }
}

/// Whether `caller` may call `rpc`; the refusal names the RPC and the identity needed.
pub fn authorize(rpc: &'static str, caller: Identity) -> Result<(), super::MirrorError> {
    let required = match (needs(rpc), caller) {
        (Needs::AnyCaller, _)
        | (Needs::Member, Identity::Controller | Identity::Agent)
        | (Needs::Controller, Identity::Controller)
        | (Needs::Agent, Identity::Agent) => return Ok(()),
        (Needs::Controller, _) => "controller",
        (Needs::Agent, _) => "agent",
        (Needs::Member, _) => "controller or agent",
    };
    Err(super::MirrorError::PermissionDenied {
        rpc,
        required,
        caller: caller.describe().into(),
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
            for (caller, ok) in [Controller, Agent, Unidentified].into_iter().zip(allowed) {
                let result = authorize(rpc, caller);
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
