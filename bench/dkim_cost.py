#!/usr/bin/env python
"""What DKIM signing costs per message (slimta.policy.dkim.DkimSign).

Signs a 1 KiB and a 100 KiB message with RSA-2048 and Ed25519 keys made
here (with ``cryptography``), ``--count`` times each after ``--warmup``
signings, and prints microseconds per message (time.perf_counter). Each
signing is ``DkimSign.apply`` on a fresh copy of the parsed envelope, so it
includes finding the ``From:`` field, hashing the body and prepending the
field; the copy is made outside the timed part.

    .venv/bin/python bench/dkim_cost.py [--count 500] [--warmup 50]
"""

import argparse
import importlib.metadata
import platform
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from slimta.envelope import Envelope
from slimta.policy.dkim import DkimSign

LINE = b"hello world, this is a line of text in the body of the message.\r\n"  # 66 bytes
HEADERS = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@other.test\r\n"
    b"Subject: bench\r\n"
    b"Date: Sun, 06 Dec 2026 05:00:00 +0000\r\n"
    b"Message-ID: <bench@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
)


def message(size: int) -> bytes:
    body = LINE * ((size - len(HEADERS)) // len(LINE) + 1)
    return HEADERS + body[: size - len(HEADERS) - 2] + b"\r\n"


def policies() -> dict[str, DkimSign]:
    none = serialization.NoEncryption()
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, none
    )
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none
    )
    return {
        "rsa-2048": DkimSign("bench", "example.test", rsa_pem),
        "ed25519": DkimSign("bench", "example.test", ed_pem, algorithm="ed25519-sha256"),
    }


def per_message(policy: DkimSign, data: bytes, count: int, warmup: int) -> float:
    """Microseconds per signed message."""
    template = Envelope("alice@example.test", ["bob@other.test"])
    template.parse(data)
    for _ in range(warmup):
        policy.apply(template.copy())
    envelopes = [template.copy() for _ in range(count)]
    began = time.perf_counter()
    for env in envelopes:
        policy.apply(env)
    took = time.perf_counter() - began
    assert all(env.flatten()[0].startswith(b"DKIM-Signature:") for env in envelopes)
    return took / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    sizes = {"1 KiB": 1024, "100 KiB": 100 * 1024}
    print(
        f"python {platform.python_version()}, dkimpy {importlib.metadata.version('dkimpy')}, "
        f"{args.count} signings after {args.warmup}"
    )
    print(f"{'key':<10}" + "".join(f"{name:>14}" for name in sizes))
    for key_name, policy in policies().items():
        cells = [
            per_message(policy, message(size), args.count, args.warmup) for size in sizes.values()
        ]
        print(f"{key_name:<10}" + "".join(f"{cell:>11.0f} us" for cell in cells))
    # The sizes really are what the table says.
    assert [len(message(size)) for size in sizes.values()] == list(sizes.values())


if __name__ == "__main__":
    main()
