"""A run directory belongs to one recipe (torchtune's check of saved state against the config, made strict).

``shear run`` writes OUTPUT_DIR/recipe.yaml (the resolved recipe) and OUTPUT_DIR/run.json (its
fingerprint and any recorded changes). Running again into the same directory compares the saved
recipe with the new one, key by key, on the keys that change results:

- no difference: the run continues where it stopped (training resumes from its newest checkpoint);
- a difference, by default: an error listing the differing dotted keys, before any work;
- ``on_change="resume"`` (``--resume``): continue anyway, with a warning; the change is recorded in run.json;
- ``on_change="restart"`` (``--restart``): the outputs shear wrote for the run (``SHEAR_OUTPUTS``)
  are deleted first; any other file in the directory stays.

Keys that do not change results are left out of the comparison and of the fingerprint
(``NON_RESULT_KEYS``): what is evaluated and how (``eval``, validation cadence and size), logging and
checkpoint cadence, where the run and the export are written, and the remote-code consent.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Literal

import yaml

from shear.config import Recipe, dump_recipe, validate_recipe

log = logging.getLogger("shear")

NON_RESULT_KEYS = (
    "description", "output_dir", "model.trust_remote_code",
    "eval",  # evaluation reads the result, never changes it
    "data.max_validation_blocks", "train.eval_every", "train.eval_batches",  # validation only
    "train.log_every", "train.save_every", "train.keep_checkpoints", "train.resume",
    "export.dir", "export.overwrite",
)
# What shear writes into OUTPUT_DIR for a run (``model`` / ``compressed`` only when they hold a shear export).
SHEAR_OUTPUTS = ("recipe.yaml", "run.json", "summary.json", "prune", "train", "rounds", "model", "sparsify", "compressed")
OnChange = Literal["refuse", "resume", "restart"]


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; a None section stays one key."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def result_keys(recipe: dict) -> dict:
    """The flattened recipe without ``NON_RESULT_KEYS`` (and everything under them)."""
    return {k: v for k, v in flatten(recipe).items()
            if not any(k == x or k.startswith(x + ".") for x in NON_RESULT_KEYS)}


def fingerprint(recipe: Recipe) -> str:
    """sha256 (16 hex digits) of the recipe's result keys, canonical JSON."""
    blob = json.dumps(result_keys(recipe.model_dump(mode="json")), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recipe_changes(old: dict, new: dict) -> dict[str, list]:
    """``{dotted key: [old value, new value]}`` for every result key that differs."""
    a, b = result_keys(old), result_keys(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _saved_recipe(path: Path) -> dict | None:
    """The recipe saved in a run directory, defaults filled in (a file of another version: as written)."""
    if not path.exists():
        return None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        return None
    try:
        return validate_recipe(data).model_dump(mode="json")
    except ValueError:
        return data


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 30 else s[:27] + "..."


def check_output_dir(path: str | Path, what: str) -> None:
    """An output directory must not be, or lie under, a regular file (``mkdir`` would say only "File exists")."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise NotADirectoryError(f"{what} {path}: {q} is a file, not a directory; give a directory path "
                                         "(a new one, or one shear wrote)")
            return


def open_run_dir(recipe: Recipe, out: Path, on_change: OnChange = "refuse", write: bool = True) -> None:
    """Check ``out`` against ``recipe`` (see the module docstring), then write recipe.yaml and run.json.

    ``write=False`` (ranks other than 0) checks only.
    """
    out = Path(out)
    check_output_dir(out, "output_dir")
    new = recipe.model_dump(mode="json")
    old = _saved_recipe(out / "recipe.yaml")
    changes = recipe_changes(old, new) if old is not None else {}
    if on_change == "restart" and old is not None:
        if write:
            removed = clear_run_dir(out)
            log.warning("%s: --restart: removed the previous run's %s", out, ", ".join(removed) or "nothing")
        changes = {}
    elif changes and on_change == "refuse":
        listed = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in changes.items())
        raise ValueError(f"{out} holds a run of another recipe (changed: {listed}); pass --resume to continue "
                         "it anyway, or --restart to start it over")
    elif changes:
        log.warning("%s: continuing a run whose recipe changed (%s) because of --resume; recorded in run.json",
                    out, ", ".join(changes))
    out.mkdir(parents=True, exist_ok=True)
    if not write:
        return
    run_file = out / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {"changes": []}
    if changes:
        run["changes"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": run.get("fingerprint"),
                               "keys": changes})
    run.update(fingerprint=fingerprint(recipe), excluded_from_fingerprint=list(NON_RESULT_KEYS))
    dump_recipe(recipe, out / "recipe.yaml")
    run_file.write_text(json.dumps(run, indent=1, default=str))


def clear_run_dir(out: Path) -> list[str]:
    """Delete what shear wrote for a run in ``out`` (``SHEAR_OUTPUTS``); return the names removed."""
    removed = []
    for name in SHEAR_OUTPUTS:
        p = Path(out) / name
        if name in ("model", "compressed") and not (p / "shear_recipe.yaml").exists():
            continue  # not an export shear made: leave it
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def newest_checkpoint(out: Path) -> Path | None:
    """The most recently written training checkpoint anywhere under a run directory."""
    from shear.train.checkpoint import list_checkpoints

    found = [p for d in Path(out).rglob("checkpoints") if d.is_dir() for _, p in list_checkpoints(d)]
    return max(found, key=lambda p: (p / "state.json").stat().st_mtime, default=None)
