"""LoRA via peft: selection by name/regex, merged export reloads with the adapter model's logits."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from families import FAMILIES, family_model

from shear.train.config import LoraConfig, TrainConfig
from shear.train.lora import apply_lora, merge_lora, peft_targets
from shear.train.trainer import train
from test_train_worker import ToyDataset, tiny_model


def _lora_modules(model):
    return sorted(n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A"))


def test_targets_by_name_and_regex():
    assert peft_targets(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    m = apply_lora(tiny_model(), LoraConfig(r=2, target_modules=["re:.*layers\\.1\\.mlp\\.(up|down)_proj", "q_proj"]))
    names = [n.split("model.layers.", 1)[-1] for n in _lora_modules(m)]
    assert names == ["0.self_attn.q_proj", "1.mlp.down_proj", "1.mlp.up_proj",
                      "1.self_attn.q_proj"]
    assert all(("lora_" in n) == p.requires_grad for n, p in m.named_parameters())


def test_merged_export_reloads_with_identical_logits(tmp_path):
    peft_model = apply_lora(tiny_model(), LoraConfig(r=4, alpha=8, target_modules="re:.*(q|o|gate)_proj"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # non-identity adapter: B = 0 would make the test vacuous
    peft_model.eval()
    x = torch.randint(0, 128, (2, 12))
    base = tiny_model()
    with torch.no_grad():
        adapted = peft_model(input_ids=x).logits
        assert (adapted - base(input_ids=x).logits).abs().max() > 1e-2  # the adapter changes outputs
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM" and not _lora_modules(merged)
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, adapted, rtol=1e-5, atol=1e-5)


def test_lora_training_changes_only_adapted_weights(tmp_path):
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=1, resume=False,
                      lora=LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    res = train(base, ToyDataset(16), ToyDataset(4), cfg, tmp_path / "l")
    after = res.model.state_dict()
    assert type(res.model).__name__ == "LlamaForCausalLM" and after.keys() == before.keys()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed and all(k.endswith(("q_proj.weight", "down_proj.weight")) for k in changed)
    saved = (tmp_path / "l" / "checkpoints" / "step-4" / "trainable.safetensors").stat().st_size
    assert saved < 0.25 * sum(v.numel() * 4 for v in before.values())  # adapters only


# projections per block: fused qkv (Phi-3, GPT-2) and gate_up (Phi-3) count once; GPT-2's c_proj twice
PROJECTIONS_PER_BLOCK = {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma": 7, "gemma2": 7, "gemma3_text": 7,
                         "olmo2": 7, "granite": 7, "smollm3": 7, "cohere": 7, "starcoder2": 6, "gpt_neox": 4, "phi": 6,
                         "phi3": 4, "gpt2": 4, "opt": 6, "bert": 6, "mytestllama": 7,
                         "falcon": 4}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_adapt_every_projection_of_every_family(family):
    from shear.analyze.families import family_of

    model = family_model(family)
    fam, n_layers = family_of(model), model.config.num_hidden_layers  # mytestllama: the llama entry, by structure
    peft_model = apply_lora(model, LoraConfig(r=2))
    got = _lora_modules(peft_model)
    assert len(got) == PROJECTIONS_PER_BLOCK[family] * n_layers, got
    for i in range(n_layers):  # each projection the family names, in each block
        for field in ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc1", "fc2"):
            path = getattr(fam, field)
            if path:
                assert any(n.endswith(f"{fam.layers}.{i}.{path}") for n in got), (field, i)
    assert not any("pooler" in n for n in got)  # BERT's pooler.dense is not a block projection


def test_targets_that_match_nothing_fail_loudly():
    with pytest.raises(ValueError, match="LoRA: target 'qkv_proj' matched no module"):
        apply_lora(tiny_model(), LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ValueError, match=r"LoRA: 2 of 3 targets matched nothing: 'c_attn', 're:.*nope'"):
        apply_lora(tiny_model(), LoraConfig(target_modules=["q_proj", "c_attn", "re:.*nope"]))
    # a Llama list on Phi-3 (fused projections) used to give 2 adapters per block silently
    with pytest.raises(ValueError, match="5 of 7 targets matched nothing"):
        apply_lora(family_model("phi3"), LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                   "gate_proj", "up_proj", "down_proj"]))
