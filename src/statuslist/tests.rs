//! The status list's encoding, signing and opening, against ring's ECDSA.
use super::*;
use ring::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};

fn key() -> EcdsaKeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

fn sample() -> StatusList {
    StatusList {
        issuer: "tillkey.example".into(),
        prefix: "pos/".into(),
        sequence: 42,
        issued_at: 1_700_000_000,
        expires_at: 1_700_086_400,
        entries: vec![
            StatusEntry {
                kid: "pos/terminal-signing".into(),
                version: 3,
                state: "revoked",
                since: 1_699_990_000,
                reason: Some("key compromise".into()),
            },
            StatusEntry {
                kid: "pos/receipt".into(),
                version: 1,
                state: "retired",
                since: -5,
                reason: None,
            },
        ],
    }
}

fn sign_with(kp: &EcdsaKeyPair, list: &StatusList) -> Vec<u8> {
    sign1(list, b"feed-1", |tbs| {
        Ok(kp
            .sign(&ring::rand::SystemRandom::new(), tbs)
            .unwrap()
            .as_ref()
            .to_vec())
    })
    .unwrap()
}

fn verifier(kp: &EcdsaKeyPair) -> impl FnOnce(&[u8], &[u8]) -> bool + '_ {
    move |tbs, sig| {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, kp.public_key().as_ref())
            .verify(tbs, sig)
            .is_ok()
    }
}

#[test]
fn round_trip() {
    let kp = key();
    let list = sample();
    let cose = sign_with(&kp, &list);
    let (got, kid) = open1(&cose, verifier(&kp)).unwrap();
    assert_eq!(got, list);
    assert_eq!(kid, b"feed-1");
}

#[test]
fn round_trip_extreme_integers_and_empty_entries() {
    let kp = key();
    let mut list = sample();
    list.sequence = u64::MAX;
    list.issued_at = i64::MIN;
    list.expires_at = i64::MAX;
    list.entries[0].version = u32::MAX;
    list.entries[0].state = "destroyed";
    let cose = sign_with(&kp, &list);
    assert_eq!(open1(&cose, verifier(&kp)).unwrap().0, list);

    list.entries.clear();
    let cose = sign_with(&kp, &list);
    assert_eq!(open1(&cose, verifier(&kp)).unwrap().0, list);
}

/// Key order and the omitted `reason` are part of the documented layout.
#[test]
fn payload_layout() {
    let Value::Map(top) = Value::from_slice(&payload(&sample()).unwrap()).unwrap() else {
        panic!("payload is not a map")
    };
    let keys = |m: &[(Value, Value)]| -> Vec<String> {
        m.iter()
            .map(|(k, _)| k.as_text().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        keys(&top),
        ["iss", "prefix", "seq", "iat", "exp", "entries"]
    );
    let Value::Array(entries) = &top[5].1 else {
        panic!("entries is not an array")
    };
    let entry_keys: Vec<_> = entries.iter().map(|e| keys(e.as_map().unwrap())).collect();
    assert_eq!(entry_keys[0], ["kid", "v", "state", "since", "reason"]);
    assert_eq!(entry_keys[1], ["kid", "v", "state", "since"]);
}

#[test]
fn signer_error_is_passed_through() {
    let r = sign1(&sample(), b"k", |_| Err("hsm down".into()));
    assert_eq!(r, Err(StatusError::Signer("hsm down".into())));
    assert_eq!(r.unwrap_err().to_string(), "signing failed: hsm down");
}

#[test]
fn flipped_payload_byte_fails() {
    let kp = key();
    let cose = sign_with(&kp, &sample());
    // Flip a byte inside the issuer text, so the CBOR stays well-formed and only the
    // signature can catch it.
    let at = cose
        .windows(b"tillkey.example".len())
        .position(|w| w == b"tillkey.example")
        .unwrap();
    let mut bad = cose.clone();
    bad[at] ^= 0x01;
    assert_eq!(open1(&bad, verifier(&kp)), Err(StatusError::BadSignature));

    // Every single-byte flip anywhere is refused, and none panics.
    for i in 0..cose.len() {
        let mut bad = cose.clone();
        bad[i] ^= 0x01;
        assert!(open1(&bad, verifier(&kp)).is_err(), "flip at {i} accepted");
    }
}

#[test]
fn wrong_key_fails() {
    let cose = sign_with(&key(), &sample());
    assert_eq!(
        open1(&cose, verifier(&key())),
        Err(StatusError::BadSignature)
    );
}

fn reassemble(protected: coset::Header, payload: Option<Vec<u8>>, sig: Vec<u8>) -> Vec<u8> {
    CoseSign1 {
        protected: coset::ProtectedHeader {
            original_data: None,
            header: protected,
        },
        unprotected: coset::Header::default(),
        payload,
        signature: sig,
    }
    .to_tagged_vec()
    .unwrap()
}

fn good_header() -> HeaderBuilder {
    HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .content_type(CONTENT_TYPE.into())
        .key_id(b"k".to_vec())
}

#[test]
fn wrong_alg_fails_even_with_a_valid_signature() {
    let kp = key();
    let p = payload(&sample()).unwrap();
    for alg in [iana::Algorithm::EdDSA, iana::Algorithm::PS256] {
        let hdr = HeaderBuilder::new()
            .algorithm(alg)
            .content_type(CONTENT_TYPE.into())
            .build();
        // Signed correctly over its own Sig_structure: only the alg check can refuse it.
        let unsigned = CoseSign1Builder::new()
            .protected(hdr.clone())
            .payload(p.clone())
            .build();
        let sig = kp
            .sign(&ring::rand::SystemRandom::new(), &unsigned.tbs_data(&[]))
            .unwrap()
            .as_ref()
            .to_vec();
        let cose = reassemble(hdr, Some(p.clone()), sig);
        assert!(matches!(
            open1(&cose, verifier(&kp)),
            Err(StatusError::WrongAlgorithm(_))
        ));
    }
    let no_alg = HeaderBuilder::new()
        .content_type(CONTENT_TYPE.into())
        .build();
    let cose = reassemble(no_alg, Some(p), vec![0; 64]);
    assert_eq!(
        open1(&cose, |_, _| true),
        Err(StatusError::MissingAlgorithm)
    );
}

#[test]
fn alg_only_in_unprotected_header_is_refused() {
    let mut msg = CoseSign1Builder::new()
        .protected(
            HeaderBuilder::new()
                .content_type(CONTENT_TYPE.into())
                .build(),
        )
        .unprotected(
            HeaderBuilder::new()
                .algorithm(iana::Algorithm::ES256)
                .build(),
        )
        .payload(payload(&sample()).unwrap())
        .build();
    msg.signature = vec![0; 64];
    let cose = msg.to_tagged_vec().unwrap();
    assert_eq!(
        open1(&cose, |_, _| true),
        Err(StatusError::MissingAlgorithm)
    );
}

#[test]
fn header_and_shape_checks() {
    let p = payload(&sample()).unwrap();
    let accept_all = |_: &[u8], _: &[u8]| true;

    let crit = good_header()
        .add_critical(iana::HeaderParameter::Iv)
        .build();
    assert!(matches!(
        open1(&reassemble(crit, Some(p.clone()), vec![0; 64]), accept_all),
        Err(StatusError::CriticalHeaders(_))
    ));

    let other_type = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .content_type("application/cwt".into())
        .build();
    assert!(matches!(
        open1(
            &reassemble(other_type, Some(p.clone()), vec![0; 64]),
            accept_all
        ),
        Err(StatusError::WrongContentType(_))
    ));
    let no_type = HeaderBuilder::new()
        .algorithm(iana::Algorithm::ES256)
        .build();
    assert!(matches!(
        open1(
            &reassemble(no_type, Some(p.clone()), vec![0; 64]),
            accept_all
        ),
        Err(StatusError::WrongContentType(_))
    ));

    assert_eq!(
        open1(
            &reassemble(good_header().build(), None, vec![0; 64]),
            accept_all
        ),
        Err(StatusError::DetachedPayload)
    );
    assert_eq!(
        open1(
            &reassemble(good_header().build(), Some(p.clone()), vec![0; 63]),
            accept_all
        ),
        Err(StatusError::SignatureLength(63))
    );
    // Sanity: the same message with a 64-byte signature gets as far as the payload.
    assert!(open1(
        &reassemble(good_header().build(), Some(p), vec![0; 64]),
        accept_all
    )
    .is_ok());
}

type Pairs = Vec<(Value, Value)>;

/// Payloads a verifier would accept the signature on but must still refuse.
#[test]
fn malformed_payloads_are_refused() {
    let accept_all = |_: &[u8], _: &[u8]| true;
    let open_payload = |p: Vec<u8>| {
        open1(
            &reassemble(good_header().build(), Some(p), vec![0; 64]),
            accept_all,
        )
    };
    let base = || Value::from_slice(&payload(&sample()).unwrap()).unwrap();
    let with = |f: &dyn Fn(&mut Pairs)| {
        let Value::Map(mut m) = base() else {
            unreachable!()
        };
        f(&mut m);
        Value::Map(m).to_vec().unwrap()
    };
    let entry0 = |m: &mut Pairs| -> Pairs {
        let Value::Array(a) = &m[5].1 else {
            unreachable!()
        };
        let Value::Map(e) = &a[0] else { unreachable!() };
        e.clone()
    };
    let set_entry0 = |m: &mut Pairs, e: Pairs| {
        let Value::Array(a) = &mut m[5].1 else {
            unreachable!()
        };
        a[0] = Value::Map(e);
    };

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not CBOR", vec![0xff, 0x00]),
        (
            "trailing bytes",
            [payload(&sample()).unwrap(), vec![0x00]].concat(),
        ),
        ("not a map", Value::from(1).to_vec().unwrap()),
        (
            "missing exp",
            with(&|m| {
                m.remove(4);
            }),
        ),
        ("unknown key", with(&|m| m.push(("x".into(), 1.into())))),
        ("duplicate key", with(&|m| m.push(("seq".into(), 1.into())))),
        ("non-text key", with(&|m| m.push((1.into(), 1.into())))),
        ("seq negative", with(&|m| m[2].1 = Value::from(-1))),
        ("seq text", with(&|m| m[2].1 = Value::from("1"))),
        ("entries not array", with(&|m| m[5].1 = Value::from(0))),
        (
            "bad state",
            with(&|m| {
                let mut e = entry0(m);
                e[2].1 = "active".into();
                set_entry0(m, e);
            }),
        ),
        (
            "version too big",
            with(&|m| {
                let mut e = entry0(m);
                e[1].1 = Value::from(u64::from(u32::MAX) + 1);
                set_entry0(m, e);
            }),
        ),
        (
            "reason not text",
            with(&|m| {
                let mut e = entry0(m);
                e[4].1 = Value::Null;
                set_entry0(m, e);
            }),
        ),
        (
            "entry extra key",
            with(&|m| {
                let mut e = entry0(m);
                e.push(("note".into(), "x".into()));
                set_entry0(m, e);
            }),
        ),
        (
            "entry missing kid",
            with(&|m| {
                let mut e = entry0(m);
                e.remove(0);
                set_entry0(m, e);
            }),
        ),
    ];
    for (name, p) in cases {
        match open_payload(p) {
            Err(StatusError::Payload(msg)) => assert!(!msg.is_empty(), "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn garbage_inputs_are_errors_not_panics() {
    let kp = key();
    let good = sign_with(&kp, &sample());
    let never = |_: &[u8], _: &[u8]| -> bool { panic!("verify called on garbage") };

    assert!(matches!(open1(&[], never), Err(StatusError::Envelope(_))));
    // Untagged: the same array without the 0xd2 tag byte.
    assert_eq!(good[0], 0xd2);
    let e = open1(&good[1..], never).unwrap_err();
    assert!(e.to_string().contains("untagged"), "{e}");
    // A COSE_Mac0 (tag 17) with the same shape.
    let mut mac0 = good.clone();
    mac0[0] = 0xd1;
    let e = open1(&mac0, never).unwrap_err();
    assert!(e.to_string().contains("tag 17"), "{e}");
    let mac0 = coset::CoseMac0Builder::new()
        .protected(good_header().build())
        .payload(payload(&sample()).unwrap())
        .tag(vec![0; 32])
        .build()
        .to_tagged_vec()
        .unwrap();
    assert!(matches!(open1(&mac0, never), Err(StatusError::Envelope(_))));
    // Trailing data after a valid message.
    let trailing = [good.clone(), vec![0]].concat();
    assert!(matches!(
        open1(&trailing, never),
        Err(StatusError::Envelope(_))
    ));

    // Every truncation.
    for n in 0..good.len() {
        assert!(open1(&good[..n], never).is_err(), "truncated to {n}");
    }

    // Hostile lengths and nesting: huge declared sizes, deep nesting.
    let hostile: Vec<Vec<u8>> = vec![
        vec![0xd2, 0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![
            0xd2, 0x84, 0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
        vec![
            0xd2, 0x84, 0x40, 0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ],
        [vec![0xd2], vec![0x81; 10_000]].concat(),
        [vec![0xd2], vec![0x9f; 10_000]].concat(),
        [vec![0xd2], vec![0xd2; 10_000]].concat(),
        vec![0xd2, 0x84, 0x41, 0xa0, 0xa0, 0xf6, 0x40], // protected bstr wrapping garbage
    ];
    for h in hostile {
        assert!(open1(&h, never).is_err());
    }

    // Deterministic pseudo-random bytes, with and without a leading tag 18.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..2_000 {
        let len = (round % 97) + 1;
        let mut buf: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if round % 2 == 0 {
            buf[0] = 0xd2;
        }
        let _ = open1(&buf, |_, _| false);
    }
}
