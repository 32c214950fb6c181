//! The node plugin's manifests agree with the code: driver name, CSIDriver settings the
//! plugin relies on, flags the binary accepts, paths that must line up, least privilege.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use clap::Args as _;
use hsm_secrets::cli::node::NodeArgs;
use hsm_secrets::telemetry::CommonArgs;
use hsm_secrets_csi::DEFAULT_DRIVER_NAME;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::api::storage::v1::CSIDriver;
use serde::de::DeserializeOwned;

const NAMESPACE: &str = "hsm-secrets-system";

fn load<T: DeserializeOwned>(file: &str) -> Vec<T> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/node")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn container<'a>(ds: &'a DaemonSet, name: &str) -> &'a Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers.iter().find(|c| c.name == name).unwrap()
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[test]
fn csidriver_declares_what_the_plugin_relies_on() {
    let [driver]: [CSIDriver; 1] = load("csidriver.yaml").try_into().unwrap();
    assert_eq!(driver.metadata.name.as_deref(), Some(DEFAULT_DRIVER_NAME));
    let spec = driver.spec;
    assert_eq!(spec.attach_required, Some(false));
    assert_eq!(
        spec.pod_info_on_mount,
        Some(true),
        "access control needs pod info"
    );
    assert_eq!(
        spec.volume_lifecycle_modes,
        Some(vec!["Ephemeral".to_string()])
    );
    assert_eq!(
        spec.requires_republish,
        Some(true),
        "rotation needs republish"
    );
    assert_eq!(spec.fs_group_policy.as_deref(), Some("File"));
}

#[test]
fn cluster_role_grants_exactly_the_reads_the_plugin_makes() {
    let roles: Vec<serde_json::Value> = load("rbac.yaml");
    let role: ClusterRole = serde_json::from_value(roles[0].clone()).unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(roles[1].clone()).unwrap();
    let mut grants = BTreeSet::new();
    for rule in role.rules.unwrap() {
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.as_ref().unwrap() {
                for verb in &rule.verbs {
                    grants.insert(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    // Exactly the calls the plugin makes: the catalog's reflector (list, watch), the
    // HSMDevice status of remote reads (get_device), the Nodes' InternalIPs
    // (NodeAddressEndpoints lists them), the HSMSecretSyncFailed Events (KubePodEvents).
    let expected: BTreeSet<String> = [
        "hsmsecrets.io/hsmsecrets:list",
        "hsmsecrets.io/hsmsecrets:watch",
        "hsmsecrets.io/hsmdevices:get",
        "/nodes:list",
        "events.k8s.io/events:create",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(grants, expected);

    let [sa]: [ServiceAccount; 1] = load("serviceaccount.yaml").try_into().unwrap();
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn daemonset_wires_socket_mounts_pin_and_flags_consistently() {
    let [ds]: [DaemonSet; 1] = load("daemonset.yaml").try_into().unwrap();
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("hsm-secrets-node")
    );
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path = |name: &str| {
        let v = volumes.iter().find(|v| v.name == name).unwrap();
        v.host_path.as_ref().unwrap().path.clone()
    };
    let socket_dir = host_path("socket-dir");
    assert_eq!(
        socket_dir,
        format!("/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}")
    );

    let plugin = container(&ds, "node-plugin");
    assert_eq!(plugin.args.as_ref().unwrap()[0], "node");
    let security = plugin.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(true));
    let mounts = plugin.volume_mounts.as_ref().unwrap();
    let mount = |name: &str| mounts.iter().find(|m| m.name == name).unwrap();
    let pods = mount("pods-dir");
    assert_eq!(pods.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(
        pods.mount_path,
        host_path("pods-dir"),
        "same path inside and out"
    );
    assert_eq!(
        format!("{}/pods", env(plugin, "KUBELET_DIR").unwrap()),
        pods.mount_path
    );
    let pin = mount("pin");
    assert_eq!(pin.read_only, Some(true));
    let pin_file = env(plugin, "HSM_PIN_FILE").unwrap();
    assert!(
        pin_file.starts_with(&format!("{}/", pin.mount_path)),
        "{pin_file}"
    );
    let pin_volume = volumes.iter().find(|v| v.name == "pin").unwrap();
    assert!(
        pin_volume.secret.is_some(),
        "the PIN comes from a Secret volume"
    );
    assert_eq!(mount("dev").mount_path, "/dev");
    let endpoint = env(plugin, "CSI_ENDPOINT").unwrap();
    let socket = hsm_secrets_csi::socket_path(endpoint).unwrap();
    assert_eq!(
        socket.parent().unwrap(),
        Path::new(&mount("socket-dir").mount_path)
    );
    let node_name = plugin
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    // Every variable the manifest sets is one the binary reads.
    let command = CommonArgs::augment_args(NodeArgs::augment_args(clap::Command::new("node")));
    let accepted: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for var in plugin.env.as_ref().unwrap() {
        assert!(
            accepted.contains(&var.name),
            "{} is not a flag's env: {accepted:?}",
            var.name
        );
    }
    let metrics_port = env(plugin, "HSM_METRICS_ADDR")
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    let ports = plugin.ports.as_ref().unwrap();
    assert!(
        ports.iter().any(|p| p.name.as_deref() == Some("metrics")
            && p.container_port.to_string() == metrics_port)
    );

    let registrar = container(&ds, "node-driver-registrar");
    let args = registrar.args.as_ref().unwrap();
    assert!(args.contains(&"--csi-address=/csi/csi.sock".to_string()));
    assert!(args.contains(&format!(
        "--kubelet-registration-path={socket_dir}/csi.sock"
    )));
    let probe = container(&ds, "liveness-probe");
    assert!(
        probe
            .args
            .as_ref()
            .unwrap()
            .contains(&"--csi-address=/csi/csi.sock".to_string())
    );
}

/// The value of `--flag=value` among a container's args.
fn flag<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.args
        .as_ref()?
        .iter()
        .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn remote_reads_dial_the_port_agents_listen_on() {
    let [ds]: [DaemonSet; 1] = load("daemonset.yaml").try_into().unwrap();
    let plugin = container(&ds, "node-plugin");
    let listen = flag(plugin, "--agent-listen").unwrap();
    let port = flag(plugin, "--agent-port").unwrap();
    assert_eq!(listen.rsplit(':').next(), Some(port));
    // The node plugin's own flags parse as the binary reads them.
    let command = CommonArgs::augment_args(NodeArgs::augment_args(clap::Command::new("node")));
    let mut argv = vec!["node".to_string(), "--node-name=n1".into()];
    argv.extend(plugin.args.as_ref().unwrap()[1..].iter().cloned());
    argv.extend([
        "--device=prod-hsm".into(),
        "--pkcs11-library=/x.so".into(),
        "--token-label=prod".into(),
        "--pin-file=/pin".into(),
    ]);
    command.try_get_matches_from(&argv).unwrap();
}

/// The Secret commands in manifests/README.md are the ones `hsm-secrets pki` prints, and
/// the directories it writes hold exactly the keys the workloads mount.
#[test]
fn the_readme_creates_the_secrets_as_pki_prints_them() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .current_dir(dir.path())
        .args(["pki", "--out", "./pki", "--nodes", "worker-1,worker-2"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let commands: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("kubectl "))
        .collect();
    assert_eq!(commands.len(), 1, "{stdout}");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/README.md"))
            .unwrap();
    for command in &commands {
        assert!(
            readme.lines().any(|l| l.trim() == *command),
            "manifests/README.md lacks the command `hsm-secrets pki --out ./pki` prints:\n{command}"
        );
    }
    // `--from-file=DIR` makes one key per file: the keys the node and controller mount.
    // Each node's own directory holds what the DaemonSet reads from the node.
    for node in ["worker-1", "worker-2"] {
        let mut keys: Vec<String> = std::fs::read_dir(dir.path().join("pki/nodes").join(node))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        keys.sort();
        assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"], "{node}");
        assert!(stdout.contains(&format!("./pki/nodes/{node}/")), "{stdout}");
    }
    assert!(stdout.contains("/etc/hsm-secrets/agent-tls"), "{stdout}");
    assert!(
        readme.contains("/etc/hsm-secrets/agent-tls"),
        "manifests/README.md says where each node's certificate goes"
    );
    {
        let (secret, sub) = ("hsm-secrets-controller-tls", "controller");
        let command = commands
            .iter()
            .find(|c| c.contains(&format!(" {secret} ")))
            .unwrap_or_else(|| panic!("pki prints no command for {secret}: {stdout}"));
        assert!(
            command.ends_with(&format!("--from-file=./pki/{sub}")),
            "{command}"
        );
        let mut keys: Vec<String> = std::fs::read_dir(dir.path().join("pki").join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        keys.sort();
        assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"], "{sub}");
    }
}
