#!/bin/sh
# Runs the shared SMTP benchmark harness against this checkout, side by side
# with python-slimta 5.0.5 (the anchor) and aiosmtpd.
#
#   bench/run.sh [run_bench.py options...]     e.g. --reps 3, --quick,
#                                              --modes edge-only,
#                                              --concurrency 10000
#
# Steps: copy the shared harness ($SHARED_BENCH, default <repo>/../shared/bench)
# into bench/harness/ (untracked), put our bench/mta_pipeline.py in place of
# the harness's copy, make sure smtp-source/smtp-sink/swaks and the anchor
# venv exist, then run the harness from bench/ so that results land in
# bench/bench-results/<UTC stamp>/ (untracked).
#
# Environment:
#   SUT_PYTHON     interpreter under test (default: <repo>/.venv/bin/python)
#   SHARED_BENCH   where the shared harness lives (default <repo>/../shared/bench:
#                  shared/bench next to the repository's root directory)
#   SLIMTA_BENCH_STORAGE  dict (default) or disk: queue storage used by
#                  mta_pipeline.py in the blackhole/relay modes, for both the
#                  anchor and the SUT (python-slimta's DiskStorage needs
#                  pyaio, which the anchor venv lacks: add --anchor-python '')
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
shared=${SHARED_BENCH:-$repo/../shared/bench}
sut=${SUT_PYTHON:-$repo/.venv/bin/python}
harness=$here/harness

if [ ! -f "$shared/run_bench.py" ]; then
    echo "run.sh: no harness at $shared (set SHARED_BENCH)" >&2
    exit 2
fi
if [ ! -x "$sut" ]; then
    echo "run.sh: interpreter under test not found: $sut (set SUT_PYTHON)" >&2
    exit 2
fi

# 1. fresh copy of the harness; the shared files are read-only, so make the
#    copies writable before overwriting mta_pipeline.py
rm -rf "$harness"
mkdir -p "$harness"
cp -R "$shared/." "$harness/"
chmod -R u+w "$harness"
cp "$here/mta_pipeline.py" "$harness/mta_pipeline.py"
chmod 755 "$harness/mta_pipeline.py"

# 2. load tools (idempotent; installs only when missing, needs root then)
#    and the anchor venv (idempotent; left alone when it already works)
"$harness/install_tools.sh"
"$harness/setup_anchor_venv.sh"

# 3. the interpreter under test must at least provide the SMTP edge
if ! where=$("$sut" -W ignore -c \
        'import slimta, slimta.edge.smtp; print(list(slimta.__path__)[0])' 2>&1); then
    echo "run.sh: $sut cannot import slimta.edge.smtp:" >&2
    echo "$where" | tail -n 3 >&2
    exit 2
fi
echo "system under test: $sut (slimta from $where)"

# 4. run from bench/ so the harness writes bench/bench-results/<stamp>/
cd "$here"
exec "$harness/run_bench.sh" "$sut" --label slimta-rewrite "$@"
