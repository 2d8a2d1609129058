//! The key backend called directly on a real SoftHSM token, for what the daemon cannot show from
//! outside: a batch's one-session fast path gives exactly what single calls give, and when it
//! fails, every item still gets its own classified answer; and SoftHSM's slot is read as the
//! software token it is, so single calls stay on the async workers.

mod common;

use common::*;
use tillkey::backend::pkcs11::Pkcs11Backend;
use tillkey::backend::{BackendError, KeyBackend, KeyRef, ObjectRef, Settings};
use tillkey::config::{Config, Overrides};
use tillkey::keys::KeyType;

#[test]
fn sign_many_agrees_with_single_signs_and_answers_each_item_when_it_fails() {
    let env = Env::new();
    // The only test in this binary, so no other thread reads the variable.
    std::env::set_var("SOFTHSM2_CONF", env.softhsm_conf());
    let config = Config::load(&env.path("tillkeyd.toml"), &Overrides::default()).unwrap();
    let Settings::Pkcs11(settings) = Settings::from_config(&config).unwrap() else {
        panic!("the test environment is a PKCS#11 one");
    };
    let backend = Pkcs11Backend::open(settings).unwrap();
    assert!(
        !backend.waits_on_device(),
        "SoftHSM's slot has no CKF_HW_SLOT: its calls are computed in this process"
    );
    let messages = vec![b"first".to_vec(), Vec::new(), vec![7u8; 4096]];

    for key_type in [KeyType::HmacSha256, KeyType::EcdsaP256] {
        let made = backend.generate(key_type, "sign-many", false).unwrap();
        let key = KeyRef {
            key_type,
            object: &made.object,
        };
        let many: Vec<Vec<u8>> = backend
            .sign_many(key, &messages)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(many.len(), messages.len());
        for (m, sig) in messages.iter().zip(&many) {
            if key_type == KeyType::HmacSha256 {
                assert_eq!(sig, &backend.sign(key, m).unwrap(), "{key_type:?}");
            }
            assert!(backend.verify(key, m, sig).unwrap(), "{key_type:?}");
        }
        backend.destroy(key).unwrap();
    }

    // No such object: the fast path fails at the key lookup, and each item says so itself.
    let missing = ObjectRef(b"no-such-object".to_vec());
    let key = KeyRef {
        key_type: KeyType::HmacSha256,
        object: &missing,
    };
    let answers = backend.sign_many(key, &messages);
    assert_eq!(answers.len(), messages.len());
    for a in answers {
        match a {
            Err(BackendError::Failed(why)) => assert!(why.contains("holds no object"), "{why}"),
            other => panic!("expected the missing object, got {other:?}"),
        }
    }
}
