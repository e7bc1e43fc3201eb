"""A run directory belongs to one recipe (torchtune's check of saved state against the config, made strict).

``shear run`` writes OUTPUT_DIR/recipe.yaml (the resolved recipe) and OUTPUT_DIR/run.json (its
fingerprint and any recorded changes). Running again into the same directory compares the saved
recipe with the new one, key by key, on the keys that change results:

- no difference: the run continues where it stopped (training resumes from its newest checkpoint);
- a difference, by default: an error listing the differing dotted keys, before any work;
- ``on_change="resume"`` (``--resume``): continue anyway, with a warning; the change is recorded in run.json
  (with the new recipe.yaml) once the resume is validated, never before;
- ``on_change="restart"`` (``--restart``): the outputs shear wrote for the run are deleted first
  (``SHEAR_OUTPUTS``; inside its subdirectories only the names shear writes there, ``OWN_NAMES``, and in
  an export only the files its manifest lists); any other file stays and is named. A recipe that reads
  an input from what the restart would delete (``model.path`` pointing at the earlier run's export) is
  refused before anything is deleted.

While a command runs, it holds an exclusive lock on the directory (:func:`locked`); a second one is refused.

Keys that do not change results are left out of the comparison and of the fingerprint
(``NON_RESULT_KEYS``): what is evaluated and how (``eval``, validation cadence and size), logging and
checkpoint cadence, where the run and the export are written, and the remote-code consent.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
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
SHEAR_OUTPUTS = ("recipe.yaml", "run.json", "summary.json", "prune", "learn", "train", "rounds", "model", "sparsify",
                 "compressed")
# What shear writes inside those subdirectories (reports, training state, tensorboard events under ``shear``);
# ``prune``, ``train`` and ``round-K`` are looked into in turn. Any other name there is the user's.
OWN_NAMES = ("report.json", "plans.json", "kept_widths.png", "mask_sizes.png", "train_config.json", "metrics.jsonl",
             "train_summary.json", "domain_weights.png", "checkpoints", "tokenizer", "shear", "iterative_report.json",
             "loraprune_scores.safetensors")
_NESTED = re.compile(r"(prune|train|round-\d+)$")
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


def open_run_dir(recipe: Recipe, out: Path, on_change: OnChange = "refuse", write: bool = True) -> dict:
    """Check ``out`` against ``recipe`` (see the module docstring), then write recipe.yaml and run.json.

    Returns the changes a ``--resume`` continues over: then nothing is written here, the caller records
    them with :func:`record_run` once the resume is validated (the checkpoint fits the changed recipe), so
    a resume that fails leaves the directory describing its artifacts. ``write=False`` (ranks other than
    0) checks only.
    """
    out = Path(out)
    check_output_dir(out, "output_dir")
    new = recipe.model_dump(mode="json")
    old = _saved_recipe(out / "recipe.yaml")
    changes = recipe_changes(old, new) if old is not None else {}
    if on_change == "restart" and old is not None:
        if write:  # rank 0 alone: other ranks would race its deletion
            _refuse_deleting_inputs(new, out, "--restart would delete {path}, which the recipe reads ({key}); "
                                              "copy it out of {out} first or write the run elsewhere (-o)")
            removed, kept = clear_run_dir(out)
            log.warning("%s: --restart: removed the previous run's %s", out, ", ".join(removed) or "nothing")
            if kept:
                log.warning("%s: --restart: kept %s (not written by shear)", out, ", ".join(kept))
        changes = {}
    elif changes and on_change == "refuse":
        listed = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in changes.items())
        msg = (f"{out} holds a run of another recipe (changed: {listed}); pass --resume to continue it anyway, or "
               "{hint}")
        _refuse_deleting_inputs(new, out, msg.replace("{hint}", "write the run elsewhere (-o): --restart would "
                                                                "delete {path}, which the recipe reads ({key})"))
        raise ValueError(msg.replace("{hint}", "--restart to start it over"))
    elif changes:
        log.warning("%s: continuing a run whose recipe changed (%s) because of --resume; recorded in run.json",
                    out, ", ".join(changes))
    out.mkdir(parents=True, exist_ok=True)
    if write and not changes:
        record_run(recipe, out)
    return changes


def record_run(recipe: Recipe, out: Path, changes: dict | None = None) -> None:
    """Write recipe.yaml and run.json (its fingerprint, with ``changes`` appended to its history)."""
    run_file = out / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {"changes": []}
    if changes:
        run["changes"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": run.get("fingerprint"),
                               "keys": changes})
    run.update(fingerprint=fingerprint(recipe), excluded_from_fingerprint=list(NON_RESULT_KEYS))
    dump_recipe(recipe, out / "recipe.yaml")
    run_file.write_text(json.dumps(run, indent=1, default=str))


def recipe_inputs(recipe: dict) -> dict[str, Path]:
    """``{dotted key: path}`` for every value of the recipe that names an existing file or directory
    (``model.path``, ``distill.teacher``, ``data.source``...), where the run writes excluded."""
    found = {}

    def walk(key, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{key}.{k}" if key else k, x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(f"{key}[{i}]", x)
        elif isinstance(v, str) and v and key not in ("output_dir", "export.dir", "description"):
            p = Path(v).expanduser()
            if p.exists():
                found[key] = p.resolve()

    walk("", recipe)
    return found


def _refuse_deleting_inputs(recipe: dict, out: Path, msg: str) -> None:
    """Raise ``msg`` (formatted with key, path, out) when an input of the recipe lies in what --restart deletes."""
    root = Path(out).resolve()
    doomed = [p.resolve() for p in restart_deletes(out)]
    for key, path in recipe_inputs(recipe).items():
        inside = path != root and path.is_relative_to(root)  # a directory of the run (OUT/model) whose files go
        if any(path.is_relative_to(d) or (inside and d.is_relative_to(path)) for d in doomed):
            raise ValueError(msg.format(key=key, path=path, out=out))


def _own_under(d: Path) -> list[Path]:
    """What shear wrote in one of its subdirectories: ``OWN_NAMES``, looking into ``prune``/``train``/``round-K``."""
    found = []
    for p in sorted(d.iterdir()):
        if p.name in OWN_NAMES:
            found.append(p)
        elif p.is_dir() and _NESTED.match(p.name):
            found += _own_under(p)
    return found


def restart_deletes(out: Path) -> list[Path]:
    """The paths ``--restart`` deletes in ``out``: ``SHEAR_OUTPUTS``, inside directories only what shear wrote there."""
    from shear.prune.export import _written_by_shear

    found = []
    for name in SHEAR_OUTPUTS:
        p = Path(out) / name
        if name in ("model", "compressed"):  # an export: the files its manifest lists (none: not shear's)
            found += [p / f for f in _written_by_shear(p) if (p / f).exists()]
        elif p.is_dir():
            found += _own_under(p)
        elif p.exists():
            found.append(p)
    return found


def clear_run_dir(out: Path) -> tuple[list[str], list[str]]:
    """Delete what shear wrote for a run in ``out`` (:func:`restart_deletes`); return (removed, kept): the
    top-level names removed, and the files left in shear's subdirectories because shear did not write them."""
    out = Path(out)
    removed = []
    for p in restart_deletes(out):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        top = p.relative_to(out).parts[0]
        if top not in removed:
            removed.append(top)
    kept = []
    for name in SHEAR_OUTPUTS:
        d = out / name
        if d.is_dir():
            for sub in sorted(d.rglob("*"), reverse=True):  # deepest first: directories left empty go
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
                elif not sub.is_dir():
                    kept.append(str(sub.relative_to(out)))
            if not any(d.iterdir()):
                d.rmdir()
    return removed, sorted(kept)


LOCK = ".shear.lock"


@contextlib.contextmanager
def locked(out: Path):
    """Hold an exclusive lock on the output directory ``out`` (``fcntl.flock`` on ``out/.shear.lock``, created
    with ``out``) while a command writes there: a second command on the same directory is refused in one
    line. Where fcntl does not exist (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out = Path(out)
    check_output_dir(out, "output_dir")  # a file there: say so, not mkdir's "File exists"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a") as f:  # the lock goes with the file descriptor: released on exit or a crash
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{out} is in use by another shear command (it holds {LOCK}); wait for it to "
                                  "finish or write elsewhere (-o)") from None
        yield


def newest_checkpoint(out: Path) -> Path | None:
    """The most recently written training checkpoint anywhere under a run directory."""
    from shear.train.checkpoint import list_checkpoints

    found = [p for d in Path(out).rglob("checkpoints") if d.is_dir() for _, p in list_checkpoints(d)]
    return max(found, key=lambda p: (p / "state.json").stat().st_mtime, default=None)
