//! Store benchmark: get, put, manifest and a cold read of everything on SoftHSM2 against raw-cryptoki floors
//! measured in the same run, interleaved sample by sample so machine noise hits both.
//!
//! Run: `cargo bench --bench store` (needs softhsm2). Prints medians and ratios.

use hsm_secrets_testkit as kit;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use hsm_secrets::hsm::{
    Expect, FaultPlan, Pkcs11Config, Pkcs11Store, SecretData, SecretPath, SecretStore,
};

fn main() {
    let dir = kit::bench::private_softhsm_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(dir));
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Row {
    name: String,
    ours: Duration,
    floor: Duration,
    target: f64,
}

async fn run(dir: PathBuf) {
    let lib = kit::bench::library();
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, kit::softhsm::USER_PIN).expect("pin");
    kit::bench::init_token("bench-small");
    kit::bench::init_token("bench-large");

    // Floors use their own session on the same (process-wide) module.
    let ctx = Pkcs11::new(&lib).expect("module");
    let _ = ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));

    let mut rows = Vec::new();
    let samples = std::env::var("BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);

    // --- one secret of 10 keys x 1 KiB
    let store = Pkcs11Store::open(Pkcs11Config::new(&lib, "bench-small", &pin_file))
        .await
        .expect("open");
    let path: SecretPath = "bench/ten-keys".parse().expect("path");
    let data = ten_keys(0);
    store
        .put(&path, data.clone(), Expect::Any)
        .await
        .expect("put");
    let session = floor_session(&ctx, "bench-small");
    let (mut g_ours, mut g_floor, mut p_ours, mut p_floor, mut m_ours, mut m_floor) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut floor_objects: Vec<ObjectHandle> = Vec::new();
    for i in 0..samples {
        // get
        let t = Instant::now();
        let (v, d) = store.get(&path).await.expect("get");
        g_ours.push(t.elapsed());
        assert_eq!(d.len(), 10);
        let label = current_data_label(&session, &path);
        let t = Instant::now();
        let read = floor_get(&session, &label);
        g_floor.push(t.elapsed());
        assert_eq!(read, 10);
        // put (overwrite)
        let t = Instant::now();
        store
            .put(&path, ten_keys(i), Expect::Version(v))
            .await
            .expect("put");
        p_ours.push(t.elapsed());
        let t = Instant::now();
        floor_objects = floor_put(&session, &ten_keys(i), floor_objects);
        p_floor.push(t.elapsed());
        // manifest of this token (1 secret)
        let t = Instant::now();
        let m = store.manifest().await.expect("manifest");
        m_ours.push(t.elapsed());
        assert_eq!(m.len(), 1);
        let t = Instant::now();
        let n = floor_manifest(&session);
        m_floor.push(t.elapsed());
        assert_eq!(n, 1);
    }
    for h in floor_objects {
        let _ = session.destroy_object(h);
    }
    rows.push(Row {
        name: "get 10 keys x 1 KiB".into(),
        ours: median(&mut g_ours),
        floor: median(&mut g_floor),
        target: 1.5,
    });
    rows.push(Row {
        name: "put 10 keys x 1 KiB".into(),
        ours: median(&mut p_ours),
        floor: median(&mut p_floor),
        target: f64::NAN,
    });
    rows.push(Row {
        name: "manifest, 1 secret".into(),
        ours: median(&mut m_ours),
        floor: median(&mut m_floor),
        target: f64::NAN,
    });

    // --- manifest of 10,000 secrets (one key each: 20,000 objects on the token)
    let count: usize = std::env::var("BENCH_SECRETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let plan = Arc::new(FaultPlan::new());
    let large = Pkcs11Store::open_with_faults(
        Pkcs11Config::new(&lib, "bench-large", &pin_file),
        Some(plan.clone()),
    )
    .await
    .expect("open large");
    let fill = Instant::now();
    for i in 0..count {
        let mut d = SecretData::new();
        d.insert("value", format!("secret-{i}").into_bytes())
            .expect("insert");
        let p: SecretPath = format!("ns{}/s{i}", i % 10).parse().expect("path");
        large.put(&p, d, Expect::Absent).await.expect("fill");
    }
    eprintln!("filled {count} secrets in {:.1?}", fill.elapsed());
    let session = floor_session(&ctx, "bench-large");
    let (mut ours, mut floor) = (vec![], vec![]);
    let mut reads_per_manifest = 0;
    for _ in 0..std::env::var("BENCH_LARGE_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
    {
        plan.clear();
        let t = Instant::now();
        let m = large.manifest().await.expect("manifest");
        ours.push(t.elapsed());
        assert_eq!(m.len(), count);
        reads_per_manifest = plan.calls() - 1; // minus the one find
        let t = Instant::now();
        assert_eq!(floor_manifest(&session), count);
        floor.push(t.elapsed());
    }
    rows.push(Row {
        name: format!("manifest, {count} secrets"),
        ours: median(&mut ours),
        floor: median(&mut floor),
        target: 1.5,
    });

    // --- a cold open, then every secret read back: what a restarted agent's verification
    //     pass does. The floor reads the same with two scans (metadata, data objects).
    let paths: Vec<SecretPath> = (0..count)
        .map(|i| format!("ns{}/s{i}", i % 10).parse().expect("path"))
        .collect();
    let (mut ours, mut floor) = (vec![], vec![]);
    let mut cold_searches = 0;
    for _ in 0..kit::bench::env_usize("BENCH_COLD_SAMPLES", 3) {
        let plan = Arc::new(FaultPlan::new());
        let t = Instant::now();
        let cold = Pkcs11Store::open_with_faults(
            Pkcs11Config::new(&lib, "bench-large", &pin_file),
            Some(plan.clone()),
        )
        .await
        .expect("open cold");
        assert_eq!(cold.manifest().await.expect("manifest").len(), count);
        for p in &paths {
            cold.get(p).await.expect("get");
        }
        ours.push(t.elapsed());
        cold_searches = plan.calls_of("find");
        let t = Instant::now();
        assert_eq!(floor_read_all(&session), count);
        floor.push(t.elapsed());
    }
    rows.push(Row {
        name: format!("cold open, then read all {count} secrets"),
        ours: median(&mut ours),
        floor: median(&mut floor),
        target: f64::NAN,
    });

    println!();
    println!("| operation | hsm-secrets (median) | raw cryptoki floor (median) | ratio | target |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let ratio = r.ours.as_secs_f64() / r.floor.as_secs_f64();
        let target = if r.target.is_nan() {
            "-".to_string()
        } else {
            format!("<= {:.1}x", r.target)
        };
        println!(
            "| {} | {:.3?} | {:.3?} | {:.2}x | {} |",
            r.name, r.ours, r.floor, ratio, target
        );
    }
    println!();
    println!(
        "manifest of {count} secrets read {reads_per_manifest} object attributes: one per metadata object, no secret value ({} data objects untouched)",
        count
    );
    println!(
        "a cold open and reading all {count} secrets searched the token {cold_searches} times (one search per secret before data objects were found by one scan)"
    );
}

/// The least a raw client does to read every secret: one scan of the metadata objects,
/// one of the data objects, each object read once.
fn floor_read_all(session: &Session) -> usize {
    let metas = floor_manifest(session);
    let data: Vec<ObjectHandle> = session
        .iter_objects_with_cache_size(
            &[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(b"hsm-secrets/data".to_vec()),
            ],
            page(),
        )
        .expect("find")
        .collect::<Result<_, _>>()
        .expect("find");
    for h in &data {
        session
            .get_attributes(
                *h,
                &[
                    AttributeType::Label,
                    AttributeType::ObjectId,
                    AttributeType::Value,
                ],
            )
            .expect("read");
    }
    metas
}

fn ten_keys(seed: usize) -> SecretData {
    let mut d = SecretData::new();
    for k in 0..10 {
        d.insert(&format!("key-{k}"), vec![(seed + k) as u8; 1024])
            .expect("insert");
    }
    d
}

fn floor_session(ctx: &Pkcs11, label: &str) -> Session {
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim() == label)
                .unwrap_or(false)
        })
        .expect("token");
    let s = ctx.open_rw_session(slot).expect("session");
    let _ = s.login(
        UserType::User,
        Some(&AuthPin::from(kit::softhsm::USER_PIN.to_string())),
    );
    s
}

fn page() -> NonZeroUsize {
    NonZeroUsize::new(256).expect("page")
}

/// The label of the secret's current data objects (looked up outside the timed part).
fn current_data_label(session: &Session, path: &SecretPath) -> Vec<u8> {
    let metas = session
        .find_objects(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(b"hsm-secrets/meta".to_vec()),
            Attribute::Label(format!("hsm-secrets:m:{path}").into_bytes()),
        ])
        .expect("find meta");
    let v = session
        .get_attributes(metas[0], &[AttributeType::Value])
        .expect("meta");
    let Attribute::Value(bytes) = &v[0] else {
        panic!("no value")
    };
    let meta: serde_json::Value = serde_json::from_slice(bytes).expect("json");
    format!(
        "hsm-secrets:d:{path}@{}",
        meta["generation"].as_str().expect("generation")
    )
    .into_bytes()
}

/// The least a raw client does to read a known secret: find its data objects by label and
/// read each key name and value.
fn floor_get(session: &Session, label: &[u8]) -> usize {
    let handles: Vec<ObjectHandle> = session
        .iter_objects_with_cache_size(
            &[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(b"hsm-secrets/data".to_vec()),
                Attribute::Label(label.to_vec()),
            ],
            page(),
        )
        .expect("find")
        .collect::<Result<_, _>>()
        .expect("find");
    for h in &handles {
        session
            .get_attributes(*h, &[AttributeType::ObjectId, AttributeType::Value])
            .expect("read");
    }
    handles.len()
}

/// The least a raw client does to replace a secret: create the new objects, destroy the old.
fn floor_put(session: &Session, data: &SecretData, old: Vec<ObjectHandle>) -> Vec<ObjectHandle> {
    let mut new = Vec::new();
    for (k, v) in data.iter() {
        new.push(
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Label(b"floor".to_vec()),
                    Attribute::Application(b"floor".to_vec()),
                    Attribute::ObjectId(k.as_bytes().to_vec()),
                    Attribute::Value(v.to_vec()),
                ])
                .expect("create"),
        );
    }
    for h in old {
        session.destroy_object(h).expect("destroy");
    }
    new
}

/// The least a raw client does to list versions and checksums: find every metadata
/// object and read it.
fn floor_manifest(session: &Session) -> usize {
    let handles: Vec<ObjectHandle> = session
        .iter_objects_with_cache_size(
            &[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(b"hsm-secrets/meta".to_vec()),
            ],
            page(),
        )
        .expect("find")
        .collect::<Result<_, _>>()
        .expect("find");
    for h in &handles {
        session
            .get_attributes(*h, &[AttributeType::Value])
            .expect("read");
    }
    handles.len()
}
