"""The ``flap_original`` estimator (FLAP's released code): WIFV per consumer column, z-scored per layer.

Hand computation from the inputs of down_proj / o_proj, captured with forward hooks over a plain
forward of the calibration ids."""
import pytest
import torch
from transformers import LlamaForCausalLM

from shear.analyze import analyze
from shear.importance import score
from shear.prune.config import ImportanceConfig, PruneConfig
from conftest import tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

I, D, NH, NKV = 96, 16, 4, 2  # intermediate, head_dim, query heads, KV heads (tiny_llama_config)


@pytest.fixture
def model():
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def ids():
    return torch.randint(0, 128, (6, 12))


def _inputs(model, modules, ids):
    """{name: the input [tokens, in] of each module} over one plain forward."""
    seen = {n: [] for n in modules}
    hooks = [mod.register_forward_hook(lambda _m, i, _o, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
             for n, mod in modules.items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def _wifv(x, w):
    """Var(X_j) (unbiased, over all tokens) * ||W[:, j]||^2 for every input column j."""
    x, w = x.double(), w.detach().double()
    return torch.stack([x[:, j].var() * (w[:, j] ** 2).sum() for j in range(w.shape[1])])


def _z(v):
    return (v - v.mean()) / v.std()  # torch.std: unbiased


def test_by_hand_kv_groups_and_mlp_channels(model, ids):
    g = analyze(model)
    cfg = ImportanceConfig(estimator="flap_original", batch_size=4)  # two batches: streaming stats
    scores, _ = score(model, g, cfg, ids, kinds={"kv_group", "mlp_channel"})
    for layer in range(2):
        blk = model.model.layers[layer]
        x = _inputs(model, {"down": blk.mlp.down_proj, "o": blk.self_attn.o_proj}, ids)
        assert x["down"].shape == (6 * 12, I)
        want_mlp = _z(_wifv(x["down"], blk.mlp.down_proj.weight))
        got_mlp = scores[f"layers.{layer}.mlp_channel"].double()
        assert got_mlp.shape == (I,)
        assert torch.allclose(got_mlp, want_mlp, atol=1e-4), layer
        # z-scored within this layer: mean 0, unbiased std 1 (not standardized again across layers)
        assert abs(got_mlp.mean()) < 1e-4 and abs(got_mlp.std() - 1) < 1e-4
        # o_proj: the WIFV metric squared, z-scored over the layer's 64 columns, a KV group = mean of its 32
        col = _z(_wifv(x["o"], blk.self_attn.o_proj.weight) ** 2)
        want_kv = torch.stack([col[:2 * D].mean(), col[2 * D:].mean()])
        assert torch.allclose(scores[f"layers.{layer}.kv_group"].double(), want_kv, atol=1e-5), layer
        # not the unsquared metric, nor the sum of the columns
        plain = _z(_wifv(x["o"], blk.self_attn.o_proj.weight))
        assert not torch.allclose(want_kv, torch.stack([plain[:2 * D].mean(), plain[2 * D:].mean()]), atol=1e-3)
        assert not torch.allclose(want_kv, torch.stack([col[:2 * D].sum(), col[2 * D:].sum()]), atol=1e-3)


def test_by_hand_query_heads(model, ids):
    """heads=query_head: unit u is the u-th query head of every KV group (heads u and NH/NKV + u)."""
    g = analyze(model, heads="query_head")
    scores, _ = score(model, g, ImportanceConfig(estimator="flap_original"), ids, kinds={"query_head"})
    blk = model.model.layers[0]
    x = _inputs(model, {"o": blk.self_attn.o_proj}, ids)["o"]
    col = _z(_wifv(x, blk.self_attn.o_proj.weight) ** 2)
    per_head = col.view(NH, D)  # [head, column within the head]
    want = torch.stack([per_head[[0, 2]].mean(), per_head[[1, 3]].mean()])
    assert torch.allclose(scores["layers.0.query_head"].double(), want, atol=1e-5)


def test_other_kinds_are_refused(model, ids):
    with pytest.raises(ValueError, match="flap_original.*cannot score kinds \\['hidden'\\]"):
        score(model, analyze(model), ImportanceConfig(estimator="flap_original"), ids, kinds={"hidden"})


def test_pool_allocation_settings():
    from shear.prune.transform import check_settings

    pool = PruneConfig(target={"ratio": 0.3}, allocation="pool")
    check_settings(pool, ImportanceConfig(estimator="flap_original"))  # standardized by construction
    check_settings(pool, ImportanceConfig(estimator="flap"))  # standardized across layers by default
    with pytest.raises(ValueError, match="allocation=pool.*standardize=true.*'wanda_sp'"):
        check_settings(pool, ImportanceConfig(estimator="wanda_sp"))
    check_settings(pool, ImportanceConfig(estimator="wanda_sp", standardize=True))
    check_settings(PruneConfig(target={"ratio": 0.3}), ImportanceConfig(estimator="wanda_sp"))  # global: fine


def test_prune_to_target_with_pool_reaches_the_ratio(model, ids):
    from shear.prune.transform import prune_to_target_

    p0 = sum(p.numel() for p in model.parameters())
    ratio = 0.3
    res = prune_to_target_(model, PruneConfig(target={"ratio": ratio}, allocation="pool"),
                           ImportanceConfig(estimator="flap_original", layer_estimator=None), ids)
    p1 = sum(p.numel() for p in model.parameters())
    assert p1 <= int(p0 * (1 - ratio))
    kv_group = 2 * (2 * D) * 64 + 2 * D * 64  # q and o: 2 heads of 16; k and v: one head of 16 (hidden 64)
    assert p1 >= int(p0 * (1 - ratio)) - kv_group  # near the target: past it by less than the largest unit
    assert res.compensate  # FLAP's bias compensation is on by default for flap_original
    assert len(res.plans) == 1
    removed = res.plans[0].remove
    assert any(removed.get(f"layers.{i}.mlp_channel") for i in range(2))
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (6, 12, 128) and torch.isfinite(out).all()
