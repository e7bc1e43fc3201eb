"""``shear run RECIPE --dry-run``: figures from the meta device equal counts of the real models; the fit
verdict follows the GPU memory; the launch (ZeRO stage, ranks, devices) is read as accelerate sets it;
nothing is written."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = ROOT / "tests" / "fixtures" / "llama3-8b" / "config.json"
LAUNCH_ENV = ("WORLD_SIZE", "LOCAL_RANK", "RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
              "ACCELERATE_USE_FSDP", "FSDP_SHARDING_STRATEGY")


@pytest.fixture(autouse=True)
def _no_launch(monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def tiny(tmp_path):
    """A config-only model directory (no weights: the dry run must not need them) and a recipe on it."""
    cfg = tiny_llama_config(num_hidden_layers=3, intermediate_size=256)
    d = tmp_path / "model"
    cfg.save_pretrained(d)
    recipe = {
        "output_dir": str(tmp_path / "run-out"),
        "model": {"path": str(d), "dtype": "bf16"},
        "data": {"source": "shakespeare", "seq_len": 64},
        "importance": {"estimator": "magnitude_l2", "n_samples": 4, "seq_len": 32},
        "prune": {"target": {"ratio": 0.4}, "structures": ["heads", "mlp"], "allocation": "uniform", "round_to": 8},
        "train": {"steps": 5, "batch_size": 2, "precision": "bf16", "gradient_checkpointing": True,
                  "lora": {"r": 4, "alpha": 8}},
        "distill": {"kd_weight": 1.0, "chunk_size": 32, "teacher_dtype": "bf16"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return cfg, path


def _run(recipe_path, *flags):
    from shear.config import load_recipe
    from shear.dryrun import DryRunConfig, dry_run
    from shear.dryrun.memory import parse_size

    opts = dict(flags)
    return dry_run(load_recipe(recipe_path), DryRunConfig(
        gpus=opts.get("gpus"), gpu_mem=parse_size(opts["gpu_mem"]) if "gpu_mem" in opts else None,
        config_json=opts.get("config_json"), accelerate_config=opts.get("accelerate_config"), recipe_path=str(recipe_path)))


def _item(phase, name):
    return next(i["bytes"] for i in phase["items"] if i["name"] == name)


def test_figures_equal_the_real_models(tiny, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from shear.cli import main
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import run_prune
    from shear.train.config import LoraConfig
    from shear.train.lora import apply_lora

    cfg, path = tiny
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dry.json"
    assert main(["run", str(path), "--dry-run", "--gpus", "2", "--gpu-mem", "80GB", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    real = LlamaForCausalLM(cfg).to(torch.bfloat16)
    assert r["model"]["params"] == sum(p.numel() for p in real.parameters())
    assert r["model"]["weights_bytes"] == sum(p.numel() * p.element_size() for p in real.parameters())
    # the pruned size: a real one-shot prune of the real model to the same target
    data = yaml.safe_load(path.read_text())
    pruned, _, _ = run_prune(real, None, PruneConfig(**data["prune"]), ImportanceConfig(**data["importance"]))
    assert r["pruned"]["exact"]
    assert r["pruned"]["params"] == sum(p.numel() for p in pruned.parameters())
    assert r["pruned"]["weights_bytes"] == sum(p.numel() * p.element_size() for p in pruned.parameters())
    # LoRA adapters on the pruned student, counted by peft itself
    train = next(p for p in r["phases"] if p["name"] == "train")
    peft_model = apply_lora(pruned, LoraConfig(r=4, alpha=8))
    assert train["trainable_params"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # one process per GPU, no launcher: DDP on cuda:0, cuda:1; the teacher is the unpruned model in bf16
    assert [x["device"] for x in r["ranks"]] == ["cuda:0", "cuda:1"]
    assert _item(train, "KD teacher (full replica)") == r["model"]["weights_bytes"]
    t = train["trainable_params"]
    assert _item(train, "optimizer state (AdamW)") == t * 2 * 4  # peft adapters are fp32: two fp32 moments
    assert _item(train, "gradients") == t * 4
    assert r["fits"] is True


def test_fit_follows_gpu_memory(tiny):
    _, path = tiny
    big = _run(path, ("gpus", 8), ("gpu_mem", "80GB"))
    small = _run(path, ("gpus", 8), ("gpu_mem", "1MB"))
    assert big["fits"] is True and small["fits"] is False
    peak = max(p["peak_bytes"] for p in big["phases"] if p["device"].startswith("cuda"))
    just = _run(path, ("gpus", 8), ("gpu_mem", f"{peak / 0.9 / 1e9 + 1e-6:.9f}GB"))
    under = _run(path, ("gpus", 8), ("gpu_mem", f"{peak / 0.9 / 1e9 * 0.98:.9f}GB"))
    assert just["fits"] is True and under["fits"] is False
    if not torch.cuda.is_available():  # nothing seen, nothing planned: no verdict, CPU devices
        none = _run(path)
        assert none["fits"] is None and none["ranks"] == [{"rank": 0, "device": "cpu"}]


def test_nothing_written(tiny, tmp_path, monkeypatch, capsys):
    from shear.cli import main

    _, path = tiny
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["run", str(path), "--dry-run", "--gpus", "8", "--gpu-mem", "80GB"]) == 0
    assert sorted(p for p in tmp_path.rglob("*")) == before
    text = capsys.readouterr().out
    assert "rank 7: cuda:7" in text and "fits: yes" in text and "calibration cost" in text


def test_zero3_launch_divides_student_and_offloads_teacher(tiny, monkeypatch):
    _, path = tiny
    ddp = _run(path, ("gpus", 8), ("gpu_mem", "80GB"))
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    z3 = _run(path, ("gpus", 8), ("gpu_mem", "80GB"))
    assert z3["launch"]["engine"] == "deepspeed" and z3["launch"]["zero_stage"] == 3
    assert z3["ranks"] == [{"rank": 3, "device": "cuda:3"}]  # under a launch each rank reports itself
    a, b = (next(p for p in r["phases"] if p["name"] == "train") for r in (ddp, z3))
    t = a["trainable_params"]
    assert _item(b, "optimizer state (AdamW)") == -(-t * 12 // 8)  # fp32 master + 2 moments, sharded
    # teacher_placement auto: a full replica beside a DDP student, offloaded beside a ZeRO-3 one
    assert ddp["teacher"]["placement"] == "device" and z3["teacher"]["placement"] == "cpu_offload"
    assert _item(b, "KD teacher output head") == 128 * 64 * 2  # vocab x hidden x bf16, resident
    assert z3["teacher"]["host_ram_training_bytes"] == _item(a, "KD teacher (full replica)")
    frozen = z3["pruned"]["params"]
    assert _item(b, "student weights") == -(-(frozen * 2 + t * 2) // 8)  # DeepSpeed bf16: all weights bf16, / 8


def _with(path, tmp_path, **distill):
    data = yaml.safe_load(path.read_text())
    data["distill"].update(distill)
    out = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def _step(phase, name):
    return next(i["bytes"] for i in phase["step_items"] if i["name"] == name)


def test_teacher_placement_figures_equal_the_real_teacher(tiny, tmp_path):
    """device: the whole bf16 teacher on the GPU; cpu_offload: its output head resident plus, during the forward,
    the largest module's weights, as the hooks of a real offloaded teacher put them on the execution device."""
    from transformers import LlamaForCausalLM

    from shear.train.teacher import place_teacher

    cfg, path = tiny
    runs = {pl: _run(_with(path, tmp_path, teacher_placement=pl), ("gpus", 2), ("gpu_mem", "80GB"))
            for pl in ("device", "cpu_offload", "auto")}
    dev, off = (next(p for p in runs[k]["phases"] if p["name"] == "train") for k in ("device", "cpu_offload"))
    assert runs["auto"]["teacher"]["placement"] == "device"  # DDP: the student is not sharded
    real = LlamaForCausalLM(cfg)
    assert _item(dev, "KD teacher (full replica)") == sum(p.numel() * 2 for p in real.parameters())
    on_device = {}  # per hooked module: bytes of its own weights on the execution device inside its forward
    place_teacher(real, "cpu_offload", torch.device("cpu"), torch.bfloat16)
    for name, m in real.named_modules():
        if hasattr(m, "_hf_hook"):
            def spy(*a, _m=m, _inner=m._old_forward, _n=name, **k):
                on_device[_n] = sum(p.numel() * p.element_size() for p in _m.parameters(recurse=False)
                                    if p.device.type != "meta")
                return _inner(*a, **k)
            m._old_forward = spy
    with torch.no_grad():
        real(input_ids=torch.zeros(1, 8, dtype=torch.long))
    head = real.get_output_embeddings().weight
    assert "model.embed_tokens" in on_device and "lm_head" not in on_device
    assert _item(off, "KD teacher output head") == head.numel() * head.element_size()
    assert _step(off, "teacher module (offloaded)") == max(on_device.values()) == 64 * 256 * 2  # an MLP projection
    assert "KD teacher (full replica)" not in [i["name"] for i in off["items"]]
    assert off["peak_bytes"] < dev["peak_bytes"]
    assert runs["cpu_offload"]["teacher"]["host_ram_training_bytes"] == _item(dev, "KD teacher (full replica)")
    assert runs["device"]["teacher"]["host_ram_training_bytes"] == 0


def test_teacher_hidden_states_only_for_hidden_kd(tiny, tmp_path):
    """Without hidden-state KD the teacher forward keeps its final hidden states only (b*s*(h + E)), with it every
    layer's (b*s*((L+1)*h + E)); batch 2, seq 64, bf16 activations."""
    from shear.dryrun.memory import layer_elements
    from shear.dryrun.model import shape_of

    cfg, path = tiny
    e = layer_elements(shape_of(cfg))
    logit, hidden = (next(p for p in _run(_with(path, tmp_path, hidden_weight=w), ("gpus", 2), ("gpu_mem", "80GB"))
                          ["phases"] if p["name"] == "train") for w in (0.0, 1.0))
    assert _step(logit, "teacher forward (hidden states)") == 2 * 64 * (64 + e) * 2
    assert _step(hidden, "teacher forward (hidden states)") == 2 * 64 * (4 * 64 + e) * 2  # 3 layers: L+1 = 4


def test_launch_line_and_config_file(tmp_path):
    from shear.dryrun.launch import from_line, resolve
    from shear.dryrun.memory import shards

    r = tmp_path / "r.yaml"
    r.write_text("# accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 8 -m shear train r.yaml\n")
    la = resolve(r, env={})
    assert (la.engine, la.zero_stage, la.processes) == ("deepspeed", 2, 8)  # found from the repository root
    assert shards("deepspeed", 2) == {"params": False, "grads": True, "optim": True}
    assert shards("fsdp", 3) == {"params": True, "grads": True, "optim": True}
    assert shards("ddp", None) == {"params": False, "grads": False, "optim": False}
    assert from_line("accelerate launch --num_processes 4 -m shear train x", r).engine == "ddp"
    with pytest.raises(FileNotFoundError, match="--accelerate-config"):
        from_line("accelerate launch --config_file nowhere.yaml -m shear train x", r)


def test_parse_size():
    from shear.dryrun.memory import parse_size

    assert parse_size("80GB") == 80 * 10**9 and parse_size("80GiB") == 80 * 2**30 and parse_size("80") == 80 * 10**9
    with pytest.raises(ValueError, match="--gpu-mem"):
        parse_size("lots")


def test_hub_model_without_config_asks_for_config_json(tiny, tmp_path):
    from shear.cli import main

    _, path = tiny
    r = yaml.safe_load(path.read_text())
    r["model"]["path"] = "no-such-org/no-such-model"
    p = tmp_path / "hub.yaml"
    p.write_text(yaml.safe_dump(r))
    assert main(["run", str(p), "--dry-run"]) == 2


def test_resolve_device(monkeypatch):
    from shear.models import resolve_device

    assert resolve_device("cuda") == "cuda" and resolve_device(None) is None and resolve_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert resolve_device("cuda") == "cuda:5" and resolve_device("cuda:1") == "cuda:1"
    if not torch.cuda.is_available():
        assert resolve_device("auto") is None  # a CPU machine: stay where the model is


@pytest.mark.parametrize("name", ["prune-50-kd", "shearing-3b"])
def test_llama3_8b_recipes_fit_8x80gb(name):
    """The shipped 8B recipes on Llama-3-8B's config (meta device): every stage on a GPU per rank, fits 8 x 80 GB."""
    r = _run(ROOT / "recipes" / "llama3-8b" / f"{name}.yaml", ("gpus", 8), ("gpu_mem", "80GB"),
             ("config_json", str(LLAMA3_8B)))
    assert r["model"]["params"] == 8_030_261_248  # Llama-3-8B
    assert [x["device"] for x in r["ranks"]] == [f"cuda:{i}" for i in range(8)]
    assert all(p["device"] == "cuda:0" for p in r["phases"]), [(p["name"], p["device"]) for p in r["phases"]]
    assert r["fits"] is True and not r["warnings"]
    assert r["launch"]["processes"] == 8


def test_scoring_device_is_the_ranks_gpu(monkeypatch):
    """importance.device 'cuda' under a launch moves the model to cuda:<LOCAL_RANK>, not GPU 0 for every rank."""
    from transformers import LlamaForCausalLM

    from shear.prune.pipeline import _move_for_scoring

    m = LlamaForCausalLM(tiny_llama_config())
    moves = []
    monkeypatch.setattr(m, "to", lambda d, *a, **k: moves.append(str(d)))
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert _move_for_scoring(m, "cuda") == torch.device("cpu") and moves == ["cuda:2"]
    if not torch.cuda.is_available():
        assert _move_for_scoring(m, "auto") is None and moves == ["cuda:2"]  # no GPU: scored where it is


def test_activation_estimate_matches_autograd():
    """The activation formula against what autograd really keeps: the saved tensors of a bf16 Llama forward
    (SDPA attention), counted once per storage, parameters excluded."""
    from transformers import LlamaForCausalLM

    from shear.dryrun.memory import activation_bytes
    from shear.dryrun.model import shape_of

    cfg = tiny_llama_config(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=512,
                            attn_implementation="sdpa")
    m = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    b, s = 2, 256
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.model(input_ids=torch.randint(512, (b, s)))
    estimate, _ = activation_bytes(shape_of(cfg), b, s, 2, checkpointing=False)
    assert 0.9 < sum(saved.values()) / estimate < 1.15
