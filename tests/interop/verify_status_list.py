#!/usr/bin/env python3
"""Independent check of a tillkey status list: verify a tagged COSE_Sign1 with pycose.

Usage: verify_status_list.py STATUS_LIST.cose PUBLIC_KEY.pem

Shares no code with the Rust encoder (pycose + cbor2 + cryptography only), so a passing run
shows that a third-party COSE stack reads what tillkey signs. Prints the payload as JSON on
success; exits non-zero, with the reason on stderr, on any failure.
"""

import json
import sys
from collections.abc import Mapping

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pycose.algorithms import Es256
from pycose.headers import Algorithm
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import CoseMessage, Sign1Message


def thaw(value):
    """Tuples back to lists and frozen maps back to dicts, as cbor2 < 6 returned them."""
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    return value


def decode_sign1(encoded):
    try:
        return CoseMessage.decode(encoded)
    except TypeError:
        # pycose 1.1.0 with cbor2 >= 6, which decodes what is inside a tag as immutable
        # (tuples, frozen maps) and so trips pycose's list and dict checks (pycose issue #141).
        # Unwrap the tag here, exactly as CoseMessage.decode would; headers and signature are
        # still pycose's to check.
        outer = cbor2.loads(encoded)
        if not (
            isinstance(outer, cbor2.CBORTag)
            and outer.tag == Sign1Message.cbor_tag
            and isinstance(outer.value, tuple)
        ):
            raise
        return Sign1Message.from_cose_obj(thaw(outer.value), True)


def main(argv):
    if len(argv) != 3:
        raise ValueError(f"usage: {argv[0]} STATUS_LIST.cose PUBLIC_KEY.pem")
    with open(argv[1], "rb") as f:
        encoded = f.read()
    with open(argv[2], "rb") as f:
        public = load_pem_public_key(f.read())
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise ValueError(f"public key is {type(public).__name__}, not P-256")
    numbers = public.public_numbers()

    msg = decode_sign1(encoded)
    if not isinstance(msg, Sign1Message):
        raise ValueError(f"not a COSE_Sign1 message: {type(msg).__name__}")
    alg = msg.phdr.get(Algorithm)
    if alg is not Es256:
        raise ValueError(f"protected alg is {alg!r}, expected ES256")
    if msg.payload is None:
        raise ValueError("payload is detached")

    msg.key = EC2Key(crv=P256, x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"))
    if not msg.verify_signature():
        raise ValueError("signature does not verify")

    payload = cbor2.loads(msg.payload)
    if not isinstance(payload, dict):
        raise ValueError(f"payload is {type(payload).__name__}, not a map")
    print(json.dumps(payload, sort_keys=True))


if __name__ == "__main__":
    try:
        main(sys.argv)
    except Exception as e:  # any failure, including pycose/cbor2 decode errors, is a refusal
        print(f"verify_status_list: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
