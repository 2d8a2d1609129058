//! The raw speed of the token, for `tillkey bench`: the same operation the daemon performs,
//! called straight through `cryptoki` from `threads` threads, one session each, on a token key
//! made for the purpose and destroyed afterwards.

use std::sync::Arc;
use std::time::Duration;

use cryptoki::object::ObjectClass;

use super::connection::Connection;
use super::{
    object_class, sign_mechanism, templates, to_be_signed, Pkcs11Settings, Template,
    DEFAULT_DERIVED_CACHE,
};
use crate::backend::timing::timed;
pub use crate::backend::timing::{cpu_seconds, RawRate};
use crate::keys::KeyType;

/// What the raw threads call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawOp {
    Sign,
    /// Verify a correct signature (made once before the clock starts).
    Verify,
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
    let (conn, id) = bench_key(settings, threads, key_type, b"tillkey-rawbench")?;
    let data = message.to_vec();
    let class: ObjectClass = object_class(key_type, false);
    let worker_conn = conn.clone();
    let worker_id = id.clone();
    let rate = timed(threads, warmup, duration, move |_, pace| {
        let (conn, id) = (&worker_conn, &worker_id);
        let mech = sign_mechanism(key_type).ok_or("not a signing key type")?;
        let s = conn
            .take_session(Duration::from_secs(1))
            .ok_or("no session")?;
        let h = conn
            .token_handle(&s, class, id)
            .map_err(|e| format!("{e:?}"))?;
        let verify_h = match op {
            RawOp::Sign => None,
            RawOp::Verify => {
                let sig = s
                    .sign(&mech, h, &to_be_signed(key_type, &data))
                    .map_err(|e| e.to_string())?;
                let public = object_class(key_type, true);
                let vh = conn
                    .token_handle(&s, public, id)
                    .map_err(|e| format!("{e:?}"))?;
                Some((vh, sig))
            }
        };
        while pace.running() {
            // ECDSA hashes per call, as the daemon does.
            let input = to_be_signed(key_type, &data);
            match &verify_h {
                None => s.sign(&mech, h, &input).map(|_| ()),
                Some((vh, sig)) => s.verify(&mech, *vh, &input, sig),
            }
            .map_err(|e| e.to_string())?;
            pace.done_one();
        }
        conn.give_session(s);
        Ok(())
    });
    remove_bench_objects(&conn, &id);
    rate
}

/// A connection with one session per bench thread and a fresh token key of `key_type`, made for
/// the measurement (remove it with [`remove_bench_objects`]). Its id is `prefix` and this
/// process's id, so two benches on one token never sign with or destroy each other's key.
pub(super) fn bench_key(
    settings: &Pkcs11Settings,
    threads: usize,
    key_type: KeyType,
    prefix: &[u8],
) -> Result<(Arc<Connection>, Vec<u8>), String> {
    let id = [prefix, format!("-{}", std::process::id()).as_bytes()].concat();
    let sessions = Pkcs11Settings {
        module: settings.module.clone(),
        token_uri: settings.token_uri.clone(),
        token: settings.token.clone(),
        pin: settings.pin.clone(),
        sessions: threads,
        derived_cache: DEFAULT_DERIVED_CACHE,
        calls_on_workers: None,
    };
    let conn = Arc::new(Connection::open(&sessions)?);
    let session = conn
        .take_session(Duration::from_secs(1))
        .ok_or("no session")?;
    let made = match &templates::for_type(key_type, &id, "tillkey:rawbench", false) {
        Template::Secret { mechanism, attrs } => session.generate_key(mechanism, attrs).map(|_| ()),
        Template::Pair {
            mechanism,
            public,
            private,
        } => session
            .generate_key_pair(mechanism, public, private)
            .map(|_| ()),
    };
    conn.give_session(session);
    made.map_err(|e| format!("generating the bench key: {e}"))?;
    Ok((conn, id))
}

/// Destroy what [`bench_key`] made.
pub(super) fn remove_bench_objects(conn: &Connection, id: &[u8]) {
    if let Some(s) = conn.take_session(Duration::from_secs(1)) {
        if let Ok(objects) = conn.all_objects(&s, id) {
            for o in objects {
                let _ = s.destroy_object(o);
            }
        }
        conn.give_session(s);
    }
}
