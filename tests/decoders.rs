//! The fuzz target's decoders over many seeded random and mutated inputs, in every test run: no
//! input from outside may panic a decoder. (libFuzzer runs the same function: fuzz/README.md.)

use tillkey::retail::cwt::{self, Claims};
use tillkey::retail::fuzz_decoders;

/// xorshift64*: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let claims = Claims {
        kind: "pos-paid".into(),
        store: "1212".into(),
        pos: "0001".into(),
        purchase: "P-42".into(),
        amount: 1250,
        currency: "EUR".into(),
        description: Some("coffee".into()),
        payment_ref: Some("R".into()),
        request: Some(vec![1; 16]),
        issued_at: 1_795_000_000,
        expires_at: 1_795_000_600,
    };
    let payload = claims.to_cbor().unwrap();
    let mac0 = cwt::seal_mac0(payload.clone(), "paid#1", |_| Ok(vec![9; 32])).unwrap();
    let sign1 = cwt::seal_sign1(payload.clone(), "store#1", |_| Ok(vec![9; 64])).unwrap();
    let text = cwt::to_text("TKP1:", &mac0).into_bytes();
    vec![
        payload,
        mac0,
        sign1,
        text,
        b"ABCD-EFGH-JKMN-PQRS".to_vec(),
        b"90d".to_vec(),
    ]
}

#[test]
fn decoders_survive_random_and_mutated_input() {
    let mut rng = Rng(0x7111_6b65_795f_6675);
    let seeds = seeds();
    for s in &seeds {
        fuzz_decoders(s);
    }
    for _ in 0..30_000 {
        let mut input = seeds[rng.below(seeds.len())].clone();
        match rng.below(5) {
            0 => {
                let len = rng.below(300);
                input = (0..len).map(|_| rng.next() as u8).collect();
            }
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(input.len());
                    if let Some(b) = input.get_mut(i) {
                        *b ^= 1 << rng.below(8);
                    }
                }
            }
            2 => input.truncate(rng.below(input.len() + 1)),
            3 => {
                let at = rng.below(input.len() + 1);
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                input.splice(at..at, junk);
            }
            _ => {
                // Deep nesting: arrays inside arrays.
                input = vec![0x81; rng.below(5000)];
            }
        }
        fuzz_decoders(&input);
    }
}
