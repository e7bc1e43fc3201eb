"""``shear compare`` (shear.compare): equal budgets computed by hand, and the command end to end on a tiny model.

The end-to-end run checks what the comparison promises: the unstructured row keeps as many non-zero
parameters as the structured row (within one 2:4 group), the equal-bytes row's compressed weights
take the structured model's bytes, the 2:4 row is exactly half of the block linears, KD kept every
zero, and the table and plot are written.
"""
import importlib.util
import json

import pytest
import torch
from torch import nn

from shear.cli import main
from shear.compare import CompareConfig
from shear.compare.budget import nonzero_for_bytes, nonzero_params, sparsity_for_nonzero, trim_to_nonzero_


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy():
    """Embedding 10x4 (40, one row zero: 36 non-zero) + a 4x8 linear (32) + bias (4): 72 non-zero of 76."""
    m = nn.Module()
    m.emb = nn.Embedding(10, 4)
    m.lin = nn.Linear(8, 4)
    with torch.no_grad():
        m.emb.weight.fill_(1.0)
        m.emb.weight[0] = 0.0
        m.lin.weight.copy_(torch.arange(1, 33, dtype=torch.float32).reshape(4, 8))
        m.lin.bias.fill_(1.0)
    return m


def test_sparsity_for_nonzero_by_hand():
    m = _toy()
    assert nonzero_params(m) == 72
    # keep 56: the 40 outside the linear stay, so the linear keeps 16 of 32 -> 50%
    assert sparsity_for_nonzero(m, ["lin"], 56) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="never touches"):
        sparsity_for_nonzero(m, ["lin"], 40)  # the embedding and bias alone hold 40
    with pytest.raises(ValueError, match="needs no pruning"):
        sparsity_for_nonzero(m, ["lin"], 72)


def test_trim_removes_the_smallest_leftovers():
    m = _toy()
    assert trim_to_nonzero_(m, ["lin"], 69) == 3
    w = m.lin.weight.flatten()
    assert nonzero_params(m) == 69 and w[:3].eq(0).all() and w[3:].ne(0).all()  # 1, 2, 3 were the smallest
    assert trim_to_nonzero_(m, ["lin"], 80) == 0


def test_nonzero_for_bytes_by_hand():
    # 1,000 bytes at 100 non-zero fp32 weights; 960 bytes holds 10 fewer, 1,002 bytes still none more
    assert nonzero_for_bytes(1000, 100, 960, 4) == 90
    assert nonzero_for_bytes(1000, 100, 1002, 4) == 100


def test_config_refuses_bad_rows():
    with pytest.raises(ValueError, match="ESTIMATOR:ALLOCATION"):
        CompareConfig(ratios=[0.3], structured=["flap"])
    with pytest.raises(ValueError, match="unknown estimator"):
        CompareConfig(ratios=[0.3], structured=["nosuch:global"])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        CompareConfig(ratios=[1.2])
    with pytest.raises(ValueError, match="kd_stepz"):
        CompareConfig(ratios=[0.3], kd_stepz=3)  # unknown keys are errors


def test_compare_end_to_end(tiny_lm_dir, tiny_text, tmp_path):
    text = tmp_path / "train.txt"  # small KD / calibration text keeps the test fast
    text.write_text(tiny_text)
    out = tmp_path / "cmp"
    argv = ["compare", str(tiny_lm_dir), "--ratio", "0.3", "--kd-steps", "2", "--seq-len", "32", "--batch-size", "2",
            "--n-samples", "4", "--eval-windows", "4", "--speed-rounds", "1", "--prefill-tokens", "16",
            "--decode-tokens", "8", "--source", str(text), "--keep-models", "-o", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["dense (KD: control, same tokens)", "0.3/structured obs:balanced", "0.3/structured flap:uniform",
                          "0.3/unstructured sparsegpt, = non-zero", "0.3/unstructured sparsegpt, = bytes", "2:4 sparsegpt"]
    assert report["ppl_protocol"]["dataset"] == "english"  # the user's text trains; held-out English scores
    dense, anchor = rows["dense (KD: control, same tokens)"], rows["0.3/structured obs:balanced"]
    same_nnz, same_bytes, nm = (rows["0.3/unstructured sparsegpt, = non-zero"], rows["0.3/unstructured sparsegpt, = bytes"],
                                rows["2:4 sparsegpt"])
    assert anchor["params"] < 0.75 * dense["params"]
    assert abs(same_nnz["nonzero"] - anchor["nonzero"]) <= 4  # one 2:4 group
    assert same_nnz["params"] == dense["params"]  # masks: nothing removed, only zeroed
    assert abs(same_bytes["compressed_bytes"] - anchor["dense_bytes"]) <= 64  # safetensors header digits
    assert same_bytes["nonzero"] < same_nnz["nonzero"]  # the bitmask's index bytes cost non-zeros
    assert nm["linear_sparsity"] == 0.5 and nm["compressed_format"] == "sparse-24-bitmask"
    for r in rows.values():
        assert r["ppl"] > 1 and r["ppl_kd"] > 1 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0, r["key"]
    if importlib.util.find_spec("shear.kernels") is not None:  # the sparse rows are also timed on SparseLinear
        assert all((r["kernel_decode_tok_s"] is not None) == (r["kind"] in ("unstructured", "nm")) for r in rows.values())
    # the exports hold what the rows say: zeros kept through KD, and the bytes measured
    from safetensors.torch import load_file

    slug = "0.3-unstructured-sparsegpt-non-zero"
    sd = load_file(str(out / "models" / slug / "model" / "model.safetensors"))
    assert sum(int(t.count_nonzero()) for t in sd.values()) == same_nnz["nonzero"]
    table = (out / "table.md").read_text()
    assert "Held-out PPL: dataset=english, split=validation, seq_len=32" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(rows)
    assert (out / "compare.png").stat().st_size > 10_000
    assert main(argv) == 2  # a taken OUT is refused before any work
