#!/usr/bin/env python3
"""Independent check of a tillkey retail token (POS request or paid QR text).

Usage: verify_cwt.py TOKEN_TEXT (--hmac-hex KEY | --pem PUBLIC_KEY.pem)

Strips the text prefix (e.g. "TKR1:"), decodes Base45 with the `base45` package, and verifies the
COSE_Mac0 (HMAC 256/256, with the given key) or COSE_Sign1 (ES256, with the given P-256 public
key) with pycose. Prints the CWT claims as JSON (claim keys as strings); exits non-zero on any
failure. Shares no code with the Rust side.
"""

import json
import sys

import base45
import cbor2
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pycose.algorithms import Es256, HMAC256
from pycose.headers import Algorithm
from pycose.keys import EC2Key, SymmetricKey
from pycose.keys.curves import P256
from pycose.messages import CoseMessage, Mac0Message, Sign1Message

from verify_status_list import thaw


def decode(encoded):
    try:
        return CoseMessage.decode(encoded)
    except TypeError:
        # pycose 1.1 with cbor2 >= 6 (see verify_status_list.py): unwrap the tag ourselves.
        outer = cbor2.loads(encoded)
        for cls in (Mac0Message, Sign1Message):
            if isinstance(outer, cbor2.CBORTag) and outer.tag == cls.cbor_tag:
                return cls.from_cose_obj(thaw(outer.value), True)
        raise


def jsonable(value):
    """Claims as JSON: map keys as strings, byte strings as hex."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "items"):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def main(argv):
    if len(argv) != 4 or argv[2] not in ("--hmac-hex", "--pem"):
        raise ValueError(f"usage: {argv[0]} TOKEN (--hmac-hex KEY | --pem FILE)")
    text = argv[1]
    if ":" not in text[:6]:
        raise ValueError("no token prefix")
    prefix, body = text.split(":", 1)
    msg = decode(base45.b45decode(body))
    alg = msg.phdr.get(Algorithm)
    if argv[2] == "--hmac-hex":
        if not isinstance(msg, Mac0Message) or alg is not HMAC256:
            raise ValueError(f"expected COSE_Mac0 with HMAC 256/256, got {type(msg).__name__} {alg!r}")
        msg.key = SymmetricKey(k=bytes.fromhex(argv[3]))
        if not msg.verify_tag():
            raise ValueError("MAC does not verify")
    else:
        if not isinstance(msg, Sign1Message) or alg is not Es256:
            raise ValueError(f"expected COSE_Sign1 with ES256, got {type(msg).__name__} {alg!r}")
        with open(argv[3], "rb") as f:
            public = load_pem_public_key(f.read())
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError("not an EC public key")
        n = public.public_numbers()
        msg.key = EC2Key(crv=P256, x=n.x.to_bytes(32, "big"), y=n.y.to_bytes(32, "big"))
        if not msg.verify_signature():
            raise ValueError("signature does not verify")
    out = jsonable(cbor2.loads(msg.payload))
    out["prefix"] = prefix
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    try:
        main(sys.argv)
    except Exception as e:  # any failure is a refusal
        print(f"verify_cwt: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
