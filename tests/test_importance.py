"""Estimators on a one-layer Llama, each against a hand computation written out in the test."""
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from shear.analyze.graph import Group, Member, StructureGraph
from shear.importance import ESTIMATORS, score
from shear.importance.calibrate import collect_activation_stats
from shear.importance.criteria import aggregate
from shear.prune.config import ImportanceConfig
from conftest import tiny_llama_config

H, I, D = 64, 96, 16  # hidden, intermediate, head_dim (4 query heads, 2 KV heads)


def one_layer():
    return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()


def hand_graph(model) -> StructureGraph:
    """MLP channels and KV groups of layer 0, built by hand (independent of the analyzer)."""
    p = "model.layers.0."
    ch = torch.arange(I).view(I, 1)
    mlp = Group("layers.0.mlp_channel", "mlp_channel", I, [
        Member(p + "mlp.gate_proj.weight", 0, ch), Member(p + "mlp.up_proj.weight", 0, ch),
        Member(p + "mlp.down_proj.weight", 1, ch, role="in")], layer=0)
    q = torch.arange(4 * D).view(2, 2 * D)
    kv = torch.arange(2 * D).view(2, D)
    heads = Group("layers.0.kv_group", "kv_group", 2, [
        Member(p + "self_attn.q_proj.weight", 0, q), Member(p + "self_attn.k_proj.weight", 0, kv),
        Member(p + "self_attn.v_proj.weight", 0, kv), Member(p + "self_attn.o_proj.weight", 1, q, role="in")], layer=0)
    layer = Group("layers.0.layer", "layer", 1, [Member(p + "mlp.up_proj.weight", 0, torch.zeros(1, 0, dtype=torch.long),
                                                       role="whole")], layer=0, module="model.layers.0")
    total = sum(x.numel() for x in model.parameters())
    return StructureGraph("llama", [mlp, heads, layer], total, 0, meta={"num_layers": 1})


def run(model, est, ids=None, **kw):
    default_layer = "block_influence" if ids is not None else None
    cfg = ImportanceConfig(estimator=est, layer_estimator=kw.pop("layer_estimator", default_layer), **kw)
    return score(model, hand_graph(model), cfg, ids)[0]


@pytest.fixture
def ids():
    return torch.randint(0, 128, (4, 12))


def test_magnitude_by_hand():
    m = one_layer()
    mlp = m.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(torch.arange(I, dtype=torch.float).view(I, 1).expand(I, H))  # row c = c
        mlp.up_proj.weight.fill_(-1.0)
        mlp.down_proj.weight.fill_(2.0)
    c = torch.arange(I, dtype=torch.float)
    l1 = run(m, "magnitude_l1")["layers.0.mlp_channel"]
    assert torch.allclose(l1, 64 * c + 64 + 128)  # 64 entries each: |c|, |-1|, |2|
    l2 = run(m, "magnitude_l2")["layers.0.mlp_channel"]
    assert torch.allclose(l2, 8 * c + 8 + 16)  # sqrt(64 c^2) = 8c, sqrt(64) = 8, sqrt(64 * 4) = 16
    assert torch.allclose(run(m, "magnitude_l2", aggregation="max")["layers.0.mlp_channel"], torch.maximum(8 * c, torch.tensor(16.0)))
    assert torch.allclose(run(m, "magnitude_l2", aggregation="prod")["layers.0.mlp_channel"], 8 * c * 8 * 16)
    assert torch.allclose(run(m, "magnitude_l2", aggregation="first")["layers.0.mlp_channel"], 8 * c)
    assert torch.allclose(run(m, "magnitude_l2", aggregation="mean")["layers.0.mlp_channel"], (8 * c + 24) / 3)
    whole = run(m, "magnitude_l1", layer_estimator=None)["layers.0.layer"]
    assert torch.allclose(whole, torch.tensor([float(I * H)]))  # the whole up_proj: 96 * 64 entries of |-1|


def test_aggregate_rejects_unknown():
    with pytest.raises(ValueError, match="aggregation"):
        aggregate([torch.ones(2)], "median")


def _inputs_of(model, module, ids):
    """The input ``[tokens, in]`` of ``module`` over a plain (non-streaming) forward."""
    seen = []
    h = module.register_forward_hook(lambda _m, i, _o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    return torch.cat(seen)


def test_activation_criteria_by_hand(ids):
    m = one_layer()
    down = m.model.layers[0].mlp.down_proj
    o = m.model.layers[0].self_attn.o_proj
    X = _inputs_of(m, down, ids).double()  # [48, 96]
    W = down.weight.detach().double()
    # Wanda-sp: ||X_j||_2 * mean_i |W_ij|
    want = torch.stack([X[:, j].norm() * W[:, j].abs().mean() for j in range(I)])
    assert torch.allclose(run(m, "wanda_sp", ids)["layers.0.mlp_channel"].double(), want, rtol=1e-4)
    # FLAP: unbiased variance of X_j times ||W[:, j]||^2, standardized over all units of the kind
    raw = torch.stack([X[:, j].var() * (W[:, j] ** 2).sum() for j in range(I)])
    want = (raw - raw.mean()) / raw.std()
    assert torch.allclose(run(m, "flap", ids)["layers.0.mlp_channel"].double(), want, atol=1e-4)
    assert torch.allclose(run(m, "flap", ids, standardize=False)["layers.0.mlp_channel"].double(), raw, rtol=1e-4)
    # Minitron: sqrt(sum over samples of (mean over tokens |X_j|)^2), summed over a unit's channels
    Xo = _inputs_of(m, o, ids).double().view(4, 12, 4 * D)
    per = Xo.abs().mean(1).pow(2).sum(0).sqrt()  # [64]
    want = torch.stack([per[:2 * D].sum(), per[2 * D:].sum()])
    assert torch.allclose(run(m, "minitron", ids)["layers.0.kv_group"].double(), want, rtol=1e-4)


def test_layer_metrics_by_hand(ids):
    m = one_layer()
    layer = m.model.layers[0]
    io = {}
    h1 = layer.register_forward_pre_hook(lambda _m, a, kw: io.__setitem__("x", (a[0] if a else kw["hidden_states"])),
                                         with_kwargs=True)
    h2 = layer.register_forward_hook(lambda _m, _a, out: io.__setitem__("y", out))
    with torch.no_grad():
        m(ids)
    h1.remove(), h2.remove()
    cos = torch.nn.functional.cosine_similarity(io["x"], io["y"], dim=-1).double()
    bi = run(m, "magnitude_l1", ids, layer_estimator="block_influence")["layers.0.layer"]
    assert math.isclose(float(bi), float(1 - cos.mean()), rel_tol=1e-4)
    ang = run(m, "magnitude_l1", ids, layer_estimator="angular")["layers.0.layer"]
    assert math.isclose(float(ang), float(torch.arccos(cos.clamp(-1, 1)).mean() / math.pi), rel_tol=1e-4)


def _per_sample_grads(model, ids, names):
    params = dict(model.named_parameters())
    out = []
    for s in range(ids.shape[0]):
        loss = model(input_ids=ids[s:s + 1], labels=ids[s:s + 1]).loss
        out.append(dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]))))
    return out


def test_taylor_criteria_by_hand(ids):
    m = one_layer()
    name = "model.layers.0.mlp.down_proj.weight"
    gs = _per_sample_grads(m, ids, [name])
    g = torch.stack([x[name] for x in gs]).mean(0)  # gradient of the mean loss
    F = torch.stack([x[name] ** 2 for x in gs]).mean(0)  # diagonal Fisher from per-sample gradients
    w = m.get_parameter(name).detach()
    wg = w * g
    # score with 'first' aggregation on a graph whose first member is down_proj
    graph = hand_graph(m)
    mlp = graph["layers.0.mlp_channel"]
    mlp.members = [mlp.members[2]] + mlp.members[:2]
    cfg = lambda est: ImportanceConfig(estimator=est, aggregation="first", batch_size=3)  # noqa: E731
    got = {e: score(m, graph, cfg(e), ids, kinds={"mlp_channel"})[0]["layers.0.mlp_channel"]
           for e in ("taylor_vector", "taylor_element1", "taylor_element2")}
    assert torch.allclose(got["taylor_vector"], wg.sum(0).abs(), rtol=1e-3, atol=1e-9)
    assert torch.allclose(got["taylor_element1"], wg.abs().sum(0), rtol=1e-3, atol=1e-9)
    want2 = (wg - 0.5 * w * w * F).abs().sum(0)
    assert torch.allclose(got["taylor_element2"], want2, rtol=1e-3, atol=1e-9)
    # the Fisher is the mean of per-sample squares (fp32), not the square of the mean gradient
    stats = score(m, graph, cfg("taylor_element2"), ids, kinds={"mlp_channel"})[1].grads["element2"]
    assert torch.allclose(stats.fisher[name], F, rtol=1e-3, atol=1e-14)
    assert (F > 1.5 * g * g).float().mean() > 0.5
    assert all(p.grad is None for p in m.parameters())  # hooks freed every gradient


def test_random_is_seeded_and_estimators_listed(ids):
    m = one_layer()
    a, b = run(m, "random"), run(m, "random")
    assert torch.equal(a["layers.0.mlp_channel"], b["layers.0.mlp_channel"])
    assert not torch.equal(a["layers.0.mlp_channel"], run(m, "random", seed=1)["layers.0.mlp_channel"])
    assert {"magnitude_l1", "magnitude_l2", "taylor_vector", "taylor_element1", "taylor_element2", "wanda_sp", "flap",
            "minitron", "block_influence", "angular", "random"} <= set(ESTIMATORS)
    with pytest.raises(ValueError, match="estimator"):
        ImportanceConfig(estimator="nope")


def test_streaming_equals_plain_forward(ids):
    """Block-by-block stats of a 2-layer model equal the stats of one plain forward."""
    m = LlamaForCausalLM(tiny_llama_config()).eval()
    st = collect_activation_stats(m, ids, batch_size=3)
    for name in ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj", "lm_head"):
        X = _inputs_of(m, m.get_submodule(name), ids).double()
        s = st.linears[name]
        assert s.n == X.shape[0]
        assert torch.allclose(s.x_sum, X.sum(0), atol=1e-6) and torch.allclose(s.x_sqsum, (X * X).sum(0), atol=1e-6)


def test_analyzer_graph_scores_every_group(tiny_llama, ids):
    from shear.analyze import analyze

    g = analyze(tiny_llama)
    for est in ("magnitude_l2", "wanda_sp", "flap", "minitron", "taylor_vector"):
        scores, _ = score(tiny_llama, g, ImportanceConfig(estimator=est), ids)
        assert set(scores) == {x.name for x in g.groups}
        assert all(s.shape == (g[n].num_units,) and torch.isfinite(s).all() for n, s in scores.items())


def test_column_criteria_follow_the_weights_device():
    """Calibration statistics are CPU fp64; scoring a model on a GPU multiplies them with GPU weights. A meta
    weight stands in for the GPU here: a CPU tensor times a meta (or CUDA) tensor is a device error."""
    from shear.importance import criteria as C

    w = torch.randn(3, 4)
    x_sum, x_sqsum = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 2
    for fn, args in ((C.flap_columns, (x_sum, x_sqsum, 10)), (C.wanda_columns, (x_sqsum,))):
        assert fn(w.to("meta"), *args).device.type == "meta"
        assert fn(w, *args).shape == (4,)
    expected = ((x_sqsum - 10 * (x_sum / 10) ** 2) / 9).clamp_min(0).float() * (w ** 2).sum(0)
    assert torch.allclose(C.flap_columns(w, x_sum, x_sqsum, 10), expected)
