"""The code blocks of ``docs/`` are run, so that the pages cannot drift from the code.

Every ``.. code-block::`` of a page says with its ``:class:`` what it is, and
this file treats it accordingly:

``session``
    A shell session: each ``$ command`` runs with bash in a fresh temporary
    directory (``.venv/bin/`` meaning the interpreter's own directory, which
    is also first on ``PATH``), and its output (standard output and error)
    must match the lines that follow. In the expected lines, ``...`` matches
    any text within a line, and a line that is only ``...`` any number of
    lines. A session with a ``:name:`` needs a running server and has a test
    of its own below.
``script``
    A complete Python script; each has a test of its own below (found by
    its ``:name:``), which runs it as a process and talks to it.
``config``
    A ``slimta serve`` configuration: ``slimta check-config`` must accept it
    (the certificate, key and DKIM key files it names are made here).
``readme``
    The README's own commands, which CI runs: the block must be the README's.
``fragment``
    A part of something, not runnable alone; Python must still compile and
    TOML parse.

A block without one of these classes fails the test, so a new block cannot
escape. The reference generated from the command's code
(``docs/_ext/slimta_reference.py``) is checked here too: it must cover every
configuration key and subcommand.
"""

from __future__ import annotations

import os
import re
import select
import signal
import smtplib
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
#: Seconds a command, a log line or a delivery may take.
DEADLINE = 30.0

KINDS = frozenset({"session", "script", "config", "readme", "fragment"})

sys.path.insert(0, str(DOCS / "_ext"))
import slimta_reference  # noqa: E402


@dataclass
class Block:
    """One ``.. code-block::`` of a page."""

    page: str
    line: int
    language: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def classes(self) -> set[str]:
        return set(self.options.get("class", "").split())

    @property
    def name(self) -> str | None:
        return self.options.get("name")

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. code-block::\s*(?P<language>\S*)\s*$")


def parse_blocks(path: Path) -> list[Block]:
    """The code blocks of the reST file *path*, their options and dedented text."""
    lines = path.read_text(encoding="utf-8").split("\n")
    page = str(path.relative_to(DOCS))
    blocks = []
    index = 0
    while index < len(lines):
        match = _DIRECTIVE.match(lines[index])
        index += 1
        if not match:
            continue
        indent = len(match.group("indent"))
        block = Block(page, index, match.group("language"))
        option = re.compile(rf"^\s{{{indent + 1},}}:(?P<key>[\w-]+):\s*(?P<value>.*)$")
        while index < len(lines) and (found := option.match(lines[index])):
            block.options[found.group("key")] = found.group("value").strip()
            index += 1
        body = []
        while index < len(lines):
            line = lines[index]
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            body.append(line)
            index += 1
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        margin = min(len(line) - len(line.lstrip()) for line in body if line.strip())
        block.text = "\n".join(line[margin:] for line in body) + "\n"
        blocks.append(block)
    return blocks


BLOCKS = [block for page in sorted(DOCS.rglob("*.rst")) for block in parse_blocks(page)]


def of_kind(kind: str, named: bool | None = None) -> list[Block]:
    found = [block for block in BLOCKS if kind in block.classes]
    if named is not None:
        found = [block for block in found if (block.name is not None) == named]
    return found


def named(name: str) -> Block:
    (block,) = [block for block in BLOCKS if block.name == name]
    return block


def test_the_pages_have_blocks() -> None:
    # The parser must find what it is meant to check.
    assert len(BLOCKS) > 10
    assert of_kind("session") and of_kind("script") and of_kind("config")


def test_every_block_says_what_it_is() -> None:
    unclassified = [f"{block}" for block in BLOCKS if len(block.classes & KINDS) != 1]
    assert not unclassified, f"give these blocks one :class: of {sorted(KINDS)}"


def test_every_named_block_has_its_test() -> None:
    names = {block.name for block in of_kind("script")} | {
        block.name for block in of_kind("session", named=True)
    }
    assert names == NAMED_TESTS, "a script or server session without its test, or the reverse"


# --- matching output ------------------------------------------------------------------


def expected_pattern(expected: str) -> re.Pattern[str]:
    """A regex for *expected*: ``...`` is any text in a line, a ``...`` line any lines."""
    if not expected:
        return re.compile("")  # no output at all
    parts = []
    for line in expected.rstrip("\n").split("\n"):
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(map(re.escape, line.split("..."))) + r"\n")
    return re.compile("".join(parts))


def assert_matches(actual: str, expected: str, where: object) -> None:
    text = actual if actual.endswith("\n") or not actual else actual + "\n"
    assert expected_pattern(expected).fullmatch(text), (
        f"{where}: the output does not match the docs\n--- expected:\n{expected}--- got:\n{text}"
    )


def test_the_matcher() -> None:
    # The rules the session blocks rely on, checked, so the tests can fail.
    assert_matches("a\nb\nc\n", "a\n...\nc\n", "matcher")
    assert_matches("key = abc123\n", "key = ...\n", "matcher")
    assert_matches("", "", "matcher")
    assert expected_pattern("").fullmatch("something\n") is None
    assert expected_pattern("a\nc\n").fullmatch("a\nb\nc\n") is None
    assert expected_pattern("x = 1\n").fullmatch("x = 2\n") is None


def commands(block: Block) -> list[tuple[str, str]]:
    """``[(command, expected output)]`` of a session block."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.rstrip("\n").split("\n"):
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block}: a session starts with a $ command"
            steps[-1][1].append(line)
    return [(command, "".join(f"{line}\n" for line in out)) for command, out in steps]


def run_command(command: str, cwd: Path, port: int | None = None) -> str:
    """*command* run by bash in *cwd*; its output. ``.venv/bin/`` is this
    interpreter's directory; with *port*, 2525 becomes *port*."""
    command = command.replace(".venv/bin/", f"{BIN}/")
    if port is not None:
        command = command.replace("2525", str(port))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    return result.stdout


@pytest.mark.parametrize("block", of_kind("session", named=False), ids=str)
def test_session(block: Block, tmp_path: Path) -> None:
    for command, expected in commands(block):
        assert_matches(run_command(command, tmp_path), expected, f"{block}: $ {command}")


# --- configuration files ------------------------------------------------------------------


def _files_named(config: dict[str, object]) -> dict[str, str]:
    """``{file name in the config: what it must hold}`` for the keys that name files."""
    files = {}
    tls = config.get("tls")
    if isinstance(tls, dict):
        files[tls["cert"]] = "cert"
        files[tls["key"]] = "key"
    policies = config.get("policies")
    if isinstance(policies, dict) and isinstance(policies.get("dkim"), dict):
        files[policies["dkim"]["key_file"]] = "dkim"
    return files


@pytest.mark.parametrize("block", of_kind("config"), ids=str)
def test_config(block: Block, tmp_path: Path) -> None:
    text = block.text
    ca = trustme.CA()
    cert = ca.issue_cert("mail.example.com")
    for index, (name, what) in enumerate(_files_named(tomllib.loads(text)).items()):
        made = tmp_path / f"file{index}.pem"
        if what == "cert":
            cert.cert_chain_pems[0].write_to_path(str(made))
        elif what == "key":
            cert.private_key_pem.write_to_path(str(made))
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            made.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        # The docs name real paths (/etc/slimta/...); the test's files stand in.
        text = text.replace(f'"{name}"', f'"{made}"')
    (tmp_path / "slimta.toml").write_text(text)
    output = run_command("slimta check-config slimta.toml; echo status $?", tmp_path)
    assert output.startswith("slimta.toml: ok\n"), f"{block}:\n{output}"
    assert output.endswith("status 0\n"), f"{block}:\n{output}"
    assert "WARNING" not in output, f"{block}:\n{output}"


def test_example_config_passes_check_config(tmp_path: Path) -> None:
    # command.rst shows `slimta example-config` through a directive, never a
    # copy; what the directive includes must be a valid file.
    text = (DOCS / "command.rst").read_text()
    assert ".. slimta-example-config::" in text
    literal = slimta_reference.example_config_lines()
    assert literal[0] == ".. code-block:: toml"
    config = "\n".join(line[3:] for line in literal[2:]) + "\n"
    (tmp_path / "example.toml").write_text(config)
    output = run_command("slimta check-config example.toml; echo status $?", tmp_path)
    assert output.startswith("example.toml: ok\n") and output.endswith("status 0\n"), output


# --- fragments and the README ---------------------------------------------------------------


@pytest.mark.parametrize("block", of_kind("fragment"), ids=str)
def test_fragment(block: Block) -> None:
    if block.language == "python":
        compile(block.text, str(block), "exec")
    elif block.language == "toml":
        tomllib.loads(block.text)


def test_readme_commands() -> None:
    (block,) = of_kind("readme")
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```sh\n(.*?)```", readme, re.DOTALL)
    assert match, "README.md has no ```sh block"
    assert block.text == match.group(1), f"{block} differs from README.md's first commands"


# --- the reference generated from the command ------------------------------------------------


def test_reference_covers_every_key() -> None:
    from slimta.cli.schema import SECTIONS

    text = "\n".join(slimta_reference.config_reference_lines())
    for sec in SECTIONS:
        assert f".. _config-{sec.name.replace('.', '-')}:" in text, sec.name
        for key in sec.keys:
            assert f"``{key.name}``" in text or sec.key_kind is not None, f"{sec.name}.{key.name}"
    assert ".. slimta-config-reference::" in (DOCS / "command.rst").read_text()


def test_reference_covers_every_subcommand() -> None:
    result = subprocess.run(
        [str(BIN / "slimta"), "--help"], capture_output=True, text=True, check=True
    )
    listed = re.findall(r"^    (\S+)", result.stdout.split("COMMAND\n", 2)[-1], re.MULTILINE)
    documented = [name for name, _ in slimta_reference.command_help()]
    assert listed, result.stdout
    assert documented == ["slimta", *(f"slimta {name}" for name in listed)]
    assert ".. slimta-command-help::" in (DOCS / "command.rst").read_text()


# --- blocks that need a server: one test each ----------------------------------------------------


class Process:
    """A process whose standard error is read line by line, with a deadline."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self._partial = b""
        self._seen = 0

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first line not waited for before that matches *pattern*."""
        regex = re.compile(pattern)
        until = time.monotonic() + DEADLINE
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while True:
            while self._seen < len(self.lines):
                match = regex.search(self.lines[self._seen])
                self._seen += 1
                if match:
                    return match
            left = until - time.monotonic()
            assert left > 0, f"no line like {pattern!r}; got:\n" + "\n".join(self.lines)
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                assert chunk, "the process ended; it wrote:\n" + "\n".join(self.lines)
                *complete, self._partial = (self._partial + chunk).split(b"\n")
                self.lines += [line.decode("utf-8", "replace") for line in complete]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=DEADLINE)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            assert stream is not None
            stream.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.close()


def test_quickstart_server(tmp_path: Path, processes: list[Process]) -> None:
    # The quick start's log excerpt and its smtplib command, against the
    # embedded default. The test cannot take port 2525: it listens where
    # --listen says, which also names the listener "listen[0]".
    server = Process([str(BIN / "slimta"), "serve", "--listen", "127.0.0.1:0"], tmp_path)
    processes.append(server)
    port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+) ").group(1))
    server.wait_for(r"ready \(pid \d+\)")
    log = "".join(f"{line}\n" for line in server.lines)
    expected = named("quickstart-serve-log").text
    expected = expected.replace("127.0.0.1:2525", f"127.0.0.1:{port}")
    expected = expected.replace('listener "smtp"', 'listener "listen[0]"')
    assert_matches(log, expected, named("quickstart-serve-log"))

    block = named("quickstart-send")
    for command, output in commands(block):
        assert_matches(run_command(command, tmp_path, port=port), output, block)
    server.wait_for(r"delivered .*recipient='you@localhost'")
    (delivered,) = (tmp_path / "slimta-data" / "mail" / "you" / "new").iterdir()
    assert delivered.read_bytes().endswith(b"\r\n\r\nHello.\r\n")
    assert server.stop() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(process: Process, port: int) -> None:
    until = time.monotonic() + DEADLINE
    while True:
        assert process.proc.poll() is None, "the script exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            assert time.monotonic() < until, f"nothing listens on {port}"
            # Polling a foreign process that does not say when it listens.
            time.sleep(0.05)


def test_quickstart_first_script(tmp_path: Path, processes: list[Process]) -> None:
    block = named("quickstart-first-script")
    port = _free_port()
    # The docs' script listens on 2525; here, on a free port.
    (tmp_path / "first.py").write_text(block.text.replace("2525", str(port)))
    script = Process([sys.executable, "first.py"], tmp_path)
    processes.append(script)
    _wait_listening(script, port)

    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
        client.ehlo("client.test")
        client.mail("me@example.com")
        code, _ = client.rcpt("bob@other.test")
        assert code == 550
        client.rset()
        message = b"From: me@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"
        assert client.sendmail("me@example.com", ["alice@example.org"], message) == {}
    script.wait_for(r"delivered .*recipient='alice@example.org'")
    (delivered,) = (tmp_path / "mail" / "alice" / "new").iterdir()
    data = delivered.read_bytes()
    assert b"\r\nReceived: from client.test" in data
    assert b"\r\nMessage-Id: <" in data or b"\r\nMessage-ID: <" in data


#: The named blocks that the tests above run.
NAMED_TESTS = {"quickstart-serve-log", "quickstart-send", "quickstart-first-script"}
