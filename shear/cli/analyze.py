"""``shear analyze MODEL`` (structure table) and ``shear export MODEL OUT --plan PLAN`` (prune + save).

    shear analyze reference                     # the reference model (weights not needed)
    shear analyze path/with/config.json --heads query_head --groups
    shear export reference out/pruned --plan plan.yaml
"""
from __future__ import annotations

import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="list the coupled groups of a model (meta device, no weights)")
    p.add_argument("model", help="model directory (config.json is enough), hub name, or reference/reference-quick")
    p.add_argument("--heads", choices=("kv_group", "query_head"), default="kv_group",
                   help="GQA attention units: whole KV groups or the query heads inside every group")
    p.add_argument("--groups", action="store_true", help="one row per group instead of one per kind")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped in a model directory (per-layer pruned exports carry auto_map)")
    p.set_defaults(func=run_analyze)
    e = subparsers.add_parser("export", help="apply a prune plan to a model and save a from_pretrained directory")
    e.add_argument("model", help="model directory, hub name, or reference/reference-quick")
    e.add_argument("out", help="output directory (written atomically)")
    e.add_argument("--plan", help="YAML/JSON: {remove: {group: [units]}} or {group: [units]}; omitted: re-export")
    e.add_argument("--heads", choices=("kv_group", "query_head"), default=None,
                   help="attention units the plan refers to (default: inferred from group names)")
    e.add_argument("--dtype", default="fp32", help="dtype to load and save (fp32, bf16, fp16)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped in a model directory (per-layer pruned exports carry auto_map)")
    e.set_defaults(func=run_export)


def _analyze_target(target: str, heads: str, trust_remote_code: bool = False):
    from shear.analyze import analyze, analyze_path
    from shear.analyze.families import FAMILIES
    from shear.models import resolve_model_path

    path = Path(resolve_model_path(target))
    if not path.exists():  # a hub name: its config only (HF_HUB_OFFLINE makes this a clear error)
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(target, allow_patterns=["config.json"]))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: one clear message
            raise FileNotFoundError(f"{target}: not a local model directory and its config could not be "
                                    f"fetched ({type(e).__name__})") from None
    from shear.analyze.families import stock_model_type
    from shear.models import read_json

    model_type = stock_model_type(read_json(path / "config.json").get("model_type"))
    if model_type in FAMILIES:  # per-layer exports (shear_<type>) too: their modeling file needs consent
        return analyze_path(path, heads, trust_remote_code)
    from shear.models import WEIGHT_FILES, load_model

    if not any(next(path.glob(pat), None) for pat in WEIGHT_FILES):
        raise ValueError(f"{path}: model_type {model_type!r} is not one of the families analyzed from config.json "
                         f"alone ({sorted(FAMILIES)}); give the directory with its weights (torch-pruning fallback)")
    return analyze(load_model(str(path), trust_remote_code=trust_remote_code), heads)


def run_analyze(args) -> int:
    from rich.console import Console
    from rich.table import Table

    t0 = time.perf_counter()
    graph = _analyze_target(args.model, args.heads, args.trust_remote_code)
    dt = time.perf_counter() - t0
    table = Table(title=f"{args.model}: {graph.family}, {graph.total_params / 1e6:,.2f}M params, "
                        f"{graph.total_macs / 1e6:,.2f}M MACs/token ({dt:.1f} s)")
    for col in ("group" if args.groups else "kind", "groups", "units", "params/unit", "MACs/unit",
                "params %", "MACs %", "members"):
        table.add_column(col, justify="left" if col in ("group", "kind", "members") else "right",
                         no_wrap=col != "members")
    rows = [[g] for g in graph.groups] if args.groups else _by_kind(graph)
    for gs in rows:
        g = gs[0]
        units = sorted({x.num_units for x in gs})
        n_params = sum(x.num_params for x in gs)
        n_macs = sum(x.macs_per_unit * x.num_units for x in gs)
        members = ", ".join(sorted({m.param.split(".")[-2] for m in g.members if m.role != "whole"})) or g.module
        table.add_row(g.name if args.groups else g.kind, str(len(gs)),
                      str(units[0]) if len(units) == 1 else f"{units[0]}–{units[-1]}",
                      _range(x.params_per_unit for x in gs), _range(x.macs_per_unit for x in gs),
                      f"{100 * n_params / graph.total_params:.2f}", f"{100 * n_macs / graph.total_macs:.2f}",
                      members)
    Console().print(table)
    return 0


def _by_kind(graph):
    kinds: dict[str, list] = {}
    for g in graph.groups:
        kinds.setdefault(g.kind, []).append(g)
    return list(kinds.values())


def _range(values) -> str:
    v = sorted(set(values))
    return f"{v[0]:,}" if len(v) == 1 else f"{v[0]:,}–{v[-1]:,}"


def load_plan(path: str | Path):
    """A :class:`PrunePlan` from YAML/JSON (``{remove: {...}, meta: {...}}`` or a bare mapping)."""
    import yaml

    from shear.analyze import PrunePlan

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"plan {path}: expected a mapping of group names to unit lists")
    if "remove" in data:
        extra = set(data) - {"remove", "meta"}
        if extra:
            raise ValueError(f"plan {path}: unknown keys {sorted(extra)} (expected remove, meta)")
        return PrunePlan(remove=dict(data["remove"] or {}), meta=dict(data.get("meta") or {}))
    return PrunePlan(remove=data)


def run_export(args) -> int:
    from shear.analyze import analyze
    from shear.models import has_tokenizer, load_model, load_tokenizer, resolve_model_path
    from shear.prune import export, prune_

    src = resolve_model_path(args.model)
    model = load_model(src, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    tokenizer = None
    if has_tokenizer(src) or not Path(src).expanduser().exists():  # unreadable tokenizer files: an error
        tokenizer = load_tokenizer(src, args.trust_remote_code)
    else:
        print(f"{src} has no tokenizer files: the export has none either")
    recipe = {"source": str(args.model), "command": "shear export"}
    if args.plan:
        plan = load_plan(args.plan)
        heads = args.heads or ("query_head" if any(k.endswith(".query_head") for k in plan.remove) else "kv_group")
        before = sum(p.numel() for p in model.parameters())
        prune_(model, plan, analyze(model, heads))
        after = sum(p.numel() for p in model.parameters())
        recipe.update(plan={"remove": plan.remove, "meta": plan.meta}, heads=heads,
                      params_before=before, params_after=after)
    out = export(model, args.out, tokenizer=tokenizer, recipe=recipe, overwrite=args.overwrite)
    kind = "per-layer (trust_remote_code)" if (out / "modeling_shear_pruned.py").exists() else "stock"
    print(f"exported {out} ({kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    return 0
