//! `kubectl hsm` commands against the scripted API server: the exact calls each command
//! makes (method, path, body), what it prints, and how API failures read.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use clap::Parser;
use hsm_secrets::kubectl::args::Request;
use hsm_secrets::kubectl::{Cli, KubectlError, Prompt, SecretValue, Session, Term};
use kit::mock_api::{self, Handle, next, status};
use serde_json::{Value, json};

struct NoPrompt;

impl Prompt for NoPrompt {
    fn available(&self) -> bool {
        false
    }
    fn read_entries(
        &mut self,
        _term: &mut Term<'_>,
    ) -> Result<Vec<(String, SecretValue)>, KubectlError> {
        Ok(Vec::new())
    }
}

struct Ran {
    result: Result<(), KubectlError>,
    out: String,
    err: String,
}

impl Ran {
    fn error(&self) -> String {
        match &self.result {
            Err(e) => e.to_string(),
            Ok(()) => panic!("expected an error; out: {}", self.out),
        }
    }
}

/// Parses `args` as `kubectl hsm` would and runs them in namespace `shop` against the mock.
async fn run(args: &[&str], client: kube::Client) -> Ran {
    let cli =
        Cli::try_parse_from(std::iter::once("kubectl-hsm").chain(args.iter().copied())).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = {
        let mut term = Term {
            out: &mut out,
            err: &mut err,
        };
        let request = Request::from_cli(&cli, &mut NoPrompt, &mut term).unwrap();
        let session = Session::new(client, "shop");
        hsm_secrets::kubectl::execute(request, &session, &mut term).await
    };
    Ran {
        result,
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// The client made no call beyond those scripted (it is gone when this returns None).
async fn no_more_calls(api: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_secs(10), api.next_request())
        .await
        .expect("the client was never dropped");
    if let Some((req, _)) = next {
        panic!("unexpected extra call: {} {}", req.method(), req.uri());
    }
}

const SECRETS: &str = "/apis/hsmsecrets.io/v1alpha1/namespaces/shop/hsmsecrets";
const DEVICES: &str = "/apis/hsmsecrets.io/v1alpha1/hsmdevices";

fn hsmsecret(name: &str, spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecret",
        "metadata": {"name": name, "namespace": "shop", "uid": "uid-1", "resourceVersion": "10", "generation": 1},
        "spec": spec,
        "status": status
    })
}

fn device(policy: &str, primary: &str, nodes: Value, extra_status: Value) -> Value {
    let mut status = json!({"primaryNode": primary, "epoch": 3, "phase": "Ready", "nodes": nodes});
    for (k, v) in extra_status.as_object().unwrap() {
        status[k] = v.clone();
    }
    kit::resources::device("prod-hsm")
        .library("/l.so")
        .pin_secret("s", "p")
        .policy(serde_json::from_value(json!(policy)).unwrap())
        .resource_version("5")
        .status_json(status)
        .json()
}

fn three_nodes() -> Value {
    json!([
        {"node": "worker-1", "role": "Primary", "health": "Healthy", "appliedSequence": 42},
        {"node": "worker-2", "role": "ReadOnly", "health": "Healthy", "appliedSequence": 41},
        {"node": "worker-3", "role": "ReadOnly", "health": "Unhealthy", "lastError": "agent down"}
    ])
}

fn not_found(kind_plural: &str, name: &str) -> Value {
    let mut s = status(
        404,
        "NotFound",
        &format!("{kind_plural}.hsmsecrets.io \"{name}\" not found"),
    );
    s["details"] = json!({"name": name, "group": "hsmsecrets.io", "kind": kind_plural});
    s
}

#[tokio::test]
async fn create_posts_the_import_secret_then_the_hsmsecret_and_waits_for_the_import() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("POST", "/api/v1/namespaces/shop/secrets")
        );
        let meta = &req.body["metadata"];
        assert_eq!(meta["generateName"], "db-import-");
        assert_eq!(meta["namespace"], "shop");
        assert_eq!(meta["labels"]["hsmsecrets.io/import-for"], "db");
        assert!(meta.get("annotations").is_none());
        assert_eq!(req.body["type"], "Opaque");
        // base64 of "s3cret" and "app".
        assert_eq!(
            req.body["data"],
            json!({"password": "czNjcmV0", "username": "YXBw"})
        );
        let mut created = req.body.clone();
        created["metadata"]["name"] = json!("db-import-x7k2p");
        created["metadata"]["resourceVersion"] = json!("100");
        req.reply(201, created);

        let req = next(&mut api).await;
        assert_eq!((req.method.as_str(), req.path()), ("POST", SECRETS));
        assert_eq!(req.body["metadata"]["name"], "db");
        assert_eq!(
            req.body["spec"],
            json!({
                "deviceRef": "prod-hsm",
                "source": {"secretRef": {"name": "db-import-x7k2p"}, "deleteAfterImport": true, "mode": "Replace"}
            })
        );
        let spec = req.body["spec"].clone();
        req.reply(201, hsmsecret("db", spec.clone(), json!(null)));

        // Polls until the controller reports the import of resourceVersion 100.
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("GET", &*format!("{SECRETS}/db"))
        );
        req.reply(
            200,
            hsmsecret("db", spec.clone(), json!({"syncStatus": "Pending"})),
        );
        let req = next(&mut api).await;
        assert_eq!(req.method, "GET");
        req.reply(
            200,
            hsmsecret(
                "db",
                spec,
                json!({"syncStatus": "InSync", "version": 1, "keys": ["password", "username"], "importedSourceVersion": "100"}),
            ),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(
        &[
            "create",
            "db",
            "--device",
            "prod-hsm",
            "--from-literal",
            "password=s3cret",
            "--from-literal",
            "username=app",
        ],
        client,
    )
    .await;
    ran.result.as_ref().unwrap();
    assert_eq!(
        ran.out,
        "hsmsecret shop/db imported (version 1; keys: password, username)\n"
    );
    assert!(
        ran.err
            .contains("import into HSMSecret shop/db requested (Secret shop/db-import-x7k2p)"),
        "{}",
        ran.err
    );
    assert!(!ran.out.contains("s3cret") && !ran.err.contains("s3cret"));
    server.await.unwrap();
}

#[tokio::test]
async fn a_webhook_denial_is_printed_as_is_and_the_import_secret_is_taken_back() {
    let denial = "admission webhook \"validate.hsmsecrets.io\" denied the request: HSMDevice prod-hsm has no writable primary (worker-1 unavailable since 2025-01-01T11:00:00Z); writes resume after failover: kubectl hsm failover prod-hsm --to NODE";
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(req.method, "GET");
        req.reply(
            200,
            hsmsecret(
                "db",
                json!({"deviceRef": "prod-hsm"}),
                json!({"keys": ["a"]}),
            ),
        );
        let req = next(&mut api).await;
        assert_eq!(req.method, "POST");
        // The owner reference lets garbage collection remove an import never picked up.
        assert_eq!(
            req.body["metadata"]["ownerReferences"][0],
            json!({"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecret", "name": "db", "uid": "uid-1"})
        );
        let mut created = req.body.clone();
        created["metadata"]["name"] = json!("db-import-abcde");
        created["metadata"]["resourceVersion"] = json!("7");
        req.reply(201, created);
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("PATCH", &*format!("{SECRETS}/db"))
        );
        assert_eq!(
            req.body,
            json!({"spec": {"source": {"secretRef": {"name": "db-import-abcde"}, "deleteAfterImport": true, "mode": "Merge"}}})
        );
        req.reply(403, status(403, "Forbidden", denial));
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("DELETE", "/api/v1/namespaces/shop/secrets/db-import-abcde")
        );
        req.reply(200, status(200, "", ""));
        no_more_calls(&mut api).await;
    });
    let ran = run(&["update", "db", "--from-literal", "b=2"], client).await;
    assert_eq!(ran.error(), denial);
    assert_eq!(ran.result.unwrap_err().kind(), "denied");
    server.await.unwrap();
}

#[tokio::test]
async fn update_dry_run_reads_status_keys_and_writes_nothing() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("GET", &*format!("{SECRETS}/db"))
        );
        req.reply(
            200,
            hsmsecret(
                "db",
                json!({"deviceRef": "prod-hsm"}),
                json!({"keys": ["password", "username"]}),
            ),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(
        &[
            "update",
            "db",
            "--replace",
            "--dry-run",
            "--from-literal",
            "password=new",
            "--from-literal",
            "api-key=k",
        ],
        client,
    )
    .await;
    ran.result.as_ref().unwrap();
    assert_eq!(
        ran.out,
        "update HSMSecret shop/db on device prod-hsm (mode Replace) (dry run: nothing was written)\n  + api-key    add\n  ~ password   set\n  - username   remove\n"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn update_reports_the_controllers_error_for_its_generation() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let old_error =
            json!({"syncStatus": "Error", "lastError": "old failure", "observedGeneration": 1});
        let req = next(&mut api).await;
        req.reply(
            200,
            hsmsecret("db", json!({"deviceRef": "prod-hsm"}), old_error.clone()),
        );
        let req = next(&mut api).await;
        let mut created = req.body.clone();
        created["metadata"]["name"] = json!("db-import-q");
        created["metadata"]["resourceVersion"] = json!("55");
        req.reply(201, created);
        let req = next(&mut api).await;
        assert_eq!(req.method, "PATCH");
        let mut patched = hsmsecret("db", json!({"deviceRef": "prod-hsm"}), old_error.clone());
        patched["metadata"]["generation"] = json!(2);
        req.reply(200, patched.clone());
        // An Error from generation 1 is not this write's outcome: keep waiting.
        let req = next(&mut api).await;
        req.reply(200, patched.clone());
        let req = next(&mut api).await;
        patched["status"] = json!({"syncStatus": "Error", "observedGeneration": 2,
            "lastError": "HSMDevice prod-hsm: primary worker-1 refused the write (read-only since 11:00)"});
        req.reply(200, patched);
        no_more_calls(&mut api).await;
    });
    let ran = run(&["update", "db", "--from-literal", "a=1"], client).await;
    assert_eq!(
        ran.error(),
        "import into HSMSecret shop/db failed: HSMDevice prod-hsm: primary worker-1 refused the write (read-only since 11:00)"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn delete_key_sends_a_removal_import_in_merge_mode() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let spec = json!({"deviceRef": "prod-hsm"});
        let req = next(&mut api).await;
        assert_eq!(req.method, "GET");
        req.reply(
            200,
            hsmsecret("db", spec.clone(), json!({"keys": ["a", "b", "c"]})),
        );
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("POST", "/api/v1/namespaces/shop/secrets")
        );
        assert_eq!(
            req.body["metadata"]["annotations"],
            json!({"hsmsecrets.io/remove-keys": "a,c"})
        );
        assert_eq!(req.body["data"], json!({}));
        let mut created = req.body.clone();
        created["metadata"]["name"] = json!("db-import-rm");
        created["metadata"]["resourceVersion"] = json!("9");
        req.reply(201, created);
        let req = next(&mut api).await;
        assert_eq!(req.method, "PATCH");
        assert_eq!(req.body["spec"]["source"]["mode"], "Merge");
        assert_eq!(
            req.body["spec"]["source"]["secretRef"]["name"],
            "db-import-rm"
        );
        req.reply(
            200,
            hsmsecret("db", spec.clone(), json!({"keys": ["a", "b", "c"]})),
        );
        let req = next(&mut api).await;
        req.reply(
            200,
            hsmsecret(
                "db",
                spec,
                json!({"keys": ["b"], "version": 5, "importedSourceVersion": "9"}),
            ),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(&["delete", "db", "--key", "a,c"], client).await;
    ran.result.as_ref().unwrap();
    assert_eq!(ran.out, "hsmsecret shop/db imported (version 5; keys: b)\n");
    server.await.unwrap();
}

#[tokio::test]
async fn delete_refuses_unknown_keys_and_removing_every_key() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let req = next(&mut api).await;
            req.reply(
                200,
                hsmsecret(
                    "db",
                    json!({"deviceRef": "prod-hsm"}),
                    json!({"keys": ["a", "b"]}),
                ),
            );
        }
        no_more_calls(&mut api).await;
    });
    let ran = run(&["delete", "db", "--key", "zzz"], client.clone()).await;
    assert_eq!(
        ran.error(),
        "HSMSecret shop/db has no key \"zzz\" (its keys: a, b)"
    );
    let ran = run(&["delete", "db", "--key", "a,b"], client).await;
    assert!(
        ran.error()
            .contains("delete the whole secret instead: kubectl hsm delete db")
    );
    server.await.unwrap();
}

#[tokio::test]
async fn delete_purge_sets_the_deletion_policy_then_deletes() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let spec = json!({"deviceRef": "prod-hsm"});
        let req = next(&mut api).await;
        req.reply(200, hsmsecret("db", spec.clone(), json!({})));
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("PATCH", &*format!("{SECRETS}/db"))
        );
        assert_eq!(req.body, json!({"spec": {"deletionPolicy": "Delete"}}));
        req.reply(200, hsmsecret("db", spec.clone(), json!({})));
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("DELETE", &*format!("{SECRETS}/db"))
        );
        req.reply(200, hsmsecret("db", spec, json!({})));
        no_more_calls(&mut api).await;
    });
    let ran = run(&["delete", "db", "--purge"], client).await;
    ran.result.as_ref().unwrap();
    assert_eq!(
        ran.out,
        "hsmsecret shop/db deleted; the controller deletes the HSM data (deletionPolicy Delete)\n"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn failover_annotates_the_device_and_polls_until_the_target_is_primary() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("GET", &*format!("{DEVICES}/prod-hsm"))
        );
        req.reply(
            200,
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
        );
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("PATCH", &*format!("{DEVICES}/prod-hsm"))
        );
        assert_eq!(
            req.body,
            json!({"metadata": {"annotations": {"hsmsecrets.io/switchover-to": "worker-2"}}})
        );
        req.reply(
            200,
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
        );
        let catching_up = json!({"phase": "Degraded", "conditions": [{
            "type": "Ready", "status": "False", "reason": "Switchover",
            "message": "waiting for worker-2 to catch up (41/42)",
            "lastTransitionTime": "2025-01-01T12:00:00Z"}]});
        for _ in 0..2 {
            let req = next(&mut api).await;
            assert_eq!(
                (req.method.as_str(), req.path()),
                ("GET", &*format!("{DEVICES}/prod-hsm"))
            );
            req.reply(
                200,
                device("ReadOnly", "worker-1", three_nodes(), catching_up.clone()),
            );
        }
        let req = next(&mut api).await;
        let mut done = device("ReadOnly", "worker-2", three_nodes(), json!({}));
        done["status"]["epoch"] = json!(4);
        req.reply(200, done);
        no_more_calls(&mut api).await;
    });
    let ran = run(&["failover", "prod-hsm", "--to", "worker-2"], client).await;
    ran.result.as_ref().unwrap();
    assert_eq!(
        ran.out,
        "hsmdevice prod-hsm: worker-2 is now the primary (epoch 4, phase Ready)\n"
    );
    // Progress is printed once per change, not once per poll.
    assert_eq!(
        ran.err.matches("waiting for worker-2 to catch up").count(),
        1,
        "{}",
        ran.err
    );
    assert!(
        ran.err
            .contains("phase Degraded, primary worker-1, epoch 3; Ready=False (Switchover)")
    );
    server.await.unwrap();
}

#[tokio::test]
async fn failover_force_asks_the_controller_to_promote_a_node_that_is_behind() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(req.method, "GET");
        req.reply(
            200,
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
        );
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("PATCH", &*format!("{DEVICES}/prod-hsm"))
        );
        assert_eq!(
            req.body,
            json!({"metadata": {"annotations": {"hsmsecrets.io/switchover-to": "worker-2,force"}}})
        );
        req.reply(
            200,
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(
        &[
            "failover",
            "prod-hsm",
            "--to",
            "worker-2",
            "--force",
            "--wait=false",
        ],
        client,
    )
    .await;
    ran.result.as_ref().unwrap();
    assert!(
        ran.out.contains("switchover to worker-2 requested"),
        "{}",
        ran.out
    );
    server.await.unwrap();
}

#[tokio::test]
async fn failover_refuses_before_writing() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        for dev in [
            device("None", "worker-1", three_nodes(), json!({})),
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
        ] {
            let req = next(&mut api).await;
            assert_eq!(req.method, "GET");
            req.reply(200, dev);
        }
        let req = next(&mut api).await;
        req.reply(404, not_found("hsmdevices", "nope"));
        no_more_calls(&mut api).await;
    });
    let ran = run(
        &["failover", "prod-hsm", "--to", "worker-2"],
        client.clone(),
    )
    .await;
    assert!(
        ran.error().contains("has mirroring policy None"),
        "{}",
        ran.error()
    );
    let ran = run(
        &["failover", "prod-hsm", "--to", "worker-9"],
        client.clone(),
    )
    .await;
    assert_eq!(
        ran.error(),
        "refusing to fail over: worker-9 is not a node of HSMDevice prod-hsm (its nodes: worker-1, worker-2, worker-3); pick one from `kubectl hsm mirror status prod-hsm`"
    );
    let ran = run(
        &["failover", "prod-hsm", "--to", "worker-1"],
        client.clone(),
    )
    .await;
    assert!(
        ran.error().contains("worker-1 is already the primary"),
        "{}",
        ran.error()
    );
    let ran = run(
        &["failover", "prod-hsm", "--to", "worker-3"],
        client.clone(),
    )
    .await;
    assert!(
        ran.error()
            .contains("worker-3 is Unhealthy in HSMDevice prod-hsm (agent down)")
    );
    let ran = run(&["failover", "nope", "--to", "worker-3"], client).await;
    assert_eq!(
        ran.error(),
        "HSMDevice nope not found; see the devices with `kubectl hsm devices`"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn failover_times_out_with_how_to_follow_up_or_cancel() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        // Answer every call until the client gives up.
        while let Some((req, respond)) = api.next_request().await {
            let body = device("ReadOnly", "worker-1", three_nodes(), json!({}));
            assert!(req.method() == "GET" || req.method() == "PATCH");
            respond.send_response(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    let ran = run(
        &[
            "failover",
            "prod-hsm",
            "--to",
            "worker-2",
            "--timeout",
            "1s",
        ],
        client,
    )
    .await;
    let msg = ran.error();
    assert!(
        msg.starts_with(
            "timed out after 1s waiting for HSMDevice prod-hsm to make worker-2 its primary"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("kubectl annotate hsmdevice prod-hsm hsmsecrets.io/switchover-to-"),
        "{msg}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_missing_crd_says_how_to_install_it() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        // Unknown API group: the API server answers with a plain-text 404.
        let (req, respond) = api.next_request().await.unwrap();
        assert_eq!((req.method().as_str(), req.uri().path()), ("GET", SECRETS));
        respond.send_response(
            http::Response::builder()
                .status(404)
                .body(kube::client::Body::from(b"404 page not found\n".to_vec()))
                .unwrap(),
        );
        // Group known, resource not: a Status without details.
        let req = next(&mut api).await;
        assert_eq!(req.path(), DEVICES);
        req.reply(
            404,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
        let req = next(&mut api).await;
        assert_eq!(req.path(), format!("{SECRETS}/db"));
        req.reply(
            404,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
        // A real missing object is not mistaken for a missing CRD.
        let req = next(&mut api).await;
        req.reply(404, not_found("hsmsecrets", "db"));
        no_more_calls(&mut api).await;
    });
    let ran = run(&["list"], client.clone()).await;
    assert_eq!(
        ran.error(),
        "the HSMSecret CRD is not installed: kubectl apply -k manifests/"
    );
    let ran = run(&["devices"], client.clone()).await;
    assert_eq!(
        ran.error(),
        "the HSMDevice CRD is not installed: kubectl apply -k manifests/"
    );
    let ran = run(&["get", "db"], client.clone()).await;
    assert_eq!(ran.result.as_ref().unwrap_err().kind(), "crd_missing");
    let ran = run(&["get", "db"], client).await;
    assert_eq!(
        ran.error(),
        "HSMSecret shop/db not found; see what exists with `kubectl hsm list -n shop`"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn rbac_denials_name_the_verb_and_resource() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        req.reply(
            403,
            status(403, "Forbidden", "hsmsecrets.hsmsecrets.io is forbidden: User \"dev\" cannot list resource \"hsmsecrets\" in API group \"hsmsecrets.io\" in the namespace \"shop\""),
        );
        let req = next(&mut api).await;
        assert_eq!(req.path(), "/api/v1/namespaces/shop/secrets");
        req.reply(
            403,
            status(403, "Forbidden", "secrets is forbidden: User \"dev\" cannot create resource \"secrets\" in API group \"\" in the namespace \"shop\""),
        );
        let req = next(&mut api).await;
        req.reply(
            200,
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
        );
        let req = next(&mut api).await;
        assert_eq!(req.method, "PATCH");
        req.reply(
            403,
            status(403, "Forbidden", "hsmdevices.hsmsecrets.io \"prod-hsm\" is forbidden: User \"dev\" cannot patch resource \"hsmdevices\""),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(&["list"], client.clone()).await;
    let msg = ran.error();
    assert!(
        msg.starts_with(
            "forbidden: you may not list hsmsecrets.hsmsecrets.io in namespace shop (RBAC)"
        ),
        "{msg}"
    );
    assert!(msg.contains("User \"dev\" cannot list"), "{msg}");
    let ran = run(
        &["create", "db", "--device", "d", "--from-literal", "a=1"],
        client.clone(),
    )
    .await;
    assert!(
        ran.error()
            .starts_with("forbidden: you may not create secrets in namespace shop (RBAC)"),
        "{}",
        ran.error()
    );
    assert_eq!(ran.result.unwrap_err().exit_code(), 1);
    // A device read that worked, then a patch that RBAC refuses.
    let ran = run(&["failover", "prod-hsm", "--to", "worker-2"], client).await;
    assert!(
        ran.error().starts_with(
            "forbidden: you may not patch hsmdevices.hsmsecrets.io (cluster-scoped) (RBAC)"
        ),
        "{}",
        ran.error()
    );
    server.await.unwrap();
}

#[tokio::test]
async fn get_never_prints_values_without_show_values_even_with_a_secret_copy() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        for _ in 0..3 {
            let req = next(&mut api).await;
            // Only the HSMSecret is read: the Secret copy is never fetched.
            assert_eq!(
                (req.method.as_str(), req.path()),
                ("GET", &*format!("{SECRETS}/db"))
            );
            req.reply(
                200,
                hsmsecret(
                    "db",
                    json!({"deviceRef": "prod-hsm", "secretName": "db-copy"}),
                    json!({"syncStatus": "InSync", "keys": ["password", "username"]}),
                ),
            );
        }
        no_more_calls(&mut api).await;
    });
    for args in [
        &["get", "db"][..],
        &["get", "db", "-o", "json"][..],
        &["get", "db", "-o", "yaml", "--key", "password"][..],
    ] {
        let ran = run(args, client.clone()).await;
        ran.result.as_ref().unwrap();
        assert!(ran.out.contains("password"), "{}", ran.out);
        assert!(!ran.out.contains("hunter2"), "{}", ran.out);
        assert!(
            ran.out.contains("<hidden>") || ran.out.contains("valuesShown"),
            "{}",
            ran.out
        );
    }
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn get_show_values_reads_the_secret_copy() {
    let (client, mut api) = mock_api::client();
    let copy = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "db-copy", "namespace": "shop"},
        "data": {"password": "aHVudGVyMg==", "username": "YXBw"}});
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let req = next(&mut api).await;
            req.reply(
                200,
                hsmsecret(
                    "db",
                    json!({"deviceRef": "prod-hsm", "secretName": "db-copy"}),
                    json!({"keys": ["password", "username"]}),
                ),
            );
            let req = next(&mut api).await;
            assert_eq!(
                (req.method.as_str(), req.path()),
                ("GET", "/api/v1/namespaces/shop/secrets/db-copy")
            );
            req.reply(200, copy.clone());
        }
        // Without a copy there is nothing to read values from.
        let req = next(&mut api).await;
        req.reply(
            200,
            hsmsecret(
                "db",
                json!({"deviceRef": "prod-hsm"}),
                json!({"keys": ["password"]}),
            ),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(
        &["get", "db", "--show-values", "-o", "json"],
        client.clone(),
    )
    .await;
    ran.result.as_ref().unwrap();
    let v: Value = serde_json::from_str(&ran.out).unwrap();
    assert_eq!(v["valuesShown"], true);
    assert_eq!(
        v["keys"][0],
        json!({"name": "password", "value": "hunter2"})
    );
    // One key as text: the raw value, for $(...).
    let ran = run(
        &["get", "db", "--show-values", "--key", "password"],
        client.clone(),
    )
    .await;
    ran.result.as_ref().unwrap();
    assert_eq!(ran.out, "hunter2");
    let ran = run(&["get", "db", "--show-values"], client).await;
    assert_eq!(
        ran.error(),
        "HSMSecret shop/db keeps no Kubernetes Secret copy, so its values are only mounted into pods; to read them here, set spec.secretName on the HSMSecret (the controller then keeps a Secret of that name in sync)"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn list_all_namespaces_and_empty_lists() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("GET", "/apis/hsmsecrets.io/v1alpha1/hsmsecrets")
        );
        req.reply(200, json!({"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecretList", "metadata": {}, "items": [
            hsmsecret("db", json!({"deviceRef": "prod-hsm"}), json!({"syncStatus": "InSync", "keys": ["a"]}))
        ]}));
        let req = next(&mut api).await;
        assert_eq!(req.path(), SECRETS);
        req.reply(200, json!({"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecretList", "metadata": {}, "items": []}));
        no_more_calls(&mut api).await;
    });
    let ran = run(&["list", "-A"], client.clone()).await;
    ran.result.as_ref().unwrap();
    assert!(
        ran.out.starts_with("NAMESPACE   NAME   DEVICE"),
        "{}",
        ran.out
    );
    assert!(
        ran.out.contains("shop        db     prod-hsm   InSync"),
        "{}",
        ran.out
    );
    let ran = run(&["list"], client).await;
    ran.result.as_ref().unwrap();
    assert_eq!(ran.out, "");
    assert_eq!(ran.err, "No HSMSecrets found in namespace shop.\n");
    server.await.unwrap();
}

#[tokio::test]
async fn health_exits_non_zero_when_a_device_is_not_ready() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!((req.method.as_str(), req.path()), ("GET", DEVICES));
        let mut degraded = device(
            "ReadOnly",
            "worker-1",
            three_nodes(),
            json!({"phase": "Degraded"}),
        );
        degraded["metadata"]["name"] = json!("edge-hsm");
        req.reply(200, json!({"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMDeviceList", "metadata": {}, "items": [
            device("ReadOnly", "worker-1", three_nodes(), json!({})), degraded
        ]}));
        no_more_calls(&mut api).await;
    });
    let ran = run(&["health"], client).await;
    assert_eq!(ran.error(), "1 of 2 devices not Ready: edge-hsm (Degraded)");
    assert_eq!(ran.result.as_ref().unwrap_err().exit_code(), 1);
    assert!(
        ran.out
            .contains("edge-hsm   Degraded   worker-3   ReadOnly   Unhealthy"),
        "{}",
        ran.out
    );
    server.await.unwrap();
}

#[tokio::test]
async fn an_unreachable_cluster_points_at_the_kubeconfig_flags() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: dead\nclusters:\n- name: dead\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: dead\n  context: {{cluster: dead, user: u, namespace: team-a}}\nusers:\n- name: u\n  user: {{token: t}}\n"
        ),
    )
    .unwrap();
    let cli = Cli::try_parse_from([
        "kubectl-hsm",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "list",
    ])
    .unwrap();
    let session = hsm_secrets::kubectl::connect(&cli.global).await.unwrap();
    assert_eq!(session.namespace, "team-a");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut term = Term {
        out: &mut out,
        err: &mut err,
    };
    let result = hsm_secrets::kubectl::run(cli, &mut NoPrompt, &mut term).await;
    let msg = result.unwrap_err().to_string();
    assert!(msg.starts_with("cannot reach the cluster: "), "{msg}");
    assert!(msg.ends_with("; check --context/--kubeconfig"), "{msg}");

    let cli = Cli::try_parse_from([
        "kubectl-hsm",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--context",
        "missing",
        "devices",
    ])
    .unwrap();
    let msg = hsm_secrets::kubectl::run(cli, &mut NoPrompt, &mut term)
        .await
        .unwrap_err()
        .to_string();
    // An unknown context is the kubeconfig's problem, not the cluster's.
    assert!(msg.contains("no context named \"missing\""), "{msg}");
    assert!(msg.contains("kubectl config get-contexts"), "{msg}");
    assert!(!msg.contains("cannot reach"), "{msg}");
}

/// What the real API server did with the webhook's read-only refusal: it relayed the
/// webhook's status code (503). The command must print the denial at once, send the
/// HSMSecret write exactly once, and take the import Secret back. This goes through the
/// client `kubectl hsm` really builds (`client_for`), over HTTP, where kube's default
/// retry of 503 answers lived.
#[tokio::test]
async fn a_read_only_denial_over_http_returns_at_once_and_leaves_no_import_secret() {
    use axum::extract::State;
    use axum::routing::{delete, post};
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Calls {
        secret_creates: usize,
        hsmsecret_creates: usize,
        secret_deletes: Vec<String>,
    }
    type Shared = Arc<Mutex<Calls>>;
    let denial = "admission webhook \"validate.hsmsecrets.io\" denied the request: HSMSecret shop/db imports data into HSMDevice prod-hsm, which has no writable primary";
    let calls: Shared = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/v1/namespaces/shop/secrets",
            post(
                |State(c): State<Shared>, body: axum::Json<Value>| async move {
                    c.lock().unwrap().secret_creates += 1;
                    let mut created = body.0;
                    created["metadata"]["name"] = json!("db-import-x7k2p");
                    created["metadata"]["resourceVersion"] = json!("11");
                    (http::StatusCode::CREATED, axum::Json(created))
                },
            ),
        )
        .route(
            "/apis/hsmsecrets.io/v1alpha1/namespaces/shop/hsmsecrets",
            post(move |State(c): State<Shared>| async move {
                c.lock().unwrap().hsmsecret_creates += 1;
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(status(503, "ServiceUnavailable", denial)),
                )
            }),
        )
        .route(
            "/api/v1/namespaces/shop/secrets/{name}",
            delete(
                |State(c): State<Shared>,
                 axum::extract::Path(name): axum::extract::Path<String>| async move {
                    c.lock().unwrap().secret_deletes.push(name);
                    axum::Json(status(200, "", ""))
                },
            ),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url: http::Uri = format!("http://{}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = hsm_secrets::kubectl::client_for(kube::Config::new(url)).unwrap();

    let started = std::time::Instant::now();
    let ran = tokio::time::timeout(
        Duration::from_secs(60),
        run(
            &[
                "create",
                "db",
                "--device",
                "prod-hsm",
                "--from-literal",
                "a=1",
            ],
            client,
        ),
    )
    .await
    .expect("the denial reached the user within a minute");
    let took = started.elapsed();
    assert!(
        ran.error().contains("no writable primary"),
        "{}",
        ran.error()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let calls = calls.lock().unwrap();
    assert_eq!(calls.secret_creates, 1);
    assert_eq!(calls.hsmsecret_creates, 1, "the refused write was retried");
    assert_eq!(calls.secret_deletes, ["db-import-x7k2p"]);
    server.abort();
}

/// A node plugin's `/mounts` answer, produced by the plugin's own audit log and ops
/// router after one publish of `shop/db` (version 7) into pod web-0.
async fn plugin_mounts_answer(query: &str) -> Value {
    use hsm_secrets::node::audit::{ReadFrom, SecretVersion, VolumeRead};
    use hsm_secrets::node::{AuditLog, Mounts};
    use hsm_secrets_csi::{Operation, OperationKind, PublishRequest};
    use std::sync::Arc;
    use tower::ServiceExt;

    let target =
        std::path::Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/hsm/mount");
    let mounts = Arc::new(Mounts::default());
    let mut registry = prometheus_client::registry::Registry::default();
    let audit = AuditLog::new(
        "worker-2",
        Box::new(std::io::sink()),
        mounts.clone(),
        &mut registry,
    );
    let request = PublishRequest {
        volume_id: "v1".into(),
        target_path: target.into(),
        volume_context: [
            ("csi.storage.k8s.io/pod.namespace", "shop"),
            ("csi.storage.k8s.io/pod.name", "web-0"),
            ("csi.storage.k8s.io/pod.uid", "u1"),
            ("csi.storage.k8s.io/serviceAccount.name", "web"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        read_only: true,
        fs_group: None,
        republish: false,
    };
    mounts.read(
        target,
        VolumeRead {
            device: "prod-hsm".into(),
            read_from: ReadFrom::LocalMirror,
            secrets: vec![SecretVersion {
                name: "db".into(),
                version: Some(7),
            }],
        },
    );
    hsm_secrets_csi::NodeObserver::finished(
        &audit,
        &Operation {
            kind: OperationKind::Publish,
            volume_id: "v1",
            target,
            request: Some(&request),
            outcome: "ok",
            changed: true,
            error: None,
        },
    );
    struct Never;
    #[async_trait::async_trait]
    impl hsm_secrets_csi::VolumeSource for Never {
        async fn payload(
            &self,
            _: &PublishRequest,
        ) -> Result<hsm_secrets_csi::Payload, hsm_secrets_csi::SourceError> {
            unreachable!()
        }
        async fn ready(&self) -> Result<(), hsm_secrets_csi::SourceError> {
            Ok(())
        }
    }
    let router = hsm_secrets::node::ops::router(Arc::new(registry), Arc::new(Never), Some(mounts));
    let response = router
        .oneshot(
            http::Request::get(format!("/mounts?{query}"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn plugin_pod(name: &str, node: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": "hsm-secrets-system"}, "spec": {"nodeName": node, "containers": []}})
}

#[tokio::test]
async fn mounts_asks_every_node_plugin_through_the_pod_proxy_and_names_the_unreachable() {
    let answer = plugin_mounts_answer("namespace=shop&secret=db").await;
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("GET", "/api/v1/namespaces/hsm-secrets-system/pods")
        );
        assert!(
            req.path_and_query.contains(
                "labelSelector=app.kubernetes.io%2Fname%3Dhsm-secrets%2Capp.kubernetes.io%2Fcomponent%3Dnode"
            ),
            "{}",
            req.path_and_query
        );
        req.reply(
            200,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                   "items": [plugin_pod("node-a", "worker-1"), plugin_pod("node-b", "worker-2")]}),
        );
        let req = next(&mut api).await;
        assert_eq!(
            req.path_and_query,
            "/api/v1/namespaces/hsm-secrets-system/pods/node-a:8080/proxy/mounts?namespace=shop&secret=db"
        );
        req.reply(
            503,
            status(503, "ServiceUnavailable", "no endpoints available"),
        );
        let req = next(&mut api).await;
        assert_eq!(
            req.path(),
            "/api/v1/namespaces/hsm-secrets-system/pods/node-b:8080/proxy/mounts"
        );
        req.reply(200, answer);
        no_more_calls(&mut api).await;
    });
    let ran = run(&["mounts", "db"], client).await;
    ran.result.as_ref().unwrap();
    server.await.unwrap();
    let lines: Vec<&str> = ran.out.lines().collect();
    assert_eq!(lines.len(), 2, "{}", ran.out);
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..6],
        ["shop", "web-0", "db", "7", "worker-2", "local_mirror"],
        "{}",
        ran.out
    );
    assert!(
        ran.err.contains("worker-1"),
        "the unreachable plugin is named: {}",
        ran.err
    );
}

#[tokio::test]
async fn mounts_without_pods_proxy_rights_says_which_rbac_is_missing() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        req.reply(
            200,
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                   "items": [plugin_pod("node-a", "worker-1")]}),
        );
        let req = next(&mut api).await;
        req.reply(
            403,
            status(
                403,
                "Forbidden",
                "pods \"node-a\" is forbidden: User \"dev\" cannot get resource \"pods/proxy\"",
            ),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(&["mounts", "-o", "json"], client).await;
    let error = ran.error();
    assert!(
        error.contains("pods/proxy") && error.contains("RBAC"),
        "{error}"
    );
    server.await.unwrap();
}

fn backed_up(extra_status: Value) -> Value {
    let mut d = device("ReadOnly", "worker-1", three_nodes(), extra_status);
    d["spec"]["backup"] =
        json!({"url": "s3://hsm-archive/site-a", "credentialsSecret": "hsm-archive"});
    d
}

#[tokio::test]
async fn backup_verify_annotates_the_device_and_fails_when_the_drill_does_not_verify() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("GET", &*format!("{DEVICES}/prod-hsm"))
        );
        req.reply(200, backed_up(json!({})));
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("PATCH", &*format!("{DEVICES}/prod-hsm"))
        );
        // The request id is the time it was asked; the controller echoes it back.
        let id = req.body["metadata"]["annotations"]["hsmsecrets.io/backup-verify"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(id.parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "{id}");
        req.reply(200, backed_up(json!({})));
        let req = next(&mut api).await;
        req.reply(200, backed_up(json!({})));
        let failed = json!({"backup": {"node": "worker-1", "archivedSequence": 40, "lagSequences": 2,
            "lastVerified": {"request": id, "verified": false, "sequence": 40, "secrets": 7,
                "durationMs": 12, "finishedAt": "2026-12-07T08:00:00Z",
                "message": "1 path(s) differ from the device: shop/db"}}});
        for _ in 0..2 {
            let req = next(&mut api).await;
            req.reply(200, backed_up(failed.clone()));
        }
        no_more_calls(&mut api).await;
    });
    let ran = run(&["backup", "verify", "prod-hsm"], client).await;
    let error = ran.error();
    assert!(
        error.contains("did not verify") && error.contains("shop/db") && error.contains("worker-1"),
        "{error}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn backup_list_shows_lag_points_and_drill_and_refuses_a_device_without_backup() {
    let (client, mut api) = mock_api::client();
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        req.reply(200, backed_up(json!({
            "conditions": [{"type": "BackupArchived", "status": "True", "reason": "UpToDate",
                "message": "the archive keeps within 60 s of the primary",
                "lastTransitionTime": "2026-12-07T07:00:00Z"}],
            "backup": {"node": "worker-1", "archivedSequence": 42, "lagSequences": 0, "lagSeconds": 0,
                "bases": [{"epoch": 3, "sequence": 30, "time": "2026-12-07T06:00:00Z"},
                          {"epoch": 3, "sequence": 41, "time": "2026-12-07T07:00:00Z"}],
                "lastVerified": {"request": "scheduled:first", "verified": true, "sequence": 41,
                    "secrets": 7, "durationMs": 12, "finishedAt": "2026-12-07T07:01:00Z"}}})));
        let req = next(&mut api).await;
        req.reply(
            200,
            device("ReadOnly", "worker-1", three_nodes(), json!({})),
        );
        no_more_calls(&mut api).await;
    });
    let ran = run(&["backup", "list", "prod-hsm"], client.clone()).await;
    ran.result.as_ref().unwrap();
    for want in [
        "archived through sequence 42 on worker-1",
        "BackupArchived=True UpToDate",
        "last drill: verified at sequence 41 (7 secrets, 12 ms)",
        "2026-12-07T07:00:00Z",
        "SEQUENCE",
    ] {
        assert!(ran.out.contains(want), "{want}: {}", ran.out);
    }
    let refused = run(&["backup", "now", "prod-hsm"], client).await;
    let error = refused.error();
    assert!(
        error.contains("no spec.backup") && error.contains("credentialsSecret"),
        "{error}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn restore_names_the_base_asks_by_annotation_and_reports_what_was_restored() {
    let (client, mut api) = mock_api::client();
    let bases = json!({"backup": {"node": "worker-1", "archivedSequence": 90, "lagSequences": 0,
        "bases": [{"epoch": 3, "sequence": 30, "time": "2026-12-07T06:00:00Z"},
                  {"epoch": 3, "sequence": 60, "time": "2026-12-07T07:00:00Z"}]}});
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        req.reply(200, backed_up(bases.clone()));
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("PATCH", &*format!("{DEVICES}/prod-hsm"))
        );
        let value = req.body["metadata"]["annotations"]["hsmsecrets.io/restore"]
            .as_str()
            .unwrap()
            .to_string();
        let asked: Value = serde_json::from_str(&value).unwrap();
        assert_eq!(
            (asked["toSequence"].clone(), asked["force"].clone()),
            (json!(45), json!(true))
        );
        let id = asked["id"].as_str().unwrap().to_string();
        req.reply(200, backed_up(bases.clone()));
        let mut done = bases.clone();
        done["backup"]["lastRestore"] = json!({"request": id, "succeeded": true, "sequence": 44,
            "time": "2026-12-07T06:30:00Z", "secrets": 12, "bytes": 3400,
            "finishedAt": "2026-12-07T08:00:00Z"});
        let req = next(&mut api).await;
        req.reply(200, backed_up(done));
        // Earlier than every base: refused before writing anything.
        let req = next(&mut api).await;
        req.reply(200, backed_up(bases));
        no_more_calls(&mut api).await;
    });
    let ran = run(
        &["restore", "prod-hsm", "--to-sequence", "45", "--force"],
        client.clone(),
    )
    .await;
    ran.result.as_ref().unwrap();
    assert!(
        ran.err.contains("from the base at sequence 30"),
        "{}",
        ran.err
    );
    assert_eq!(
        ran.out,
        "hsmdevice prod-hsm: restored to archive sequence 44 written 2026-12-07T06:30:00Z (12 secrets, 3400 bytes)\n"
    );
    let early = run(&["restore", "prod-hsm", "--to-sequence", "10"], client).await;
    let error = early.error();
    assert!(
        error.contains("no archived point that early") && error.contains("sequence 30"),
        "{error}"
    );
    server.await.unwrap();
}

fn passive(extra_status: Value) -> Value {
    let mut d = device("ReadOnly", "worker-1", three_nodes(), extra_status);
    d["spec"]["site"] = json!({"name": "site-b", "followArchive": {"url": "s3://dr/x",
        "credentialsSecret": "hsm-archive", "device": "prod-hsm-a"}});
    d
}

#[tokio::test]
async fn site_promote_shows_both_sites_and_promotes_only_when_confirmed() {
    let (client, mut api) = mock_api::client();
    let following = json!({"site": {"name": "site-b", "role": "Passive", "siteEpoch": 0,
        "sourceSequence": 120, "sourceTime": "2026-12-07T08:00:05Z",
        "appliedSequence": 118, "appliedTime": "2026-12-07T08:00:04Z", "lagSeconds": 1}});
    let server = tokio::spawn(async move {
        // The preflight alone: read, print, write nothing.
        let req = next(&mut api).await;
        req.reply(200, passive(following.clone()));
        // Confirmed.
        let req = next(&mut api).await;
        req.reply(200, passive(following.clone()));
        let req = next(&mut api).await;
        assert_eq!(req.method.as_str(), "PATCH");
        let id = req.body["metadata"]["annotations"]["hsmsecrets.io/site-promote"]
            .as_str()
            .unwrap()
            .to_string();
        req.reply(200, passive(following.clone()));
        let req = next(&mut api).await;
        let promoted = passive(json!({"site": {"name": "site-b", "role": "Active",
            "siteEpoch": 1, "lastPromotion": id}}));
        req.reply(200, promoted.clone());
        // The promoted site follows nothing any more.
        let req = next(&mut api).await;
        assert_eq!(req.method.as_str(), "PATCH");
        assert_eq!(req.body, json!({"spec": {"site": {"followArchive": null}}}));
        req.reply(200, promoted);
        no_more_calls(&mut api).await;
    });
    let preflight = run(&["site", "promote", "prod-hsm"], client.clone()).await;
    preflight.result.as_ref().unwrap();
    for want in [
        "follows HSMDevice prod-hsm-a",
        "120",
        "118",
        "loses 2 archived change(s)",
        "not promoted: this is the preflight",
        "--yes",
    ] {
        assert!(preflight.out.contains(want), "{want}: {}", preflight.out);
    }
    let promoted = run(&["site", "promote", "prod-hsm", "--yes"], client).await;
    promoted.result.as_ref().unwrap();
    assert!(
        promoted
            .out
            .contains("site site-b is active at site epoch 1"),
        "{}",
        promoted.out
    );
    server.await.unwrap();
}
