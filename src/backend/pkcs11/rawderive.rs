//! The raw cost of a derived key that is not cached, for `tillkey bench --scale-hot`: derive a
//! per-terminal key from a master (AES-CBC-ENCRYPT-DATA), MAC once with it, destroy it; straight
//! through `cryptoki` from `threads` threads, one session each, as the daemon would on a miss.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectClass;

use super::connection::Connection;
use super::rawbench::RawRate;
use super::{derive, templates, Pkcs11Settings, Template, DEFAULT_DERIVED_CACHE};
use crate::keys::KeyType;

pub fn measure(
    settings: &Pkcs11Settings,
    threads: usize,
    warmup: Duration,
    duration: Duration,
    message: &[u8],
) -> Result<RawRate, String> {
    let own = Pkcs11Settings {
        module: settings.module.clone(),
        token_uri: settings.token_uri.clone(),
        token: settings.token.clone(),
        pin: settings.pin.clone(),
        sessions: threads,
        derived_cache: DEFAULT_DERIVED_CACHE,
    };
    let conn = Arc::new(Connection::open(&own)?);
    let id = b"tillkey-rawderive".to_vec();
    let session = conn
        .take_session(Duration::from_secs(1))
        .ok_or("no session")?;
    let Template::Secret { mechanism, attrs } =
        templates::for_type(KeyType::Aes256Derive, &id, "tillkey:rawderive", false)
    else {
        return Err("a master is a secret key".into());
    };
    session
        .generate_key(&mechanism, &attrs)
        .map_err(|e| format!("generating the bench master: {e}"))?;
    conn.give_session(session);

    let running = Arc::new(AtomicBool::new(true));
    let counting = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for t in 0..threads {
        let (conn, running, counting, ops, data, id) = (
            conn.clone(),
            running.clone(),
            counting.clone(),
            ops.clone(),
            message.to_vec(),
            id.clone(),
        );
        workers.push(std::thread::spawn(move || -> Result<(), String> {
            let s = conn
                .take_session(Duration::from_secs(1))
                .ok_or("no session")?;
            let master = conn
                .token_handle(&s, ObjectClass::SECRET_KEY, &id)
                .map_err(|e| format!("{e:?}"))?;
            let template = derive::template(KeyType::HmacSha256);
            let mut n: u64 = 0;
            while running.load(Ordering::Relaxed) {
                // A different terminal every time: nothing is reused.
                let mut context = [0u8; 32];
                context[..8].copy_from_slice(&n.to_be_bytes());
                context[8] = t as u8;
                n += 1;
                let params = AesCbcDeriveParams::new([0; 16], &context);
                let k = s
                    .derive_key(&Mechanism::AesCbcEncryptData(params), master, &template)
                    .map_err(|e| e.to_string())?;
                s.sign(&Mechanism::Sha256Hmac, k, &data)
                    .map_err(|e| e.to_string())?;
                s.destroy_object(k).map_err(|e| e.to_string())?;
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
    let cpu0 = super::rawbench::cpu_seconds("self");
    let start = Instant::now();
    std::thread::sleep(duration);
    let total = ops.load(Ordering::SeqCst);
    let elapsed = start.elapsed();
    let cpu = cpu0
        .zip(super::rawbench::cpu_seconds("self"))
        .map(|(a, b)| b - a);
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
