"""Markdown tables from tools/bench_prune.py's JSON: PPL per method x target ratio, per section.

    python tools/bench_prune_table.py runs/bench_prune.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


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
        print("| method | allocation | " + " | ".join(f"PPL @{t:.0%} (removed)" for t in targets) + " | scoring s |")
        print("|---|---|" + "---|" * len(targets) + "---|")
        table = defaultdict(dict)
        for r in rs:
            table[(r["method"], r["allocation"])][r["target"]] = r
        for (method, alloc), cells in table.items():
            vals = " | ".join(f"{cells[t]['ppl']:.1f} ({cells[t]['removed']:.1%})" if t in cells else "-" for t in targets)
            wall = max(c["wall_s"] for c in cells.values())
            print(f"| {method} | {alloc} | {vals} | {wall:.2f} |")
        speed = [r for r in rs if "prefill_speedup" in r]
        if speed:
            print("\n| method | allocation | target | removed | MAC ratio (ideal speedup) | prefill speedup | decode speedup |")
            print("|---|---|---|---|---|---|---|")
            for r in speed:
                print(f"| {r['method']} | {r['allocation']} | {r['target']:.0%} | {r['removed']:.1%} | "
                      f"{r['mac_ratio']:.3f} ({1 / r['mac_ratio']:.2f}x) | {r['prefill_speedup']:.2f}x | {r['decode_speedup']:.2f}x |")
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_prune.json")
