//! Property tests of every parser that takes input from outside the process: the
//! admission decoder, the annotation parser, the CSI volume context, and a mirror's
//! intake of pushed records. Each runs a fixed number of generated cases (the
//! `PROPTEST_CASES` environment variable overrides it), so CI runs them in bounded time
//! like any other test; a failure prints the shrunk input to replay.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hsm_secrets::hsm::{MemoryStore, Record, SecretData, SecretStore};
use hsm_secrets::inject::{self, InjectRequest};
use hsm_secrets::mirror::{
    Agent, AgentConfig, AgentTls, Assignment, Identity, Peer, generate_pki, pb,
};
use hsm_secrets::node::{VolumeAttributes, VolumeRequest};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CASES: u32 = 512;

/// Text that exercises parsers: separators, path syntax, unicode, control characters.
fn hostile_text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("/".to_string()),
            Just(",".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("0".to_string()),
            Just("7".to_string()),
            Just("0o".to_string()),
            Just(" ".to_string()),
            Just("\0".to_string()),
            Just("é".to_string()),
            Just("hsm".to_string()),
            "[a-z0-9-]{1,8}",
            any::<char>().prop_map(String::from),
        ],
        0..max,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Whatever bytes arrive, the decoder answers; an accepted review has a real uid.
    #[test]
    fn the_admission_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(request) = hsm_secrets_webhook::review::decode_request(&bytes) {
            prop_assert!(!request.uid.is_empty() && request.uid.len() <= 128);
        }
    }

    /// Well-formed reviews with hostile field values: accepted only with a uid, and no
    /// error message grows with the input.
    #[test]
    fn the_admission_decoder_bounds_what_it_echoes(
        api_version in prop_oneof![Just("admission.k8s.io/v1".to_string()), hostile_text(400)],
        kind in prop_oneof![Just("AdmissionReview".to_string()), hostile_text(400)],
        uid in hostile_text(200),
        operation in prop_oneof![Just("CREATE"), Just("UPDATE"), Just("DELETE"), Just("PATCH")],
    ) {
        let review = serde_json::json!({
            "apiVersion": api_version, "kind": kind,
            "request": {
                "uid": uid, "operation": operation,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "p", "namespace": "shop",
                "userInfo": {"username": "u"},
                "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}},
                "dryRun": false
            }
        });
        match hsm_secrets_webhook::review::decode_request(&serde_json::to_vec(&review).unwrap()) {
            Ok(request) => prop_assert!(!request.uid.is_empty() && request.uid.len() <= 128),
            Err(error) => prop_assert!(error.to_string().len() < 600, "{}", error),
        }
    }

    /// Any annotations: parsing never panics, and what it accepts is safe to inject.
    #[test]
    fn the_annotation_parser_accepts_only_safe_requests(
        values in proptest::collection::vec(
            prop_oneof![hostile_text(12), "[a-z0-9-]{1,10}(,[a-z0-9-]{1,10}){0,2}", "/[a-z]{1,6}(/[a-z.]{1,6}){0,2}", "0?[0-7]{3}"],
            7,
        ),
        inject_value in prop_oneof![Just("true".to_string()), hostile_text(6)],
        extra in proptest::collection::btree_map("hsmsecrets\\.io/[a-zA-Z._-]{0,12}", hostile_text(8), 0..3),
    ) {
        let mut annotations: BTreeMap<String, String> = extra;
        annotations.insert(inject::ANNOTATION_INJECT.into(), inject_value);
        for (key, value) in [
            inject::ANNOTATION_SECRETS,
            inject::ANNOTATION_MOUNT_PATH,
            inject::ANNOTATION_CONTAINERS,
            inject::ANNOTATION_FILE_MODE,
            inject::ANNOTATION_NODE_AFFINITY,
            inject::ANNOTATION_DEVICE,
            inject::ANNOTATION_STATUS,
        ]
        .into_iter()
        .zip(values)
        {
            if !value.is_empty() {
                annotations.insert(key.into(), value);
            }
        }
        if let Ok(InjectRequest::Requested(spec)) = inject::parse_annotations(&annotations) {
            let mount = spec.mount_path.as_str();
            prop_assert!(mount.starts_with('/') && !mount.contains("/../") && !mount.contains('\0'));
            prop_assert!(inject::MountPath::parse(mount).is_ok());
            let mode = spec.file_mode.bits();
            prop_assert!(mode != 0 && mode & !0o444 == 0, "{:o}", mode);
            for secret in &spec.secrets {
                prop_assert!(hsm_secrets::hsm::SecretPath::new("shop", secret).is_ok(), "{}", secret);
            }
        }
    }

    /// Any volume context: the node plugin's parser never panics, and what it accepts
    /// reads at most 64 secrets of the pod's own namespace with a readable, read-only mode.
    #[test]
    fn the_volume_context_parser_accepts_only_safe_volumes(
        secrets in prop_oneof![hostile_text(20), "[a-z0-9-]{1,10}(,[a-z0-9./-]{1,12}){0,3}"],
        device in hostile_text(6),
        file_mode in prop_oneof![Just(String::new()), "[0-7]{1,5}", hostile_text(5)],
        namespace in prop_oneof![Just("shop".to_string()), hostile_text(4)],
        uid in prop_oneof![Just("uid-1".to_string()), hostile_text(4)],
    ) {
        let target = Path::new("/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/v/mount");
        let context: BTreeMap<String, String> = [
            ("secrets", secrets),
            ("device", device),
            ("fileMode", file_mode),
            ("csi.storage.k8s.io/pod.namespace", namespace.clone()),
            ("csi.storage.k8s.io/pod.name", "p".to_string()),
            ("csi.storage.k8s.io/pod.uid", uid),
            ("csi.storage.k8s.io/serviceAccount.name", "sa".to_string()),
            ("csi.storage.k8s.io/ephemeral", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let attributes = VolumeAttributes::parse(&context, &namespace);
        if let Ok(request) = VolumeRequest::parse(&context, target) {
            prop_assert_eq!(request.pod.uid.as_str(), "uid-1");
            prop_assert!(!request.secrets.is_empty() && request.secrets.len() <= 64);
            prop_assert!(request.file_mode.bits() != 0 && request.file_mode.bits() & !0o444 == 0);
            for secret in &request.secrets {
                prop_assert!(secret.path().is_ok());
            }
            // The webhook's check (the same parser) agrees.
            prop_assert!(attributes.is_ok());
        }
    }
}

proptest! {
    #![proptest_config(Config::with_cases(CASES))]

    /// Any layout options over any keys and values: parsing and rendering never panic,
    /// and whatever renders is a payload the volume writer accepts (no two files at one
    /// path, no path outside the volume, read-only modes) with no value in an error.
    #[test]
    fn any_layout_renders_a_valid_payload_or_a_clear_refusal(
        options in proptest::collection::vec(
            (
                prop_oneof![Just("fileMode."), Just("keyNames."), Just("path."), Just("format.")],
                prop_oneof![Just("db"), Just("tls"), Just("other")],
                prop_oneof![
                    Just("env".to_string()),
                    Just("json".to_string()),
                    Just("files".to_string()),
                    "[0-7]{3,4}",
                    "[a-z.]{1,5}=[0-7]{4}",
                    "[a-zA-Z_.]{1,5}=[a-zA-Z_.]{1,6}(,[a-z.]{1,5}=[A-Za-z_.]{1,6})?",
                    hostile_text(6),
                ],
            ),
            0..6,
        ),
        keys in proptest::collection::btree_map("[a-zA-Z_.][a-zA-Z0-9_.-]{0,5}", proptest::collection::vec(any::<u8>(), 0..12), 1..5),
    ) {
        let fields: Vec<(String, String)> = options
            .into_iter()
            .map(|(option, secret, value)| (format!("{option}{secret}"), value))
            .collect();
        let Ok(layout) = inject::VolumeLayout::parse(
            fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            inject::Spelling::Attribute,
            &["db", "tls"],
        ) else {
            return Ok(());
        };
        let mut data = SecretData::new();
        for (key, value) in &keys {
            if data.insert(key, value.clone()).is_err() {
                return Ok(());
            }
        }
        let mut files = Vec::new();
        for secret in ["db", "tls"] {
            match hsm_secrets::node::render::render_secret(secret, &data, &layout, inject::FileMode::DEFAULT) {
                Ok(rendered) => files.extend(rendered),
                Err(error) => {
                    let message = error.to_string();
                    for value in keys.values().filter(|v| v.len() > 3) {
                        prop_assert!(!message.as_bytes().windows(value.len()).any(|w| w == value.as_slice()));
                    }
                    return Ok(());
                }
            }
        }
        let payload = hsm_secrets_csi::Payload::new(files);
        prop_assert!(hsm_secrets_csi::payload_writer::validate_payload(&payload).is_ok(), "{:?}", payload.files.iter().map(|f| &f.path).collect::<Vec<_>>());
        prop_assert!(payload.files.iter().all(|f| f.mode != 0 && f.mode & !0o444 == 0));
    }
}

/// Pushed records from the assigned primary, with any path, version, checksum and data:
/// a mirror never panics, never stores a record whose checksum does not verify, and its
/// sequence never jumps more than the push window.
#[test]
fn a_mirror_takes_pushed_records_only_whole_and_in_sequence() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = generate_pki(pki_dir.path(), &["n2"]).unwrap();
    let tls = AgentTls::from_files(pki.files("n2").unwrap()).unwrap();
    let store = Arc::new(MemoryStore::new("props"));
    let mut cfg = AgentConfig::new("n2", tls);
    cfg.sync.pull_interval = Duration::from_secs(3600);
    cfg.sync.sync_interval = Duration::from_secs(3600);
    cfg.gc_interval = None;
    let agent = runtime.block_on(async {
        let agent = Agent::start(cfg, store.clone() as Arc<dyn SecretStore>).await;
        agent
            .assign(Assignment {
                role: hsm_secrets::crd::DeviceRole::ReadOnly,
                epoch: 1,
                primary: Some(Peer {
                    node: "n1".into(),
                    endpoint: "https://127.0.0.1:9".into(),
                }),
                mirrors: Vec::new(),
                lease: Duration::ZERO,
                sync_interval: None,
            })
            .await
            .unwrap();
        agent
    });
    let sender = Identity::Agent(Some("n1".into()));
    let strategy = (
        prop_oneof![Just("shop/db".to_string()), hostile_text(6)],
        prop_oneof![
            1u64..2_000,
            Just(0u64),
            Just(u64::MAX),
            (u64::MAX - 5)..=u64::MAX,
        ],
        any::<bool>(),
        proptest::collection::vec(
            ("[a-z]{1,4}", proptest::collection::vec(any::<u8>(), 0..16)),
            0..3,
        ),
        prop_oneof![Just("n1".to_string()), Just(String::new()), hostile_text(3)],
    );
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&strategy, |(path, version, genuine, pairs, claimed)| {
            let before = store.latest_sequence();
            let mut data = SecretData::new();
            for (k, v) in &pairs {
                let _ = data.insert(k, v.clone());
            }
            let checksum = match path.parse() {
                Ok(p) => Record::live(p, version, data.clone()).checksum.0.to_vec(),
                Err(_) => vec![0; 32],
            };
            let checksum = if genuine { checksum } else { vec![7; 32] };
            let request = pb::ReplicateRequest {
                record: Some(pb::Record {
                    path: path.clone(),
                    version,
                    checksum,
                    deleted: false,
                    data: pairs
                        .iter()
                        .map(|(k, v)| pb::KeyValue {
                            key: k.clone(),
                            value: v.clone(),
                        })
                        .collect(),
                }),
                epoch: 1,
                primary_node: claimed.clone(),
            };
            // What the agent's service does with a push: decode it, then apply it.
            let result = match hsm_secrets::mirror::rpc::convert::push_from_pb(request) {
                Ok(push) => runtime.block_on(agent.replicate(push, &sender)),
                Err(error) => Err(error),
            };
            let after = store.latest_sequence();
            prop_assert!(after <= before.saturating_add(hsm_secrets::mirror::PUSH_WINDOW));
            if result.is_ok() {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                prop_assert!(genuine, "a record failing its checksum was accepted");
                prop_assert!(claimed.is_empty() || claimed == "n1");
                prop_assert!(
                    version != 0
                        && version <= before.saturating_add(hsm_secrets::mirror::PUSH_WINDOW)
                );
            }
            Ok(())
        })
        .unwrap();
    // The generator reaches the accepting path, not only refusals.
    assert!(accepted.into_inner() > 0);
}
