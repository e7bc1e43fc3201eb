"""Markdown tables from tools/bench_prune.py's JSON: PPL per method x target ratio, per section.

    python tools/bench_prune_table.py runs/bench_prune.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def main(path: str) -> None:
    data = json.loads(open(path).read())
    meta, rows = data["meta"], data["rows"]
    print(f"Protocol: {meta['protocol']}. Dense PPL: " +
          ", ".join(f"{k.upper()} {v:.2f}" for k, v in meta["dense_ppl"].items()) + "\n")
    by_section = defaultdict(list)
    for r in rows:
        by_section[r["section"]].append(r)
    for section, rs in by_section.items():
        targets = sorted({r["target"] for r in rs})
        print(f"#### {section}\n")
        by = defaultdict(dict)
        for r in rs:
            by[(r["method"], r["allocation"])][r["target"]] = r
        cells = [{"method": method, "allocation": alloc, "wall": max(c["wall_s"] for c in cs.values()),
                  **{t: f"{cs[t]['ppl']:.1f} ({cs[t]['removed']:.1%})" for t in cs}} for (method, alloc), cs in by.items()]
        print(benchlib.table(cells, [("method", "method"), ("allocation", "allocation")]
                             + [(t, f"PPL @{t:.0%} (removed)") for t in targets] + [("wall", "scoring s", ".2f")],
                             missing="-"))
        speed = [r for r in rs if "prefill_speedup" in r]
        if speed:
            print("\n" + benchlib.table(speed, [
                ("method", "method"), ("allocation", "allocation"), ("target", "target", ".0%"),
                ("removed", "removed", ".1%"), ("mac_ratio", "MAC ratio (ideal speedup)", lambda m: f"{m:.3f} ({1 / m:.2f}x)"),
                ("prefill_speedup", "prefill speedup", "{:.2f}x".format), ("decode_speedup", "decode speedup", "{:.2f}x".format)]))
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_prune.json")
