"""``slimta setup systemd``: a systemd unit file for ``slimta serve``.

Printed on standard output, to be saved as
``/etc/systemd/system/slimta.service``; nothing is installed. The unit runs
the very program that printed it (the absolute path of the ``slimta``
script, or of the Python interpreter with ``-m slimta``) with the
configuration file's absolute path, so it does not depend on ``PATH`` or
the current directory.

* ``Type=simple``: the server does not speak the ``sd_notify`` protocol, so
  systemd counts it as started as soon as the process runs;
* ``ExecReload`` sends SIGHUP (the server reloads its configuration) and
  SIGTERM stops it; ``TimeoutStopSec`` leaves room for the two
  ``server.shutdown_grace`` periods of a stop (sessions, then deliveries);
* ``--user U`` (or ``server.user``): systemd starts the server as root, which
  reads the TLS key and binds the ports, and the server switches to U
  itself (``slimta serve --user U``);
* hardening: ``NoNewPrivileges``, ``ProtectSystem=strict`` with the data
  directory and the Maildirs as the only writable places
  (``ReadWritePaths``), ``PrivateTmp`` (unless one of them is in ``/tmp``),
  ``ProtectHome=read-only``, a capability bounding set of
  ``CAP_NET_BIND_SERVICE`` (ports below 1024), ``CAP_SETUID`` and
  ``CAP_SETGID`` (the switch of user), and the usual kernel protections.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from slimta.cli.config import Config, default_config, load_file

__all__ = ["command_line", "render_unit", "run_setup_systemd", "systemd_quote"]

#: The shared temporary directories, which ``PrivateTmp`` replaces.
_TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
#: Seconds added to the two grace periods for the process to exit.
_EXIT_MARGIN = 15


def systemd_quote(word: str) -> str:
    """*word* as one word of a unit file's command line or path list: ``%``
    (specifiers) doubled, and quoted when it holds spaces, quotes or
    backslashes."""
    word = word.replace("%", "%%")
    if word and re.fullmatch(r"[^\s\"'\\]+", word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def command_line(argv0: str | None = None, executable: str | None = None) -> list[str]:
    """How to start ``slimta`` again: the absolute path of the ``slimta``
    script that runs now, or the interpreter with ``-m slimta``."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    script = Path(argv0)
    if script.name == "slimta" and script.exists():
        return [os.path.abspath(script)]
    return [os.path.abspath(executable), "-m", "slimta"]


def _writable(config: Config) -> list[Path]:
    """The directories the server writes to, the data directory first;
    those inside another one are left out."""
    paths = [config.server.data_dir, config.local.mail_dir]
    if "maildir" in config.relays_used():
        paths.append(config.maildir.path)
    absolute = [path.absolute() for path in paths]
    kept: list[Path] = []
    for path in absolute:
        inside = any(path != other and path.is_relative_to(other) for other in absolute)
        if not inside and path not in kept:
            kept.append(path)
    return kept


def render_unit(
    config: Config,
    config_path: str | None,
    user: str | None,
    program: Sequence[str],
    working_dir: Path,
) -> str:
    """The unit file's text.

    :param config: the configuration the unit runs.
    :param config_path: its file (``None``: the embedded default).
    :param user: the user to switch to (``--user``), if any.
    :param program: how to start ``slimta`` (:func:`command_line`).
    :param working_dir: the directory the server runs in; relative paths of
        the embedded default are relative to it.
    """
    command = [*program, "serve"]
    if config_path is not None:
        command += ["--config", os.path.abspath(config_path)]
    if user is not None:
        command += ["--user", user]
    runs_as = user or config.server.user
    grace = config.server.shutdown_grace
    stop_timeout = math.ceil(2 * grace) + _EXIT_MARGIN
    paths = _writable(config)
    writable = " ".join(systemd_quote(str(path)) for path in paths)
    # A private /tmp would hide a data directory kept in the shared one.
    in_tmp = any(path.is_relative_to(tmp) for path in paths for tmp in _TMP_DIRS)
    data_dir = config.server.data_dir.absolute()
    lines = [
        "# slimta.service, from: slimta setup systemd",
        "# Save as /etc/systemd/system/slimta.service, then:",
        "#   systemctl daemon-reload && systemctl enable --now slimta",
    ]
    owner = f" owned by {runs_as}" if runs_as else ""
    lines.append(f"# Create {data_dir}{owner} first: every ReadWritePaths entry must exist.")
    if runs_as:
        lines.append(f"# The server starts as root, binds its ports, then switches to {runs_as}.")
    else:
        lines.append(
            "# The server runs as root: consider --user (slimta setup systemd --user mail)."
        )
    lines += [
        "",
        "[Unit]",
        "Description=slimta mail server",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={' '.join(systemd_quote(word) for word in command)}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={stop_timeout}",
        "Restart=on-failure",
        f"WorkingDirectory={systemd_quote(str(working_dir.absolute()))}",
        "UMask=0027",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={writable}",
        f"PrivateTmp={'no' if in_tmp else 'yes'}",
        "ProtectHome=read-only",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def run_setup_systemd(config_path: str | None, user: str | None) -> str:
    """``slimta setup systemd``: :returns: the unit file's text.

    :raises CliError: the configuration cannot be read or is invalid.
    """
    config = default_config() if config_path is None else load_file(config_path)
    return render_unit(config, config_path, user, command_line(), Path.cwd())
