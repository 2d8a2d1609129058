#!/usr/bin/env python3
"""A customer's phone, in Python: makes a device key and signs customer QR tokens with pycose.

  device_token.py keygen ed25519|es256 KEYFILE     -> prints the public key (SPKI PEM)
  device_token.py sign KEYFILE KID SUBJECT [IAT_OFFSET_SECONDS [LIFE_SECONDS]]
                                                   -> prints "TKD1:" + Base45(COSE_Sign1)

Claims: sub (2), exp (4), iat (6), cti (7, 16 random bytes). Shares no code with tillkey.
"""

import os
import sys
import time

import base45
import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pycose.algorithms import EdDSA, Es256
from pycose.headers import Algorithm, KID
from pycose.keys import EC2Key, OKPKey
from pycose.keys.curves import Ed25519, P256
from pycose.messages import Sign1Message


def keygen(alg, path):
    key = ed25519.Ed25519PrivateKey.generate() if alg == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    print(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def sign(path, kid, subject, offset=0, life=60):
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    now = int(time.time()) + int(offset)
    claims = cbor2.dumps({2: subject, 4: now + int(life), 6: now, 7: os.urandom(16)})
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        alg, cose_key = EdDSA, OKPKey(crv=Ed25519, d=raw)
    else:
        n = key.private_numbers()
        alg = Es256
        cose_key = EC2Key(crv=P256, d=n.private_value.to_bytes(32, "big"),
                          x=n.public_numbers.x.to_bytes(32, "big"), y=n.public_numbers.y.to_bytes(32, "big"))
    msg = Sign1Message(phdr={Algorithm: alg, KID: kid.encode()}, payload=claims)
    msg.key = cose_key
    print("TKD1:" + base45.b45encode(msg.encode(tag=True)).decode())


if __name__ == "__main__":
    if sys.argv[1] == "keygen":
        keygen(sys.argv[2], sys.argv[3])
    else:
        sign(*sys.argv[2:])
