"""Bridge to lm-evaluation-harness (optional extra ``shear[eval]``): zero-shot tasks on a loaded model.

The model and tokenizer already in memory are wrapped in lm-eval's ``HFLM`` (no reload, so a pruned
model with per-layer widths is scored exactly as it is). Extra task YAMLs (e.g. a task over a local
jsonl file) are found through ``include_path``. Always report the lm-eval version with the numbers:
scores move between versions (see FIELD-NOTES §6).
"""
from __future__ import annotations

from functools import lru_cache

MISSING_MESSAGE = ("lm-eval is not installed; the task bridge is an optional extra: "
            "pip install 'shear[eval]'  (or: pip install 'lm-eval>=0.4.8,<0.5')")


def lm_eval_available() -> bool:
    """True when ``lm_eval`` can be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _import():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(MISSING_MESSAGE) from e
    return lm_eval, HFLM, TaskManager


def _clean(metrics: dict) -> dict:
    """``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": ...}``."""
    out = {}
    for k, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        out[k.split(",")[0]] = float(v)
    return out


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool):
    """lm-eval's task index (the built-in one takes ~30 s to build: built once per process)."""
    _, _, TaskManager = _import()
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def find_tasks(tasks: list[str], include_path: str | None = None):
    """The TaskManager that knows every name in ``tasks``; only ``include_path`` is indexed when it suffices."""
    if include_path:
        local = _task_manager(include_path, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = _task_manager(include_path, True)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"tasks: unknown lm-eval task(s) {unknown}"
                         + ("" if include_path else " (local task YAMLs need task_include_path)"))
    return tm


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
              batch_size: int = 1, num_fewshot: int | None = 0, max_length: int | None = None) -> dict:
    """Run lm-eval ``tasks`` on an in-memory HF causal LM.

    Returns ``{"lm_eval_version": str, "tasks": {task: {"acc": .., "acc_norm": .., "samples": n, ...}}}``.
    Raises ImportError with an install hint when lm-eval is missing, ValueError on an unknown task.
    """
    lm_eval, HFLM, _ = _import()
    if not tasks:
        raise ValueError("tasks: give at least one lm-eval task name")
    tm = find_tasks(list(tasks), include_path)
    was_training = model.training
    model.eval()
    kw = {"max_length": max_length} if max_length else {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    finally:
        model.train(was_training)
    out = {}
    for task, metrics in res["results"].items():
        row = _clean(metrics)
        n = res.get("n-samples", {}).get(task, {})
        if n:
            row["samples"] = int(n.get("effective", n.get("original", 0)))
        out[task] = row
    return {"lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "tasks": out}
