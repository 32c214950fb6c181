//! Admission benchmark: the pod mutation of a typical pod (3 containers,
//! existing volumes) over real TLS with keep-alive, 64 concurrent HTTP/1.1
//! connections, against the floor measured in the same run: the same server
//! stack (rustls, hyper, router, AdmissionReview decode/encode) answering a
//! constant "allowed" from a trivial rule set.
//!
//! The client runs in the same process on the same Tokio runtime, so its TLS
//! and HTTP work shares the machine's cores with the server's.
//!
//! Run: `cargo bench --bench admission`. Knobs: BENCH_SECONDS (per round,
//! default 1.5), BENCH_ROUNDS (per variant and mode, default 6), BENCH_RATE
//! (paced requests/s, default 1000).

use hsm_secrets_testkit as kit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hsm_secrets::admission::certificates::{self, ServingIdentity};
use hsm_secrets::admission::{MemoryState, Rules};
use hsm_secrets_webhook::{
    AdmissionRequest, AdmissionRules, Decision, DynamicObject, TlsReloader, WebhookState,
};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

const CONNECTIONS: usize = 64;
const SERVER_NAME: &str = "hsm-secrets-webhook.hsm-secrets-system.svc";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

/// The floor: decides nothing, allows everything.
struct AllowAll;

#[async_trait::async_trait]
impl AdmissionRules for AllowAll {
    async fn mutate(&self, _: &AdmissionRequest<DynamicObject>) -> Decision {
        Decision::allow()
    }
    async fn validate(&self, _: &AdmissionRequest<DynamicObject>) -> Decision {
        Decision::allow()
    }
}

fn cluster() -> MemoryState {
    let state = MemoryState::new();
    state.put_device(
        kit::resources::device("prod-hsm")
            .mirrored(Some("worker-1"), &["worker-2"])
            .status_json(json!({"primaryNode": "worker-1", "phase": "Ready"}))
            .build(),
    );
    for name in ["db-credentials", "api-key"] {
        state.put_secret(
            kit::resources::secret("shop", name)
                .accounts(&["checkout"])
                .build(),
        );
    }
    state
}

struct Server {
    addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(rules: Arc<dyn AdmissionRules>, tls: &TlsReloader) -> Server {
    let listener = hsm_secrets_webhook::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = hsm_secrets_webhook::router(
        WebhookState::new(rules, Registry::default()).with_certificate(tls),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(hsm_secrets_webhook::serve(
        listener,
        router,
        tls.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    Server { addr, _stop: stop }
}

type Connection = SendRequest<Full<Bytes>>;

async fn connect(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> Connection {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls_pki_types::ServerName::try_from(SERVER_NAME).expect("name"),
            tcp,
        )
        .await
        .expect("TLS handshake");
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

async fn post(connection: &mut Connection, body: &Bytes) -> Bytes {
    connection.ready().await.expect("connection alive");
    let request = http::Request::post("/mutate")
        .header(http::header::HOST, SERVER_NAME)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.clone()))
        .expect("request");
    let response = connection.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200);
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
}

/// Latencies and elapsed wall time of one round.
struct Round {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// Open-loop: request `i` is due at `start + i / rate`, sent on connection
/// `i % 64`. Latency counts from the due time when the connection was still
/// busy with its previous request (queueing is the server's fault), and from
/// the wake-up otherwise (the timer's millisecond slop is not).
async fn paced(connections: &mut Vec<Connection>, body: &Bytes, rate: f64, seconds: f64) -> Round {
    let period = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * seconds) as usize;
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let count = connections.len();
    let tasks: Vec<_> = std::mem::take(connections)
        .into_iter()
        .enumerate()
        .map(|(k, mut connection)| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in (k..total).step_by(count) {
                    let due = start + period * i as u32;
                    let began = if tokio::time::Instant::now() < due {
                        tokio::time::sleep_until(due).await;
                        tokio::time::Instant::now()
                    } else {
                        due
                    };
                    post(&mut connection, &body).await;
                    latencies.push(began.elapsed());
                }
                (connection, latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        let (connection, measured) = task.await.expect("paced task");
        connections.push(connection);
        latencies.extend(measured);
    }
    Round {
        latencies,
        elapsed: start.elapsed(),
    }
}

/// Closed-loop: every connection sends its next request as soon as the
/// previous one is answered, for `seconds`.
async fn saturated(connections: &mut Vec<Connection>, body: &Bytes, seconds: f64) -> Round {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = std::mem::take(connections)
        .into_iter()
        .map(|mut connection| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let began = Instant::now();
                    post(&mut connection, &body).await;
                    latencies.push(began.elapsed());
                }
                (connection, latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        let (connection, measured) = task.await.expect("saturated task");
        connections.push(connection);
        latencies.extend(measured);
    }
    Round {
        latencies,
        elapsed: start.elapsed(),
    }
}

#[derive(Default)]
struct Totals {
    latencies: Vec<Duration>,
    requests: usize,
    elapsed: Duration,
}

impl Totals {
    fn add(&mut self, round: Round) {
        self.requests += round.latencies.len();
        self.latencies.extend(round.latencies);
        self.elapsed += round.elapsed;
    }
    fn quantile(&mut self, q: f64) -> Duration {
        self.latencies.sort();
        let index = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[index]
    }
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

async fn run() {
    let seconds: f64 = env_or("BENCH_SECONDS", 1.5);
    let rounds: usize = env_or("BENCH_ROUNDS", 6);
    let rate: f64 = env_or("BENCH_RATE", 1000.0);

    let dir = tempfile::tempdir().expect("temp dir");
    let identity = ServingIdentity {
        service: "hsm-secrets-webhook".into(),
        namespace: "hsm-secrets-system".into(),
    };
    let bundle =
        certificates::issue_authority_and_leaf(&identity, k8s_openapi::jiff::Timestamp::now())
            .expect("certificates");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &bundle.cert_pem).expect("write cert");
    std::fs::write(&key, bundle.key_pem.as_bytes()).expect("write key");
    let tls = TlsReloader::load(&cert, &key).expect("load pair");

    let mut registry = Registry::default();
    let ours = start(Arc::new(Rules::new(cluster(), &mut registry)), &tls).await;
    let floor = start(Arc::new(AllowAll), &tls).await;

    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/admission/pod_create_typical.json"
    );
    let body = Bytes::from(std::fs::read(fixture).expect("fixture"));
    let config = Arc::new(
        hsm_secrets_webhook::client_config(bundle.ca_cert_pem.as_bytes()).expect("client config"),
    );
    let mut ours_connections = Vec::new();
    let mut floor_connections = Vec::new();
    for _ in 0..CONNECTIONS {
        ours_connections.push(connect(ours.addr, config.clone()).await);
        floor_connections.push(connect(floor.addr, config.clone()).await);
    }

    // What is measured: a real mutation versus a plain allow.
    let answer: Value =
        serde_json::from_slice(&post(&mut ours_connections[0], &body).await).expect("json");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(
        answer["response"]["patchType"], "JSONPatch",
        "ours must mutate"
    );
    let answer: Value =
        serde_json::from_slice(&post(&mut floor_connections[0], &body).await).expect("json");
    assert!(
        answer["response"].get("patch").is_none(),
        "the floor must not"
    );

    // Warm-up: caches, allocator, connection buffers.
    saturated(&mut ours_connections, &body, 0.5).await;
    saturated(&mut floor_connections, &body, 0.5).await;

    let (mut paced_ours, mut paced_floor) = (Totals::default(), Totals::default());
    let (mut sat_ours, mut sat_floor) = (Totals::default(), Totals::default());
    // Interleaved, alternating which goes first, so drift hits both.
    for round in 0..rounds {
        if round % 2 == 0 {
            paced_ours.add(paced(&mut ours_connections, &body, rate, seconds).await);
            paced_floor.add(paced(&mut floor_connections, &body, rate, seconds).await);
        } else {
            paced_floor.add(paced(&mut floor_connections, &body, rate, seconds).await);
            paced_ours.add(paced(&mut ours_connections, &body, rate, seconds).await);
        }
    }
    for round in 0..rounds {
        if round % 2 == 0 {
            sat_ours.add(saturated(&mut ours_connections, &body, seconds).await);
            sat_floor.add(saturated(&mut floor_connections, &body, seconds).await);
        } else {
            sat_floor.add(saturated(&mut floor_connections, &body, seconds).await);
            sat_ours.add(saturated(&mut ours_connections, &body, seconds).await);
        }
    }

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "\nAdmission over TLS, HTTP/1.1 keep-alive, {CONNECTIONS} connections, client in the same \
         process and Tokio runtime, {cores} CPUs; typical pod ({} bytes review, 3 containers, \
         3 existing volumes); {rounds} interleaved rounds x {seconds} s per variant and mode.\n",
        body.len()
    );
    println!(
        "| measurement | mutation (hsm-secrets rules) | floor (constant allow) | ratio | target |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let ratio = |a: f64, b: f64| format!("{:.2}x", a / b);
    let (p50o, p50f) = (paced_ours.quantile(0.5), paced_floor.quantile(0.5));
    let (p99o, p99f) = (paced_ours.quantile(0.99), paced_floor.quantile(0.99));
    println!(
        "| paced {rate:.0} req/s: achieved rate | {:.0} req/s | {:.0} req/s | | |",
        paced_ours.rate(),
        paced_floor.rate()
    );
    println!(
        "| paced {rate:.0} req/s: p50 latency | {} | {} | {} | |",
        ms(p50o),
        ms(p50f),
        ratio(p50o.as_secs_f64(), p50f.as_secs_f64())
    );
    println!(
        "| paced {rate:.0} req/s: p99 latency | {} | {} | {} | p99 <= 2 ms |",
        ms(p99o),
        ms(p99f),
        ratio(p99o.as_secs_f64(), p99f.as_secs_f64())
    );
    println!(
        "| saturated: throughput | {:.0} req/s | {:.0} req/s | {} (floor/ours) | >= 10,000 req/s; <= 1.3x |",
        sat_ours.rate(),
        sat_floor.rate(),
        ratio(sat_floor.rate(), sat_ours.rate())
    );
    let (s50o, s50f) = (sat_ours.quantile(0.5), sat_floor.quantile(0.5));
    let (s99o, s99f) = (sat_ours.quantile(0.99), sat_floor.quantile(0.99));
    println!(
        "| saturated: p50 latency | {} | {} | {} | |",
        ms(s50o),
        ms(s50f),
        ratio(s50o.as_secs_f64(), s50f.as_secs_f64())
    );
    println!(
        "| saturated: p99 latency | {} | {} | {} | |",
        ms(s99o),
        ms(s99f),
        ratio(s99o.as_secs_f64(), s99f.as_secs_f64())
    );
    println!(
        "\nsamples: paced {} / {}, saturated {} / {}",
        paced_ours.requests, paced_floor.requests, sat_ours.requests, sat_floor.requests
    );

    // Where the time goes, without network or TLS: one thread, per review.
    let rules = Rules::new(cluster(), &mut Registry::default());
    let (mut decode, mut decide, mut encode) = (Vec::new(), Vec::new(), Vec::new());
    const BATCH: u32 = 200;
    for _ in 0..50 {
        let t = Instant::now();
        for _ in 0..BATCH {
            std::hint::black_box(
                hsm_secrets_webhook::review::decode_request(&body).expect("decode"),
            );
        }
        decode.push(t.elapsed() / BATCH);
        let request = hsm_secrets_webhook::review::decode_request(&body).expect("decode");
        let t = Instant::now();
        let mut last = None;
        for _ in 0..BATCH {
            last = Some(std::hint::black_box(rules.decide_mutation(&request)));
        }
        decide.push(t.elapsed() / BATCH);
        let (_, verdict) = last.expect("decided");
        let t = Instant::now();
        for _ in 0..BATCH {
            std::hint::black_box(
                hsm_secrets_webhook::review::encode_response(&request.uid, &verdict.decision)
                    .expect("encode"),
            );
        }
        encode.push(t.elapsed() / BATCH);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    println!("\n| per review, one thread, no TLS (median of 50 batches) | time |");
    println!("| --- | --- |");
    println!(
        "| decode the AdmissionReview (both variants pay this) | {} |",
        us(median(&mut decode))
    );
    println!(
        "| hsm-secrets rules: decide the mutation (annotations, lookups, patch) | {} |",
        us(median(&mut decide))
    );
    println!(
        "| encode the answer with its patch | {} |",
        us(median(&mut encode))
    );
}
