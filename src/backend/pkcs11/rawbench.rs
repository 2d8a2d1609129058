//! The raw speed of the token, for `tillkey bench`: the same operation the daemon performs,
//! called straight through `cryptoki` from `threads` threads, one session each, on a token key
//! made for the purpose and destroyed afterwards.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::object::ObjectClass;

use super::connection::Connection;
use super::{
    object_class, sign_mechanism, templates, to_be_signed, Pkcs11Settings, Template,
    DEFAULT_DERIVED_CACHE,
};
use crate::keys::KeyType;

pub struct RawRate {
    pub ops: u64,
    pub elapsed: Duration,
    /// CPU seconds (user + system) this process spent while the operations were counted.
    pub cpu_seconds: Option<f64>,
}

/// What the raw threads call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawOp {
    Sign,
    /// Verify a correct signature (made once before the clock starts).
    Verify,
}

impl RawRate {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

pub fn measure(
    settings: &Pkcs11Settings,
    key_type: KeyType,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    measure_op(
        settings,
        key_type,
        RawOp::Sign,
        threads,
        warmup,
        duration,
        message,
    )
}

pub fn measure_op(
    settings: &Pkcs11Settings,
    key_type: KeyType,
    op: RawOp,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    let sessions = Pkcs11Settings {
        module: settings.module.clone(),
        token_uri: settings.token_uri.clone(),
        token: settings.token.clone(),
        pin: settings.pin.clone(),
        sessions: threads,
        derived_cache: DEFAULT_DERIVED_CACHE,
    };
    let conn = Arc::new(Connection::open(&sessions)?);
    let id = b"tillkey-rawbench".to_vec();
    let session = conn
        .take_session(Duration::from_secs(1))
        .ok_or("no session")?;
    let template = templates::for_type(key_type, &id, "tillkey:rawbench", false);
    let made = match &template {
        Template::Secret { mechanism, attrs } => session.generate_key(mechanism, attrs).map(|_| ()),
        Template::Pair {
            mechanism,
            public,
            private,
        } => session
            .generate_key_pair(mechanism, public, private)
            .map(|_| ()),
    };
    made.map_err(|e| format!("generating the bench key: {e}"))?;
    conn.give_session(session);

    let running = Arc::new(AtomicBool::new(true));
    let counting = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let data = message.to_vec();
    let class: ObjectClass = object_class(key_type, false);
    let mut workers = Vec::new();
    for _ in 0..threads {
        let (conn, running, counting, ops, data, id) = (
            conn.clone(),
            running.clone(),
            counting.clone(),
            ops.clone(),
            data.clone(),
            id.clone(),
        );
        workers.push(std::thread::spawn(move || -> Result<(), String> {
            let mech = sign_mechanism(key_type).ok_or("not a signing key type")?;
            let s = conn
                .take_session(Duration::from_secs(1))
                .ok_or("no session")?;
            let h = conn
                .token_handle(&s, class, &id)
                .map_err(|e| format!("{e:?}"))?;
            let verify_h = match op {
                RawOp::Sign => None,
                RawOp::Verify => {
                    let sig = s
                        .sign(&mech, h, &to_be_signed(key_type, &data))
                        .map_err(|e| e.to_string())?;
                    let public = object_class(key_type, true);
                    let vh = conn
                        .token_handle(&s, public, &id)
                        .map_err(|e| format!("{e:?}"))?;
                    Some((vh, sig))
                }
            };
            while running.load(Ordering::Relaxed) {
                // ECDSA hashes per call, as the daemon does.
                let input = to_be_signed(key_type, &data);
                match &verify_h {
                    None => s.sign(&mech, h, &input).map(|_| ()),
                    Some((vh, sig)) => s.verify(&mech, *vh, &input, sig),
                }
                .map_err(|e| e.to_string())?;
                if counting.load(Ordering::Relaxed) {
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            }
            conn.give_session(s);
            Ok(())
        }));
    }
    std::thread::sleep(warmup);
    counting.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let cpu0 = cpu_seconds("self");
    std::thread::sleep(duration);
    let total = ops.load(Ordering::SeqCst);
    let elapsed = start.elapsed();
    let cpu = cpu0.zip(cpu_seconds("self")).map(|(a, b)| b - a);
    running.store(false, Ordering::SeqCst);
    for w in workers {
        w.join().map_err(|_| "bench thread panicked")??;
    }
    if let Some(s) = conn.take_session(Duration::from_secs(1)) {
        if let Ok(objects) = conn.all_objects(&s, &id) {
            for o in objects {
                let _ = s.destroy_object(o);
            }
        }
        conn.give_session(s);
    }
    Ok(RawRate {
        ops: total,
        elapsed,
        cpu_seconds: cpu,
    })
}

/// User + system CPU seconds of a process (`self` or a pid), from /proc.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); index 11 and 12 after the command name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
