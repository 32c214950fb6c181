//! The Dockerfile builds what the manifests run: no container engine is needed to check
//! the essentials (stages, locked release build of both binaries, glibc runtime with the
//! PKCS#11 modules the manifests point at, a non-root user matching the manifests, the
//! entrypoint binary, and one image name and tag everywhere).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::Value;

const IMAGE: &str = concat!("hsm-secrets:", env!("CARGO_PKG_VERSION"));

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(file: &str) -> String {
    std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// One instruction: keyword (upper case) and its arguments, continuation lines joined.
#[derive(Debug, Clone)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

fn parse(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(body) = trimmed.strip_suffix('\\') {
            joined.push_str(body);
            joined.push(' ');
            pending = Some((start, joined));
            continue;
        }
        joined.push_str(trimmed);
        let (keyword, args) = joined
            .split_once(char::is_whitespace)
            .unwrap_or((&joined, ""));
        out.push(Instruction {
            line: start,
            keyword: keyword.to_ascii_uppercase(),
            args: args.split_whitespace().collect::<Vec<_>>().join(" "),
        });
    }
    assert!(pending.is_none(), "Dockerfile ends in a line continuation");
    out
}

/// The instructions of each stage, `FROM` first.
fn stages() -> Vec<Vec<Instruction>> {
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for instruction in parse(&read("Dockerfile")) {
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .unwrap_or_else(|| panic!("Dockerfile:{}: before the first FROM", instruction.line))
            .push(instruction);
    }
    stages
}

fn find<'a>(stage: &'a [Instruction], keyword: &str) -> Vec<&'a Instruction> {
    stage.iter().filter(|i| i.keyword == keyword).collect()
}

fn binary_name(path: &str) -> String {
    Path::new(path)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Cargo's names for the two binaries the image carries.
fn binaries() -> [String; 2] {
    [
        binary_name(env!("CARGO_BIN_EXE_hsm-secrets")),
        binary_name(env!("CARGO_BIN_EXE_kubectl-hsm")),
    ]
}

#[test]
fn builder_stage_is_a_locked_release_build_of_both_binaries() {
    let stages = stages();
    assert_eq!(stages.len(), 2, "Dockerfile: a builder and a runtime stage");
    let builder = &stages[0];
    let from = &builder[0];
    let expected = format!(
        "rust:{}-bookworm AS builder",
        env!("CARGO_PKG_RUST_VERSION")
    );
    assert_eq!(
        from.args, expected,
        "Dockerfile:{}: FROM: the workspace's rust-version on Debian bookworm (same glibc as the runtime)",
        from.line
    );
    let build = find(builder, "RUN")
        .into_iter()
        .find(|r| r.args.contains("cargo build"))
        .expect("Dockerfile: the builder runs cargo build");
    for flag in ["--release", "--locked"] {
        assert!(
            build.args.split_whitespace().any(|w| w == flag),
            "Dockerfile:{}: cargo build needs {flag}",
            build.line
        );
    }
    for binary in binaries() {
        assert!(
            build.args.contains(&format!("--bin {binary} ")),
            "Dockerfile:{}: cargo build --bin {binary}",
            build.line
        );
        assert!(
            build.args.contains(&format!("target/release/{binary}")),
            "Dockerfile:{}: copy target/release/{binary} out of the cache mount",
            build.line
        );
    }
}

/// Every PKCS#11 module path a manifest or example points the node at.
fn module_paths() -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if map.get("name").and_then(Value::as_str) == Some("HSM_PKCS11_LIBRARY")
                    && let Some(path) = map.get("value").and_then(Value::as_str)
                {
                    out.push(path.to_owned());
                }
                if let Some(path) = map.get("pkcs11").and_then(|p| p["library"].as_str()) {
                    out.push(path.to_owned());
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    for dir in ["manifests", "examples"] {
        let mut found = Vec::new();
        files(&root().join(dir), &mut found);
        for file in found {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
                walk(&doc, &mut paths);
            }
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

#[test]
fn runtime_is_glibc_debian_with_the_pkcs11_modules_the_manifests_use() {
    let stages = stages();
    let runtime = stages.last().unwrap();
    let from = &runtime[0];
    assert_eq!(
        from.args, "debian:bookworm-slim",
        "Dockerfile:{}: glibc runtime (PKCS#11 modules are loaded with dlopen)",
        from.line
    );
    let runs: Vec<&Instruction> = find(runtime, "RUN");
    let install = runs
        .iter()
        .find(|r| r.args.contains("apt-get install"))
        .expect("Dockerfile: the runtime installs packages");
    let words: Vec<&str> = install.args.split_whitespace().collect();
    for package in [
        "softhsm2",
        "opensc",
        "ca-certificates",
        "--no-install-recommends",
    ] {
        assert!(
            words.contains(&package),
            "Dockerfile:{}: apt-get install {package}",
            install.line
        );
    }
    assert!(
        install.args.contains("rm -rf /var/lib/apt/lists"),
        "Dockerfile:{}: drop the apt lists in the same layer",
        install.line
    );
    let modules = module_paths();
    for expected in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
    ] {
        assert!(
            modules.iter().any(|m| m == expected),
            "the manifests use {expected}: {modules:?}"
        );
    }
    // The image build fails if a module is not where a manifest or example expects it.
    let all_runs: String = runs
        .iter()
        .map(|r| r.args.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    for module in &modules {
        assert!(
            all_runs.contains(&format!("test -f {module}")),
            "Dockerfile: a manifest or example uses the PKCS#11 module {module}; check it with `test -f {module}`"
        );
    }
}

#[test]
fn runtime_runs_the_binary_as_the_non_root_user_of_the_manifests() {
    let stages = stages();
    let runtime = stages.last().unwrap();
    let user = find(runtime, "USER");
    let user = user.last().expect("Dockerfile: USER in the runtime stage");
    let uid: u32 = user
        .args
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| {
            panic!(
                "Dockerfile:{}: USER must be numeric (runAsNonRoot checks a uid)",
                user.line
            )
        });
    assert_ne!(uid, 0, "Dockerfile:{}: USER must not be root", user.line);
    let creates = find(runtime, "RUN")
        .into_iter()
        .any(|r| r.args.contains("useradd") && r.args.contains(&format!("--uid {uid} ")));
    assert!(creates, "Dockerfile: useradd --uid {uid}");

    // Controller and webhook run as that uid; the node plugin overrides it with root.
    for file in [
        "manifests/controller/deployment.yaml",
        "manifests/webhook/deployment.yaml",
    ] {
        let doc: Value = serde_saphyr::from_str(&read(file)).unwrap();
        let sc = &doc["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(
            sc["runAsUser"], uid,
            "{file}: spec.template.spec.securityContext.runAsUser"
        );
        assert_eq!(sc["runAsNonRoot"], true, "{file}: runAsNonRoot");
    }

    let [binary, plugin] = binaries();
    let entrypoint = find(runtime, "ENTRYPOINT");
    let entrypoint = entrypoint.last().expect("Dockerfile: ENTRYPOINT");
    let exec: Vec<String> = serde_json::from_str(&entrypoint.args).unwrap_or_else(|e| {
        panic!(
            "Dockerfile:{}: ENTRYPOINT in exec form (JSON): {e}",
            entrypoint.line
        )
    });
    assert_eq!(exec, [format!("/usr/local/bin/{binary}")]);
    let copy = find(runtime, "COPY")
        .into_iter()
        .find(|c| c.args.starts_with("--from=builder"))
        .expect("Dockerfile: COPY --from=builder");
    for name in [&binary, &plugin] {
        assert!(
            copy.args.contains(&format!("/{name} ")),
            "Dockerfile:{}: COPY {name}",
            copy.line
        );
    }
    assert!(
        copy.args.ends_with(" /usr/local/bin/"),
        "Dockerfile:{}",
        copy.line
    );
}

#[test]
fn image_name_and_tag_agree_between_dockerfile_readme_and_manifests() {
    let dockerfile = read("Dockerfile");
    let build = format!("docker build -t {IMAGE} .");
    assert!(
        dockerfile.contains(&build),
        "Dockerfile: document `{build}`"
    );
    assert!(
        read("manifests/README.md").contains(&build),
        "manifests/README.md: document `{build}`"
    );
    let label = stages()
        .last()
        .unwrap()
        .iter()
        .filter(|i| i.keyword == "LABEL")
        .any(|i| {
            i.args.contains(&format!(
                "org.opencontainers.image.version=\"{}\"",
                env!("CARGO_PKG_VERSION")
            ))
        });
    assert!(label, "Dockerfile: LABEL org.opencontainers.image.version");

    let mut images = Vec::new();
    for file in [
        "manifests/controller/deployment.yaml",
        "manifests/webhook/deployment.yaml",
        "manifests/node/daemonset.yaml",
        "manifests/overlays/softhsm-dev/daemonset-softhsm.yaml",
    ] {
        for line in read(file).lines() {
            if let Some(image) = line.trim().strip_prefix("image: ")
                && image.starts_with("hsm-secrets")
            {
                images.push((file, image.to_owned()));
            }
        }
    }
    assert!(images.len() >= 4, "{images:?}");
    for (file, image) in images {
        assert_eq!(image, IMAGE, "{file}: image");
    }
}

#[test]
fn dockerignore_keeps_the_build_inputs_and_drops_the_rest() {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_owned())
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "csi",
        "webhook",
        "benches",
    ] {
        assert!(
            !ignored.iter().any(|p| p == needed || p == "*" || p == "**"),
            ".dockerignore: the build needs {needed}"
        );
    }
    for dropped in ["target", ".git"] {
        assert!(
            ignored.iter().any(|p| p == dropped),
            ".dockerignore: leave out {dropped}"
        );
    }
}
