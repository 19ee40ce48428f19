"""An aiosmtpd server in a child process, for tests/integration/test_relay_aiosmtpd.py.

Run as ``python aiosmtpd_server.py '<json options>'``. It listens on
``127.0.0.1`` (an ephemeral port, printed on the first line of stdout) and
stops when its stdin is closed, so it never outlives the test that started
it. Why a process and not aiosmtpd's threaded ``Controller``: the
integration tests run under gevent's monkey-patching (``conftest.py``), and
asyncio on patched ``socket``, ``select`` and ``threading`` is not a
supported combination; a separate interpreter gives aiosmtpd a stock stdlib.

Everything a test checks is written to the spool directory *before* the
reply that ends the command goes out, so by the time the client has its
reply the record is there, and the test needs no waiting:

* ``<n>.json``: one per accepted message (envelope, options, the exact bytes
  received after dot-unstuffing, the connection it came on, TLS and AUTH);
* ``auth.log``: one line per AUTH command seen, with the mechanism only (the
  AUTH line's initial response carries the secret).

Options (all optional but ``spool``): ``decode_data``, ``smtputf8``,
``cert`` (a PEM file with key and chain: STARTTLS is offered),
``users`` (``{login: password}``: AUTH is offered), ``auth_require_tls``
(default true), ``cram_md5`` (offer a CRAM-MD5 written here, as aiosmtpd has
none).

Behaviour keyed on addresses: a recipient whose local part starts with
``bad`` gets ``550 5.1.1``, ``full`` gets ``452 4.2.2``; a sender starting
with ``reject`` gets ``554 5.6.0`` after the data, ``defer`` ``451 4.3.0``.
The login ``tempfail`` gets ``454 4.7.0``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import os
import secrets
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

HOSTNAME = "aiosmtpd.test"


class Handler:
    """Records what it accepts; refuses according to the address."""

    def __init__(self, spool: Path, users: dict[str, str]) -> None:
        self.spool = spool
        self.users = users
        self.numbers = itertools.count(1)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        local = address.split("@", 1)[0]
        if local.startswith("bad"):
            return "550 5.1.1 No such user here"
        if local.startswith("full"):
            return "452 4.2.2 Mailbox full"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        local = (envelope.mail_from or "").split("@", 1)[0]
        if local.startswith("reject"):
            return "554 5.6.0 Message refused"
        if local.startswith("defer"):
            return "451 4.3.0 Try again later"
        number = next(self.numbers)
        record = {
            "connection": server.connection_number,
            "peer": list(session.peer),
            "helo": session.host_name,
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "smtp_utf8": envelope.smtp_utf8,
            "tls": session.ssl is not None,
            "auth": session.auth_data if session.authenticated else None,
            "content": base64.b64encode(envelope.original_content).decode("ascii"),
        }
        path = self.spool / f"{number:04d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        return f"250 2.0.0 OK queued as {number}"

    async def handle_AUTH(self, server: Any, session: Any, envelope: Any, args: list[str]) -> Any:
        with open(self.spool / "auth.log", "a") as log:
            log.write(args[0].upper() + "\n")
        return MISSING

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8")
        if login == "tempfail":
            return AuthResult(
                success=False, handled=False, message="454 4.7.0 Temporary authentication failure"
            )
        expected = self.users.get(login)
        if expected is None or not hmac.compare_digest(auth_data.password, expected.encode()):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=login)


class CramMd5Handler(Handler):
    """Adds CRAM-MD5 (RFC 2195): aiosmtpd finds ``auth_*`` methods on handlers."""

    async def auth_CRAM__MD5(self, server: Any, args: list[str]) -> AuthResult:
        if len(args) > 1:
            # RFC 4954 4: the server speaks first in CRAM-MD5.
            await server.push("501 5.7.0 Initial response not allowed")
            return AuthResult(success=False, handled=True)
        challenge = f"<{secrets.token_hex(8)}@{HOSTNAME}>".encode("ascii")
        response = await server.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        login, _, digest = response.rpartition(b" ")
        user = login.decode("utf-8", "replace")
        password = self.users.get(user)
        if password is None:
            return AuthResult(success=False, handled=False)
        expected = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest().encode()
        if not hmac.compare_digest(digest, expected):
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=user)


async def serve(options: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    spool = Path(options["spool"])
    users = options.get("users") or {}
    handler_class = CramMd5Handler if options.get("cram_md5") else Handler
    handler = handler_class(spool, users)
    tls_context = None
    if options.get("cert"):
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(options["cert"])
    connections = itertools.count(1)

    def factory() -> SMTP:
        smtp = SMTP(
            handler,
            hostname=HOSTNAME,
            decode_data=bool(options.get("decode_data")),
            enable_SMTPUTF8=bool(options.get("smtputf8")),
            tls_context=tls_context,
            authenticator=handler.authenticate if users else None,
            auth_require_tls=options.get("auth_require_tls", True),
            # Without users, offer no mechanism at all.
            auth_exclude_mechanism=None if users else ["LOGIN", "PLAIN"],
            loop=loop,
        )
        smtp.connection_number = next(connections)  # type: ignore[attr-defined]
        return smtp

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = await loop.create_server(factory, sock=sock)
    print(sock.getsockname()[1], flush=True)
    # Serve until the parent closes our stdin (or dies).
    await loop.run_in_executor(None, sys.stdin.buffer.read)
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(json.loads(sys.argv[1])))
