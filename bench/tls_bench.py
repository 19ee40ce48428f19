#!/usr/bin/env python3
"""TLS submission benchmark: STARTTLS + AUTH PLAIN + one message per connection.

Runs the same load against this project's edge and python-slimta 5.0.5's,
interleaved, and reports messages per second and server CPU per message
with same-run ratios. Stdlib only (the client is smtplib in worker
processes); certificates come from the ``openssl`` command.

    python3 bench/tls_bench.py [--sut PY] [--anchor PY] [--messages N]
                               [--workers W] [--reps R]
"""

import argparse
import json
import multiprocessing
import os
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MESSAGE = (
    b"From: bench@localhost\r\nTo: sink@localhost\r\nSubject: tls bench\r\n\r\n"
    + b"x" * 78
    + b"\r\n"
) * 1 + (b"y" * 78 + b"\r\n") * 12


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def make_cert(directory):
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def client_worker(args):
    port, count = args
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    done = 0
    for _ in range(count):
        smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.localhost", timeout=30)
        smtp.ehlo()
        smtp.starttls(context=ctx)
        smtp.ehlo()
        # AUTH PLAIN explicitly: login() would pick CRAM-MD5 first.
        smtp.user, smtp.password = "bench", "password"
        code, resp = smtp.auth("PLAIN", smtp.auth_plain)
        if code != 235:
            raise RuntimeError("AUTH PLAIN failed: %d %r" % (code, resp))
        smtp.sendmail("bench@localhost", ["sink@localhost"], MESSAGE)
        smtp.quit()
        done += 1
    return done


def run_one(python, cert, key, messages, workers):
    port = free_port()
    proc = subprocess.Popen(
        [
            python,
            "-W",
            "ignore",
            os.path.join(HERE, "tls_server.py"),
            "--port",
            str(port),
            "--cert",
            cert,
            "--key",
            key,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"server did not start: {line} {proc.stderr.read()}")
        with multiprocessing.Pool(workers) as pool:
            pool.map(client_worker, [(port, 20)] * workers)  # warm-up
            per = [messages // workers] * workers
            ticks0 = cpu_ticks(proc.pid)
            start = time.monotonic()
            sent = sum(pool.map(client_worker, [(port, n) for n in per]))
            wall = time.monotonic() - start
            ticks1 = cpu_ticks(proc.pid)
        cpu_us = (ticks1 - ticks0) * 1e6 / os.sysconf("SC_CLK_TCK") / sent
        return {"msgs_per_s": sent / wall, "cpu_us_per_msg": cpu_us, "messages": sent}
    finally:
        proc.terminate()
        proc.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sut", default=os.path.join(REPO, ".venv", "bin", "python"))
    parser.add_argument(
        "--anchor", default=os.path.expanduser("~/.cache/slimta-bench/anchor-venv/bin/python")
    )
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = {"sut": [], "anchor": []}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(tmp)
        for rep in range(args.reps):
            order = ["sut", "anchor"] if rep % 2 == 0 else ["anchor", "sut"]
            for name in order:
                python = args.sut if name == "sut" else args.anchor
                res = run_one(python, cert, key, args.messages, args.workers)
                results[name].append(res)
                print(
                    "rep %d %-6s %7.1f msg/s %7.0f us/msg server CPU"
                    % (rep + 1, name, res["msgs_per_s"], res["cpu_us_per_msg"]),
                    flush=True,
                )
    ratios = [
        s["msgs_per_s"] / a["msgs_per_s"]
        for s, a in zip(results["sut"], results["anchor"], strict=False)
    ]
    cpu = [
        s["cpu_us_per_msg"] / a["cpu_us_per_msg"]
        for s, a in zip(results["sut"], results["anchor"], strict=False)
    ]
    summary = {
        "msgs_per_s_ratio_median": statistics.median(ratios),
        "msgs_per_s_ratios": ratios,
        "cpu_ratio_median": statistics.median(cpu),
        "cpu_ratios": cpu,
        "runs": results,
        "command": " ".join(sys.argv),
    }
    print(
        "same-run msg/s ratio (sut/anchor): median {:.2f}, per rep {}".format(
            summary["msgs_per_s_ratio_median"], ", ".join(f"{r:.2f}" for r in ratios)
        )
    )
    print(
        "same-run server CPU ratio: median {:.2f}, per rep {}".format(
            summary["cpu_ratio_median"], ", ".join(f"{r:.2f}" for r in cpu)
        )
    )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
