"""A script the multi-process scoring test launches (one process, or under ``accelerate launch``):

    python tests/distributed_worker.py OUT_DIR

Scores a tiny Llama on seeded calibration ids with every gradient mode and the activation pass, then
prunes it by Taylor (vector) and by FLAP; writes what this rank computed to ``OUT_DIR/rank-R.safetensors``
and the plans to ``OUT_DIR/rank-R.json``. The process group is started as ``shear run`` starts it.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch

N_SAMPLES, SEQ_LEN, BATCH = 10, 16, 4  # 3 batches: 2 ranks run 2 and 1 (unequal shares)


def calibration_ids() -> torch.Tensor:
    return torch.randint(0, 128, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def model():
    from test_train_worker import tiny_model

    return tiny_model(0).eval()


def stats(m, ids) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every gradient mode's sums and the activation statistics, flattened to named tensors; and how
    many batches this rank ran for each (forward calls of the embedding)."""
    from shear.analyze import analyze
    from shear.importance.calibrate import collect_activation_stats
    from shear.importance.gradients import accumulate_gradients

    graph = analyze(m)
    out, calls = {}, {}
    seen = []
    m.get_input_embeddings().register_forward_pre_hook(lambda *_: seen.append(1))
    for mode in ("vector", "element1", "element2"):
        seen.clear()
        gs = accumulate_gradients(m, ids, graph, mode, BATCH)
        calls[mode] = len(seen)
        out.update({f"{mode}.wg.{g}.{j}": v for (g, j), v in gs.wg.items()})
        out.update({f"{mode}.grad.{k}": v for k, v in gs.grad.items()})
        out.update({f"{mode}.fisher.{k}": v for k, v in gs.fisher.items()})
        out[f"{mode}.loss"] = torch.tensor([gs.loss, gs.n_samples], dtype=torch.float64)
    seen.clear()
    act = collect_activation_stats(m, ids, BATCH)
    calls["activations"] = len(seen)
    for k, st in act.linears.items():
        out.update({f"act.{k}.x_sum": st.x_sum, f"act.{k}.x_sqsum": st.x_sqsum, f"act.{k}.mabs_sq": st.mabs_sq,
                    f"act.{k}.n": torch.tensor([st.n, st.n_samples], dtype=torch.float64)})
    out["act.layer_cos"] = torch.tensor([act.layer_cos[i] for i in sorted(act.layer_cos)], dtype=torch.float64)
    out["act.mlp_angle"] = torch.tensor([act.mlp_angle[i] for i in sorted(act.mlp_angle)], dtype=torch.float64)
    out["act.tokens"] = torch.tensor([act.tokens], dtype=torch.float64)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}, calls


def prune(estimator: str, ids) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the plan's removed units per group, the pruned weights) of a 40% MLP + heads prune by ``estimator``."""
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune

    m = model()
    cfg = PruneConfig(target={"ratio": 0.4}, structures=["mlp", "heads"], allocation="global")
    _, plan, _ = run_prune(m, None, cfg, ImportanceConfig(estimator=estimator, batch_size=BATCH), ids=ids)
    removed = {g: sorted(int(i) for i in v) for g, v in plan.remove.items()}
    return removed, {f"{estimator}.{k}": v.contiguous() for k, v in m.state_dict().items()}


def main(out: str) -> int:
    from safetensors.torch import save_file

    from shear.train.accel import end_processes, init_processes

    started = init_processes()
    try:
        ids = calibration_ids()
        tensors, calls = stats(model(), ids)
        plans = {}
        for est in ("taylor_vector", "flap"):
            plans[est], weights = prune(est, ids)
            tensors.update(weights)
    finally:
        if started:
            end_processes()
    rank = int(os.environ.get("RANK", "0"))
    save_file(tensors, os.path.join(out, f"rank-{rank}.safetensors"))
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"plans": plans, "batches": calls, "world": int(os.environ.get("WORLD_SIZE", "1")),
                                                          "started": started}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
