"""Where the KD teacher runs (distill.teacher_placement): cpu_offload trains exactly as device placement,
keeps the weights off the execution device outside each module's forward, and auto offloads under ZeRO-3."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch

from families import family_model
from shear.train.config import DistillConfig, TrainConfig
from shear.train.teacher import params_sharded, place_teacher, resolve_placement
from shear.train.trainer import train
from test_encoder_kd import Text
from test_train import _same
from test_train_worker import ToyDataset, tiny_model

CASES = {  # (student, teacher, train set, distill): logit KD from the base model; hidden-state KD (every layer)
    "logit-kd-bf16-tied": (lambda: tiny_model(), lambda: tiny_model(1, tie_word_embeddings=True), ToyDataset,
                           dict(ce_weight=0.5, kd_weight=1.0, teacher_dtype="bf16", chunk_size=9)),
    "hidden-kd-deeper": (lambda: tiny_model(), lambda: tiny_model(1, num_hidden_layers=4, hidden_size=48, head_dim=12),
                         ToyDataset, dict(kd_weight=1.0, hidden_weight=1.0, layer_map=[2, 4], chunk_size=5)),
    "encoder-embedding": (lambda: family_model("bert"), lambda: family_model("bert"), Text,
                          dict(kd_weight=0.0, embedding_weight=1.0)),
}


LOSSES = ("loss", "ce", "kd", "hidden", "embedding", "grad_norm")


def _records(path):
    recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return [{k: r[k] for k in LOSSES if k in r} for r in recs]


@pytest.mark.parametrize("case", CASES)
def test_cpu_offload_trains_as_device_placement(tmp_path, case, caplog):
    caplog.set_level("INFO", logger="shear.train.trainer")
    make_s, make_t, data, kw = CASES[case]
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, log_every=1, resume=False, seed=0)
    runs = {}
    for placement in ("device", "cpu_offload"):
        torch.manual_seed(0)
        student, teacher = make_s(), make_t()
        runs[placement] = (train(student, data(16), data(4, seed=1), cfg, tmp_path / placement, teacher=teacher,
                                 distill=DistillConfig(teacher_placement=placement, **kw)), teacher)
    (dev, _), (off, teacher) = runs["device"], runs["cpu_offload"]
    a, b = _records(tmp_path / "device"), _records(tmp_path / "cpu_offload")
    assert len(a) == 3 and a == b  # the same losses, bit for bit
    assert a[0]["loss"] > 0
    _same(dev.model, off.model)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KD teacher:")]
    assert len(said) == 2 and "the whole teacher on cpu" in said[0] and "weights in host memory" in said[1]
    assert ("torch.bfloat16" in said[1]) == (kw.get("teacher_dtype") == "bf16")
    assert teacher._shear_offloaded and hasattr(teacher.get_input_embeddings(), "_hf_hook")
    assert teacher.get_input_embeddings().weight.device.type == "meta"  # not on the device outside forward


def test_offloaded_teacher_holds_no_weights_outside_forward():
    teacher = tiny_model(1)
    ref = copy.deepcopy(teacher).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    place_teacher(teacher, "cpu_offload", torch.device("cpu"), torch.bfloat16)
    head = teacher.get_output_embeddings()
    hooked = [n for n, m in teacher.named_modules() if hasattr(m, "_hf_hook")]
    off = {n: p for n, p in teacher.named_parameters() if not n.startswith("lm_head.")}
    assert "model.layers.0.mlp.gate_proj" in hooked and "lm_head" not in hooked
    assert off and all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in off.values())
    assert head.weight.device.type == "cpu" and head.weight.dtype == torch.bfloat16  # resident: called per KD chunk
    seen, down = [], teacher.model.layers[1].mlp.down_proj  # inside its forward: its weights on the execution device
    inner = down._old_forward  # what accelerate's hook calls between moving the weights in and out

    def spy(*args):
        seen.append(down.weight.device.type)
        return inner(*args)
    down._old_forward = spy
    with torch.no_grad():
        out = teacher(input_ids=ids).logits
        want = ref.to(torch.bfloat16)(input_ids=ids).logits
    down._old_forward = inner
    assert seen == ["cpu"] and torch.equal(out, want)
    assert all(p.device.type == "meta" for n, p in teacher.named_parameters() if n in off)
    # placed again (the next round of an iterative run): hooks undone first, weights back, then device placement
    place_teacher(teacher, "device", torch.device("cpu"))
    assert not teacher._shear_offloaded and not any(hasattr(m, "_hf_hook") for m in teacher.modules())
    for n, p in ref.named_parameters():
        assert torch.equal(dict(teacher.named_parameters())[n], p), n
    for _ in range(2):  # offloaded twice in a row: one hook per module, the same outputs
        place_teacher(teacher, "cpu_offload", torch.device("cpu"))
    assert type(down._hf_hook).__name__ == "AlignDevicesHook"
    with torch.no_grad():
        assert torch.equal(teacher(input_ids=ids).logits, want)


def test_auto_offloads_only_a_sharded_student():
    assert resolve_placement("auto", sharded=True) == "cpu_offload"
    assert resolve_placement("auto", sharded=False) == "device"
    assert resolve_placement("device", sharded=True) == "device"
    assert resolve_placement("cpu_offload", sharded=False) == "cpu_offload"
    with pytest.raises(ValueError, match="teacher_placement"):
        resolve_placement("gpu", sharded=False)

    def acc(kind, stage=None):
        plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
        return SimpleNamespace(distributed_type=f"DistributedType.{kind}",
                               state=SimpleNamespace(deepspeed_plugin=plugin))
    assert params_sharded(acc("DEEPSPEED", 3)) and not params_sharded(acc("DEEPSPEED", 2))
    assert not params_sharded(acc("MULTI_CPU")) and not params_sharded(acc("NO"))


def test_config_field():
    assert DistillConfig().teacher_placement == "auto"
    assert DistillConfig(teacher_placement="cpu_offload").teacher_placement == "cpu_offload"
    with pytest.raises(ValueError, match="teacher_placement"):
        DistillConfig(teacher_placement="gpu")
