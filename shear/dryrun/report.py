"""Text form of a dry-run result (shear.dryrun.estimate.dry_run): one block per stage, one line per figure."""
from __future__ import annotations

from shear.dryrun.memory import human


def _fits(v) -> str:
    return "unknown" if v is None else ("yes" if v else "NO")


def format_report(r: dict, prefix: str = "") -> str:
    m, la, g = r["model"], r["launch"], r["gpus"]
    lines = [f"model: {m['params']:,} params ({m['model_type']}, {m['layers']} layers, hidden {m['hidden']}, vocab "
             f"{m['vocab']}), weights {human(m['weights_bytes'])} in {m['dtype']}; config: {m['config']}"]
    engine = la["engine"] + (f" ZeRO-{la['zero_stage']}" if la["engine"] == "deepspeed" else "")
    lines.append(f"launch: {engine}, {la['processes']} process(es); from {la['source']}")
    if la.get("line"):
        lines.append(f"  {la['line']}")
    mem = human(g["memory_bytes"]) if g["memory_bytes"] else "unknown"
    lines.append(f"GPUs: {g['count']} x {mem} ({g['memory_source']}; {g['seen']} seen); fits = estimate <= "
                 f"{g['usable_fraction']:.0%} of a GPU")
    devs = [f"rank {x['rank']}: {x['device']}" for x in r["ranks"]]
    lines.append("devices: " + ", ".join(devs) + ("" if len(devs) == 1 else " (figures below are per rank, equal on every rank)"))
    lines.append(f"host RAM per rank while loading: {human(r['host_ram_per_rank_bytes'])} (the model + the teacher copy)")
    t = r.get("teacher")
    if t:
        where = ("a full replica on each rank's device" if t["placement"] == "device" else
                 f"offloaded: {human(t['host_ram_training_bytes'])} in host RAM per rank while training, on the GPU "
                 "its output head and one module at a time")
        lines.append(f"KD teacher: {t['placement']}, {where} ({t['why']})")
    for p in r["phases"]:
        lines.append(f"[{p['name']}] on {p['device']}: peak {human(p['peak_bytes'])}, fits: {_fits(p['fits'])}"
                     + (f"  ({p['note']})" if p.get("note") else ""))
        if "flops" in p:
            lines.append(f"  calibration cost: {p['flops']:.3e} FLOPs = {p['flops_formula']}")
        if "trainable_params" in p:
            lines.append(f"  trainable parameters: {p['trainable_params']:,}")
        for i in p["items"]:
            lines.append(f"  {i['name']:<30} {human(i['bytes']):>10}   {i['formula']}")
        for i in p.get("step_items", []):
            lines.append(f"  {'(step) ' + i['name']:<30} {human(i['bytes']):>10}   {i['formula']}")
        for i in p["transient"]:
            if not i["name"].startswith("training step"):
                lines.append(f"  {'(transient) ' + i['name']:<30} {human(i['bytes']):>10}   {i['formula']}")
        lines.append("  peak = the items above + the larger of the training step and validation"
                     if "step_items" in p else "  peak = weights + the calibration's working set")
    pr = r.get("pruned")
    if pr:
        size = "unknown" if pr["params"] is None else f"{pr['params']:,} params, {human(pr['weights_bytes'])}"
        lines.append(f"pruned model: {size} ({pr['how']})")
        if pr.get("shape"):
            lines.append("  shape: " + ", ".join(f"{k} {v}" for k, v in pr["shape"].items()))
    lines.append(f"fits: {_fits(r['fits'])}")
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    lines.append("not counted: CUDA context, allocator fragmentation, NCCL/DeepSpeed communication buckets, "
                 "evaluation after training (rank 0)")
    return "\n".join(prefix + ln for ln in lines)
