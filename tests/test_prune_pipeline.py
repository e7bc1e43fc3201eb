"""run_prune end to end on tiny models, FLAP bias compensation, and `shear prune`."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import tiny_llama_config
from shear.analyze.graph import PrunePlan
from shear.importance.calibrate import collect_activation_stats
from shear.analyze.families import FAMILIES
from shear.importance.compensation import apply_biases_, compensation_biases, plan_biases
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune


@pytest.fixture
def ids():
    return torch.randint(0, 128, (6, 16))


@pytest.mark.parametrize("stock", [True, False])
def test_bias_compensation_by_hand(tiny_llama, ids, stock):
    """Sliced down_proj + bias == original down_proj with the removed inputs at their calibration mean.
    A stock export sets mlp_bias (zero biases on gate/up and the other layer); a per-layer one adds none."""
    from shear.analyze import analyze
    from shear.prune.slice import prune_

    m = tiny_llama
    g = analyze(m)
    stats = collect_activation_stats(m, ids)
    removed = [1, 5, 7, 40]
    plan = PrunePlan(remove={"layers.1.mlp_channel": removed})
    W = m.model.layers[1].mlp.down_proj.weight.detach().clone()
    mean = stats.linears["model.layers.1.mlp.down_proj"].mean.float()
    biases = compensation_biases(m, plan, g, stats)
    bp = plan_biases(m, FAMILIES["llama"], g, biases, stock=stock)
    prune_(m, plan, g)
    apply_biases_(m, bp)
    assert bp.flags == (["mlp_bias"] if stock else []) and m.config.mlp_bias == stock
    x = torch.randn(3, 96)
    x_mean = x.clone()
    x_mean[:, removed] = mean[removed]
    kept = [i for i in range(96) if i not in removed]
    down = m.model.layers[1].mlp.down_proj
    assert torch.allclose(down(x[:, kept]), x_mean @ W.T, atol=1e-5)
    if stock:
        assert torch.count_nonzero(m.model.layers[0].mlp.down_proj.bias) == 0  # siblings: zero biases
        assert m.model.layers[0].mlp.gate_proj.bias is not None
    else:
        assert m.model.layers[0].mlp.down_proj.bias is None and m.model.layers[1].mlp.gate_proj.bias is None


@pytest.mark.parametrize("est,pc", [
    ("flap", dict(target={"ratio": 0.3}, structures=["heads", "mlp", "hidden"], round_to=8)),
    ("taylor_vector", dict(target={"ratio": 0.25}, structures=["mlp"], iterative_steps=2, allocation="uniform")),
    ("wanda_sp", dict(target={"shape": {"intermediate_size": 40, "num_hidden_layers": 1}})),
])
def test_run_prune_exports_and_reloads(tmp_path, ids, est, pc):
    m = LlamaForCausalLM(tiny_llama_config()).eval()
    cfg = PruneConfig(**pc)
    m, plan, rep = run_prune(m, None, cfg, ImportanceConfig(estimator=est), out_dir=tmp_path / "r", ids=ids,
                             export_dir=tmp_path / "model", recipe={"prune": cfg.model_dump(mode="json")})
    n = sum(p.numel() for p in m.parameters())
    assert rep["params_after"] == n and rep["macs_after"] < rep["macs_before"]
    if cfg.target.ratio:
        assert rep["removed_ratio"] >= cfg.target.ratio
    assert (tmp_path / "r" / "kept_widths.png").stat().st_size > 1000
    assert json.loads((tmp_path / "r" / "report.json").read_text())["params_after"] == n
    assert rep["peak_rss_mb"] > 0 and rep["time_s"]["total"] > 0
    assert (est == "flap") == bool(rep["bias_compensation"])
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, re(ids).logits, atol=1e-5)


def test_iterative_flap_biases_survive_later_steps(ids):
    m = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).eval()
    cfg = PruneConfig(target={"ratio": 0.4}, structures=["mlp", "hidden", "layers"], iterative_steps=2)
    m, _, rep = run_prune(m, None, cfg, ImportanceConfig(estimator="flap"), ids=ids)
    d = m.config.hidden_size
    assert all(layer.mlp.down_proj.bias.shape == (d,) for layer in m.model.layers)
    assert rep["removed_ratio"] >= 0.4
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()


def test_stock_compensation_counts_and_reports_the_zero_biases_of_its_flags(tmp_path, ids, caplog):
    """A uniform (stock) FLAP export compensates o_proj and down_proj through Llama's attention_bias /
    mlp_bias, which also give q/k/v and gate/up a bias (all zeros). The ratio target holds for the
    exported model with those zeros, and the result says how many there are (== the export's zeros)."""
    from shear.prune.export import export
    from shear.prune.transform import prune_to_target_

    caplog.set_level("WARNING", logger="shear")
    m = LlamaForCausalLM(tiny_llama_config()).eval()
    p0 = sum(p.numel() for p in m.parameters())
    cfg = PruneConfig(target={"ratio": 0.3}, structures=["heads", "mlp"], allocation="uniform")
    res = prune_to_target_(m, cfg, ImportanceConfig(estimator="flap"), ids)
    assert res.flags == ["attention_bias", "mlp_bias"]
    export(m, tmp_path / "model")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # stock: no modeling file needed
    assert type(back) is LlamaForCausalLM
    assert sum(p.numel() for p in back.parameters()) <= int(p0 * 0.7)
    biases = {n: p for n, p in back.named_parameters() if n.endswith(".bias")}
    zeros = sum(int((p == 0).sum()) for p in biases.values())
    assert res.zero_bias_params == zeros > 0
    assert set(res.zero_biases) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                    "mlp.up_proj"}
    assert all(biases[f"model.layers.{i}.{p}.bias"].abs().sum() > 0 for i in range(2) for p in ("self_attn.o_proj",
                                                                                               "mlp.down_proj"))
    assert any(f"{zeros} zero-valued bias parameters" in r.message for r in caplog.records)


@pytest.mark.slow
def test_cli_prune_model_dir(tmp_path):
    import argparse

    from shear.data.corpus import load_corpus
    from shear.data.tokenizer import train_bpe

    tok = train_bpe([d["text"] for d in load_corpus("train")][:20], 300)
    m = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    m.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    parser = argparse.ArgumentParser()
    from shear.cli.prune import register

    register(parser.add_subparsers())
    args = parser.parse_args(["prune", str(tmp_path / "src"), "--ratio", "0.3", "--estimator", "wanda_sp", "--n-samples", "4",
               "--seq-len", "16", "-o", str(tmp_path / "out")])
    assert args.func(args) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["removed_ratio"] >= 0.3 and (tmp_path / "out" / "model" / "config.json").exists()


def test_calibration_follows_the_recipe_data(tmp_path, caplog):
    """importance.source unset: the calibration windows come from the recipe's data section, and the
    report and log say which text, how many samples and which tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from shear.data.text import DataConfig

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["alpha", "beta", "gamma", "delta"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    (tmp_path / "a.txt").write_text(" ".join(["alpha beta"] * 400))
    (tmp_path / "b.txt").write_text(" ".join(["gamma delta"] * 400))
    caplog.set_level("INFO", logger="shear")
    m = LlamaForCausalLM(tiny_llama_config()).eval()
    cfg = PruneConfig(target={"ratio": 0.2}, structures=["mlp"])
    icfg = ImportanceConfig(estimator="wanda_sp", n_samples=4, seq_len=16)
    _, _, rep = run_prune(m, tokenizer, cfg, icfg, data=DataConfig(source=str(tmp_path), validation_fraction=0.5))
    assert f"data.source={tmp_path}," in rep["calibration_text"] and type(tokenizer).__name__ in rep["calibration_text"]
    assert rep["calibration"] == [4, 16] and any("calibration: 4 x 16" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="spread over devices"):
        m2 = LlamaForCausalLM(tiny_llama_config()).eval()
        m2.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
        run_prune(m2, tokenizer, cfg, icfg.model_copy(update={"device": "cpu"}), data=DataConfig(source=str(tmp_path)))


def test_scoring_device_moves_the_model_and_back(ids, monkeypatch):
    """importance.device: scored where asked (the calibration forward sees it), returned where it was."""
    seen = []
    import shear.importance.calibrate as cal

    real = cal.capture_block_inputs
    monkeypatch.setattr(cal, "capture_block_inputs", lambda m, *a, **k: (seen.append(next(m.parameters()).device),
                                                                        real(m, *a, **k))[1])
    m = LlamaForCausalLM(tiny_llama_config()).eval()
    moves = []
    orig_to = m.to
    monkeypatch.setattr(m, "to", lambda d, *a, **k: (moves.append(str(d)), orig_to(d, *a, **k))[1])
    run_prune(m, None, PruneConfig(target={"ratio": 0.2}, structures=["mlp"]),
              ImportanceConfig(estimator="flap", device="cpu"), ids=ids)
    assert moves == ["cpu", "cpu"] and seen == [torch.device("cpu")]


def test_device_map_loads_and_prunes_in_place(tmp_path, ids, monkeypatch):
    """model.device_map reaches from_pretrained (accelerate places the model; here all on the CPU);
    pruning scores it where it sits, and a device beside a device_map is refused."""
    from shear.models import load_model

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "m")
    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: (seen.update(k), real(cls, *a, **k))[1]))
    m = load_model(str(tmp_path / "m"), device_map={"": "cpu"})
    assert seen["device_map"] == {"": "cpu"}
    _, _, rep = run_prune(m, None, PruneConfig(target={"ratio": 0.2}, structures=["mlp"]), ImportanceConfig(), ids=ids)
    assert rep["removed_ratio"] >= 0.2
    with pytest.raises(ValueError, match="exclusive"):
        load_model(str(tmp_path / "m"), device="cpu", device_map="auto")
