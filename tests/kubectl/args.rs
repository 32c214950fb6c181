//! `kubectl hsm` argument handling: clap parse errors, validation of names and keys,
//! key sources (literals, files, env files, prompt), and exit codes.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::time::Duration;

use clap::Parser;
use clap::error::ErrorKind;
use hsm_secrets::crd::ImportMode;
use hsm_secrets::kubectl::args::{ImportVerb, Request, parse_timeout};
use hsm_secrets::kubectl::input::{self, KeySet};
use hsm_secrets::kubectl::{Cli, KubectlError, Prompt, SecretValue, Term};

/// A prompt a test scripts (a person at a terminal, or nobody).
struct ScriptedPrompt(Option<Vec<(&'static str, &'static str)>>);

impl Prompt for ScriptedPrompt {
    fn available(&self) -> bool {
        self.0.is_some()
    }
    fn read_entries(
        &mut self,
        _term: &mut Term<'_>,
    ) -> Result<Vec<(String, SecretValue)>, KubectlError> {
        Ok(self
            .0
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_string(), SecretValue::new(v.as_bytes().to_vec())))
            .collect())
    }
}

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("kubectl-hsm").chain(args.iter().copied()))
}

fn request_with(args: &[&str], prompt: &mut ScriptedPrompt) -> Result<Request, KubectlError> {
    let cli = parse(args).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut term = Term {
        out: &mut out,
        err: &mut err,
    };
    Request::from_cli(&cli, prompt, &mut term)
}

fn request(args: &[&str]) -> Result<Request, KubectlError> {
    request_with(args, &mut ScriptedPrompt(None))
}

fn usage_error(args: &[&str]) -> String {
    let err = request(args).unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert_eq!(err.kind(), "usage");
    err.to_string()
}

fn import(req: Request) -> hsm_secrets::kubectl::args::ImportRequest {
    match req {
        Request::Import(r) => r,
        other => panic!("not an import: {other:?}"),
    }
}

fn values(keys: &KeySet) -> Vec<(String, Vec<u8>)> {
    keys.iter()
        .map(|(k, v)| (k.to_string(), v.expose().to_vec()))
        .collect()
}

#[test]
fn clap_errors_name_the_missing_or_bad_flag() {
    let err = parse(&["failover", "prod-hsm"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    assert!(err.to_string().contains("--to <NODE>"), "{err}");
    assert_eq!(err.exit_code(), 2);

    let err = parse(&["create", "db", "--from-literal", "a=b"]).unwrap_err();
    assert!(err.to_string().contains("--device <DEVICE>"), "{err}");

    let err = parse(&["list", "-o", "xml"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidValue);
    assert!(err.to_string().contains("table, json, yaml"), "{err}");

    let err = parse(&["delete", "db", "--key", "a", "--purge"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ArgumentConflict);

    let err = parse(&["update", "db", "--timeout", "soon"]).unwrap_err();
    assert!(err.to_string().contains("use e.g. 60s"), "{err}");

    let err = parse(&["completion", "tcsh"]).unwrap_err();
    assert!(err.to_string().contains("bash, zsh, fish"), "{err}");

    let err = parse(&["mirror", "prod-hsm"]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidSubcommand);
}

#[test]
fn kubectl_style_global_flags_go_anywhere() {
    let cli = parse(&[
        "list",
        "-A",
        "--context",
        "prod",
        "--kubeconfig",
        "/tmp/kc",
        "-o",
        "wide",
    ])
    .unwrap();
    assert!(cli.global.all_namespaces);
    assert_eq!(cli.global.context.as_deref(), Some("prod"));
    assert_eq!(
        cli.global.kubeconfig.as_deref(),
        Some(std::path::Path::new("/tmp/kc"))
    );
    let cli = parse(&["-n", "shop", "get", "db", "--key", "a,b", "--key", "c"]).unwrap();
    assert_eq!(cli.global.namespace.as_deref(), Some("shop"));
    match request(&["-n", "shop", "get", "db", "--key", "a,b", "--key", "c"]).unwrap() {
        Request::Get(g) => {
            assert_eq!(g.keys, ["a", "b", "c"]);
            assert!(!g.show_values);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wait_and_timeout_flags() {
    let r = import(request(&["update", "db", "--from-literal", "a=1"]).unwrap());
    assert!(r.wait.enabled);
    assert_eq!(r.wait.timeout, Duration::from_secs(60));
    assert_eq!(r.mode, ImportMode::Merge);
    assert_eq!(r.verb, ImportVerb::Update);
    let r = import(
        request(&[
            "update",
            "db",
            "--from-literal",
            "a=1",
            "--wait=false",
            "--timeout",
            "1m30s",
            "--replace",
        ])
        .unwrap(),
    );
    assert!(!r.wait.enabled);
    assert_eq!(r.wait.timeout, Duration::from_secs(90));
    assert_eq!(r.mode, ImportMode::Replace);
    for (text, secs) in [("90", 90), ("2m", 120), ("1h", 3600), ("5s", 5)] {
        assert_eq!(parse_timeout(text).unwrap(), Duration::from_secs(secs));
    }
    for bad in ["", "m", "5x", "1m3", "-1s"] {
        assert!(parse_timeout(bad).is_err(), "{bad}");
    }
}

#[test]
fn create_always_replaces_and_needs_a_valid_device() {
    let r = import(
        request(&[
            "create",
            "db",
            "--device",
            "prod-hsm",
            "--from-literal",
            "a=1",
        ])
        .unwrap(),
    );
    assert_eq!(r.mode, ImportMode::Replace);
    assert_eq!(
        r.verb,
        ImportVerb::Create {
            device: "prod-hsm".into()
        }
    );
    let msg = usage_error(&[
        "create",
        "db",
        "--device",
        "Prod_HSM",
        "--from-literal",
        "a=1",
    ]);
    assert!(msg.contains("invalid device \"Prod_HSM\""), "{msg}");
}

#[test]
fn names_are_kubernetes_names() {
    let msg = usage_error(&["get", "DB"]);
    assert!(msg.contains("invalid HSMSecret name \"DB\""), "{msg}");
    let msg = usage_error(&["-n", "Shop", "list"]);
    assert!(msg.contains("invalid namespace \"Shop\""), "{msg}");
    let msg = usage_error(&["-n", "a.b", "list"]);
    assert!(msg.contains("invalid namespace"), "{msg}");
    let msg = usage_error(&["failover", "prod-hsm", "--to=-node"]);
    assert!(msg.contains("invalid node \"-node\""), "{msg}");
    let long = "a".repeat(64);
    let msg = usage_error(&["update", &long, "--from-literal", "a=1"]);
    assert!(msg.contains("longer than 63 characters"), "{msg}");
}

#[test]
fn all_namespaces_only_for_list() {
    let msg = usage_error(&["-A", "get", "db"]);
    assert!(
        msg.contains("-A/--all-namespaces applies only to `list`"),
        "{msg}"
    );
    assert!(matches!(request(&["list", "-A"]).unwrap(), Request::List(l) if l.all_namespaces));
}

#[test]
fn bad_key_names_are_refused_with_the_key_and_the_rule() {
    let msg = usage_error(&["update", "db", "--from-literal", "bad/key=v"]);
    assert!(msg.contains("\"bad/key\""), "{msg}");
    assert!(msg.contains("use only letters, digits"), "{msg}");
    let msg = usage_error(&["update", "db", "--from-literal", "..data=v"]);
    assert!(msg.contains("reserved"), "{msg}");
    let msg = usage_error(&["get", "db", "--key", "a b"]);
    assert!(msg.starts_with("--key: invalid key"), "{msg}");
    let msg = usage_error(&["delete", "db", "--key", "a", "--key", "a"]);
    assert!(msg.contains("given twice"), "{msg}");
}

#[test]
fn literal_without_equals_never_echoes_the_argument() {
    let msg = usage_error(&["update", "db", "--from-literal", "hunter2-no-equals"]);
    assert!(msg.contains("--from-literal needs KEY=VALUE"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    // The value may itself contain '=': only the first one splits.
    let r = import(request(&["update", "db", "--from-literal", "k=a=b"]).unwrap());
    assert_eq!(values(&r.keys), [("k".to_string(), b"a=b".to_vec())]);
}

#[test]
fn duplicate_keys_name_the_key_and_both_sources() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "from-file").unwrap();
    let msg = usage_error(&[
        "update",
        "db",
        "--from-literal",
        "password=x",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    assert!(msg.contains("key \"password\" is given twice"), "{msg}");
    assert!(msg.contains("--from-literal and --from-file"), "{msg}");
    assert!(!msg.contains("from-file\n") && !msg.contains("=x"), "{msg}");
}

#[test]
fn files_default_their_key_to_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("tls.crt");
    std::fs::write(&cert, b"\x00CERT\xff").unwrap();
    let other = dir.path().join("x.bin");
    std::fs::write(&other, b"renamed").unwrap();
    let r = import(
        request(&[
            "update",
            "db",
            "--from-file",
            cert.to_str().unwrap(),
            "--from-file",
            &format!("ca.pem={}", other.display()),
        ])
        .unwrap(),
    );
    assert_eq!(
        values(&r.keys),
        [
            ("ca.pem".to_string(), b"renamed".to_vec()),
            ("tls.crt".to_string(), b"\x00CERT\xff".to_vec()),
        ]
    );
    let missing = dir.path().join("nope");
    let err = request(&["update", "db", "--from-file", missing.to_str().unwrap()]).unwrap_err();
    assert_eq!(err.kind(), "input");
    assert!(err.to_string().contains("nope"), "{err}");
    let msg = usage_error(&["update", "db", "--from-file", "=/etc/hosts"]);
    assert!(msg.contains("empty key"), "{msg}");
}

#[test]
fn env_files_take_comments_quotes_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("app.env");
    let mut f = std::fs::File::create(&env).unwrap();
    writeln!(
        f,
        "# database\n\nexport DB_USER=app\nDB_PASS = \"p a\\\"ss\\n\"  # trailing comment\nSINGLE='lit $x \\n'\nPLAIN= spaced value \nEMPTY="
    )
    .unwrap();
    let r = import(request(&["update", "db", "--from-env-file", env.to_str().unwrap()]).unwrap());
    assert_eq!(
        values(&r.keys),
        [
            ("DB_PASS".to_string(), b"p a\"ss\n".to_vec()),
            ("DB_USER".to_string(), b"app".to_vec()),
            ("EMPTY".to_string(), b"".to_vec()),
            ("PLAIN".to_string(), b"spaced value".to_vec()),
            ("SINGLE".to_string(), b"lit $x \\n".to_vec()),
        ]
    );
}

#[test]
fn env_file_errors_name_file_and_line_not_the_value() {
    let path = std::path::Path::new("app.env");
    let err = input::parse_env_file("A=1\nno equals sign here\n", path).unwrap_err();
    assert_eq!(err.to_string(), "app.env:2: expected KEY=VALUE");
    let err = input::parse_env_file("TOKEN=\"s3cret-unterminated\n", path).unwrap_err();
    assert_eq!(
        err.to_string(),
        "app.env:1: unterminated double quote in the value of \"TOKEN\""
    );
    let err = input::parse_env_file("TOKEN='abc' trailing-s3cret\n", path).unwrap_err();
    assert!(!err.to_string().contains("s3cret"), "{err}");
    // Duplicates inside one env file name both lines.
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("dup.env");
    std::fs::write(&env, "A=1\nB=2\nA=3\n").unwrap();
    let msg = usage_error(&["update", "db", "--from-env-file", env.to_str().unwrap()]);
    assert!(msg.contains("key \"A\" is given twice"), "{msg}");
    assert!(msg.contains("dup.env:1 and"), "{msg}");
    assert!(msg.contains("dup.env:3"), "{msg}");
}

#[test]
fn no_source_uses_the_prompt_or_explains_the_flags() {
    let msg = usage_error(&["update", "db"]);
    assert!(msg.contains("no keys given"), "{msg}");
    assert!(msg.contains("--from-literal KEY=VALUE"), "{msg}");
    let mut prompt = ScriptedPrompt(Some(vec![("password", "typed"), ("user", "me")]));
    let r = import(request_with(&["update", "db"], &mut prompt).unwrap());
    assert_eq!(
        values(&r.keys),
        [
            ("password".to_string(), b"typed".to_vec()),
            ("user".to_string(), b"me".to_vec()),
        ]
    );
    let mut nothing = ScriptedPrompt(Some(vec![]));
    let err = request_with(&["update", "db"], &mut nothing).unwrap_err();
    assert!(err.to_string().contains("no keys given"), "{err}");
    // The prompt is not consulted when a source flag is given.
    let mut unused = ScriptedPrompt(Some(vec![("x", "y")]));
    let r = import(request_with(&["update", "db", "--from-literal", "a=1"], &mut unused).unwrap());
    assert_eq!(r.keys.names(), ["a"]);
}

#[test]
fn values_never_show_in_debug_output() {
    let r = request(&["update", "db", "--from-literal", "password=hunter2"]).unwrap();
    let debug = format!("{r:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("<7 bytes>"), "{debug}");
}

#[test]
fn oversized_values_are_refused_before_contacting_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 1024 * 1024 + 1]).unwrap();
    let msg = usage_error(&["update", "db", "--from-file", big.to_str().unwrap()]);
    assert!(msg.contains("at most 1048576"), "{msg}");
}

#[tokio::test]
async fn completion_scripts_need_no_cluster() {
    for shell in ["bash", "zsh", "fish"] {
        let cli = parse(&["--kubeconfig", "/nonexistent", "completion", shell]).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut term = Term {
            out: &mut out,
            err: &mut err,
        };
        hsm_secrets::kubectl::run(cli, &mut ScriptedPrompt(None), &mut term)
            .await
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("kubectl-hsm"), "{shell}: {text}");
        assert!(text.contains("failover"), "{shell}");
        assert!(text.contains("show-values"), "{shell}");
    }
}

#[tokio::test]
async fn exit_codes_are_0_ok_1_error_2_usage() {
    assert_eq!(
        hsm_secrets::kubectl::main_with_args(["kubectl-hsm", "completion", "bash"]).await,
        0
    );
    assert_eq!(
        hsm_secrets::kubectl::main_with_args(["kubectl-hsm", "failover", "d"]).await,
        2
    );
    assert_eq!(
        hsm_secrets::kubectl::main_with_args(["kubectl-hsm", "get", "Bad_Name"]).await,
        2
    );
    assert_eq!(
        hsm_secrets::kubectl::main_with_args([
            "kubectl-hsm",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "list"
        ])
        .await,
        1
    );
}

/// A kubeconfig with one context, `dev`, whose cluster nothing listens for: any failure
/// below happens before a request is sent.
fn kubeconfig_with_dev_context(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: dev\nclusters:\n- name: dev\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: dev\n  context: {cluster: dev, user: u}\n- name: orphan\n  context: {cluster: gone, user: u}\nusers:\n- name: u\n  user: {token: t}\n",
    )
    .unwrap();
    path
}

/// `--context nope` is a mistake in the kubeconfig flags, not an unreachable cluster: the
/// error names the context, the file, and how to list the contexts there are.
#[tokio::test]
async fn an_unknown_context_is_a_kubeconfig_error_naming_it_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kubeconfig_with_dev_context(dir.path());
    let connect = |context: &'static str| {
        let cli = parse(&[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--context",
            context,
            "devices",
        ])
        .unwrap();
        async move {
            hsm_secrets::kubectl::connect(&cli.global)
                .await
                .err()
                .unwrap()
        }
    };

    let err = connect("nope").await;
    let msg = err.to_string();
    assert_eq!(err.kind(), "kubeconfig", "{msg}");
    assert_eq!(err.exit_code(), 1);
    assert!(msg.contains("no context named \"nope\""), "{msg}");
    assert!(msg.contains(kubeconfig.to_str().unwrap()), "{msg}");
    assert!(msg.contains("kubectl config get-contexts"), "{msg}");
    assert!(msg.contains("--context"), "{msg}");
    assert!(!msg.contains("cannot reach"), "{msg}");

    // A context whose cluster the file does not define says which cluster.
    let msg = connect("orphan").await.to_string();
    assert!(
        msg.contains("context \"orphan\" names cluster \"gone\", which is not defined"),
        "{msg}"
    );

    // A kubeconfig that is not there names the file and the flag.
    let cli = parse(&["--kubeconfig", "/nonexistent/kubeconfig", "devices"]).unwrap();
    let err = hsm_secrets::kubectl::connect(&cli.global)
        .await
        .err()
        .unwrap();
    let msg = err.to_string();
    assert_eq!(err.kind(), "kubeconfig", "{msg}");
    assert!(
        msg.contains("/nonexistent/kubeconfig") && msg.contains("--kubeconfig"),
        "{msg}"
    );

    // Through the plugin's entry point: one line on stderr, exit code 1.
    assert_eq!(
        hsm_secrets::kubectl::main_with_args([
            "kubectl-hsm",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--context",
            "nope",
            "devices",
        ])
        .await,
        1
    );
}

/// The bash script completes subcommands and their flags when sourced in a real bash.
#[tokio::test]
async fn bash_completion_completes_subcommand_flags() {
    let cli = parse(&["completion", "bash"]).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut term = Term {
        out: &mut out,
        err: &mut err,
    };
    hsm_secrets::kubectl::run(cli, &mut ScriptedPrompt(None), &mut term)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("kubectl-hsm.bash");
    std::fs::write(&script, &out).unwrap();
    let probe = format!(
        "source {}; complete -p kubectl-hsm; \
         COMP_WORDS=(kubectl-hsm failover --t); COMP_CWORD=2; \
         \"$(complete -p kubectl-hsm | sed 's/.*-F \\([^ ]*\\).*/\\1/')\" kubectl-hsm --t failover; \
         echo \"reply: ${{COMPREPLY[*]}}\"",
        script.display()
    );
    let output = std::process::Command::new("bash")
        .args(["--norc", "-c", &probe])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("reply: --to --timeout"), "{stdout}");
}

/// Every argument error a person is likely to make, with the exact message and exit
/// code, compared with tests/golden/kubectl/argument-errors.txt (refresh:
/// UPDATE_GENERATED=1 cargo test --test kubectl args::).
#[test]
fn argument_errors_match_the_golden_file() {
    let cases: &[&[&str]] = &[
        &["failover", "prod-hsm"],
        &["failover", "Prod_HSM", "--to", "worker-2"],
        &["failover", "prod-hsm", "--to", "worker/2"],
        &["get"],
        &["get", "db", "--key", "a/b"],
        &["get", "db", "-o", "xml"],
        &["get", "db", "--show-values", "-A"],
        &["create", "db"],
        &[
            "create",
            "db",
            "--device",
            "prod-hsm",
            "--from-literal",
            "novalue",
        ],
        &[
            "create",
            "db",
            "--device",
            "prod-hsm",
            "--from-literal",
            "../k=v",
        ],
        &[
            "create",
            "db",
            "--device",
            "prod-hsm",
            "--from-literal",
            "k=1",
            "--from-literal",
            "k=2",
        ],
        &[
            "create",
            "db",
            "--device",
            "prod-hsm",
            "--from-file",
            "/nonexistent/hsm-secrets-test",
        ],
        &["update", "db", "--from-literal", "k=v", "--timeout", "soon"],
        &["delete", "db", "--key", ""],
        &["mirror", "status"],
        &["completion", "powershell"],
        &["list", "-n", "Bad_Namespace"],
    ];
    let mut report = String::new();
    for args in cases {
        let (code, message) = match parse(args) {
            Err(e) => (e.exit_code(), e.render().to_string()),
            Ok(cli) => {
                let (mut out, mut err) = (Vec::new(), Vec::new());
                let mut term = Term {
                    out: &mut out,
                    err: &mut err,
                };
                match Request::from_cli(&cli, &mut ScriptedPrompt(None), &mut term) {
                    Err(e) => (e.exit_code(), e.to_string()),
                    Ok(r) => panic!("kubectl hsm {} was accepted: {r:?}", args.join(" ")),
                }
            }
        };
        // Up to clap's usage lines, which follow a blank line.
        let shown: Vec<&str> = message
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .collect();
        report.push_str(&format!(
            "$ kubectl hsm {}\nexit {code}: {}\n\n",
            args.join(" "),
            shown.join("\n")
        ));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/kubectl/argument-errors.txt");
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&path, &report).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == report,
        "tests/golden/kubectl/argument-errors.txt differs; review and run: UPDATE_GENERATED=1 cargo test --test kubectl args::\n--- expected\n{expected}\n--- actual\n{report}"
    );
}

#[test]
fn restore_needs_exactly_one_point_and_a_real_time() {
    let missing = parse(&["restore", "prod-hsm"]).unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::MissingRequiredArgument);
    assert!(missing.to_string().contains("--to-sequence"), "{missing}");
    let both = parse(&["restore", "prod-hsm", "--to-sequence", "3", "--latest"]).unwrap_err();
    assert_eq!(both.kind(), ErrorKind::ArgumentConflict);
    let bad = usage_error(&["restore", "prod-hsm", "--to-time", "yesterday"]);
    assert!(
        bad.contains("--to-time") && bad.contains("RFC 3339"),
        "{bad}"
    );
    match request(&["restore", "prod-hsm", "--to-time", "2026-12-07T08:00:00Z"]).unwrap() {
        Request::Restore(r) => {
            assert_eq!(r.to_time.unwrap().to_string(), "2026-12-07T08:00:00Z");
            assert!(!r.force && r.wait.enabled);
        }
        other => panic!("{other:?}"),
    }
    let all = usage_error(&["-A", "backup", "list", "prod-hsm"]);
    assert!(all.contains("backup"), "{all}");
}
