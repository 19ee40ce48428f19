#!/usr/bin/env python3
"""Per-repetition ratios of one harness run: msg/s, end-to-end msg/s and
server CPU per message of the rewrite against python-slimta 5.0.5.

    python3 bench/e2e_ratios.py bench/bench-results/<stamp>
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    results = json.loads((Path(sys.argv[1]) / "results.json").read_text())
    runs: dict[tuple[str, str, int], dict[str, float]] = {}
    for run in results["runs"]:
        runs[(run["target"], run["shape"], run["rep"])] = run
    ours = sorted({t for t, _, _ in runs if t.startswith("slimta-rewrite")})
    for target in ours:
        mode = target.split(":", 1)[1]
        anchor = f"python-slimta-5.0.5:{mode}"
        for shape in ("conn", "session"):
            rows = []
            for (t, s, rep), run in sorted(runs.items()):
                if t != target or s != shape or (anchor, shape, rep) not in runs:
                    continue
                ref = runs[(anchor, shape, rep)]
                row = {
                    "msg/s": run["msgs_per_s"] / ref["msgs_per_s"],
                    "cpu": run["server_cpu_us_per_msg"] / ref["server_cpu_us_per_msg"],
                }
                if run.get("e2e_msgs_per_s") and ref.get("e2e_msgs_per_s"):
                    row["e2e"] = run["e2e_msgs_per_s"] / ref["e2e_msgs_per_s"]
                rows.append(row)
            if not rows:
                continue
            parts = []
            for key in ("msg/s", "e2e", "cpu"):
                values = [row[key] for row in rows if key in row]
                if values:
                    each = ", ".join(f"{v:.2f}" for v in values)
                    parts.append(f"{key} {statistics.median(values):.2f} ({each})")
            print(f"{target} vs {anchor} {shape}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
