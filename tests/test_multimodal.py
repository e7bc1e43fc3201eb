"""A Gemma 3 vision-language checkpoint (``Gemma3ForConditionalGeneration``, vision tower included) given to
``shear prune``/``shear sparsify``: its language model is pruned as ``Gemma3ForCausalLM`` (one log line), and
the export is a plain ``gemma3_text`` checkpoint that a FRESH process loads with ``from_pretrained``, every key
in place, with the pruned model's logits bit for bit.
"""
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import ONE_THREAD
from families import FAMILY_CONFIGS
from shear.multimodal import text_only

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(2, 120, (2, 12), generator=torch.Generator().manual_seed(1))


def gemma3_vl(vocab_size: int = 128):
    """A tiny Gemma3ForConditionalGeneration: the gemma3_text family config (soft-capping 30 included) and a
    2-layer SigLIP tower, every weight from N(0, 0.2)."""
    text = transformers.Gemma3TextConfig(**dict(FAMILY_CONFIGS["gemma3_text"][2], vocab_size=vocab_size))
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 2,
                                    image_token_index=vocab_size - 1)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_text_only_is_the_language_model_with_the_same_logits(caplog):
    model = gemma3_vl()
    want = _logits(model)
    assert model.config.text_config.final_logit_softcapping == 30.0
    with caplog.at_level(logging.INFO, logger="shear"):
        causal = text_only(model)
    assert type(causal) is transformers.Gemma3ForCausalLM and causal.config.model_type == "gemma3_text"
    assert causal.model is model.model.language_model and not any("vision" in n for n, _ in causal.named_parameters())
    assert torch.equal(_logits(causal), want)  # soft-capping cleared: the multimodal class never applied it
    assert [r.getMessage() for r in caplog.records if "language model only" in r.getMessage()] == [
        "Gemma3ForConditionalGeneration: pruning the language model only; it is Gemma3ForCausalLM over its "
        "gemma3_text config (vision tower dropped), and so is the export"]
    assert text_only(causal) is causal


RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    root, out = sys.argv[1], []
    ids = load_file(root + "/ids.safetensors")["ids"]
    for d in sys.argv[2:]:
        m, info = AutoModelForCausalLM.from_pretrained(root + "/" + d, output_loading_info=True)
        with torch.no_grad():
            got = m.eval()(input_ids=ids).logits.float()
        want = load_file(root + "/" + d + "/expected.safetensors")["out"]
        out.append([type(m).__name__, {k: v for k, v in info.items() if v and k != "error_msgs"},
                    bool(torch.equal(got, want))])
    print(json.dumps(out))
""")


def test_cli_prunes_and_sparsifies_the_language_model_of_a_vl_checkpoint(tiny_lm_dir, tiny_text, tmp_path, caplog):
    """``shear prune`` (heads + MLP, magnitude: the plan alone reproduces the model) and ``shear sparsify``
    on a saved Gemma3ForConditionalGeneration: both export Gemma3ForCausalLM / gemma3_text without the vision
    tower; a fresh process reloads each with no missing or unexpected key and the logits of this process's
    text-only model with the same plan applied (pruning) or of the export itself (sparsify)."""
    from shear.analyze import PrunePlan
    from shear.cli import main
    from shear.models import load_model
    from shear.prune import prune_

    tok = transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)
    src = tmp_path / "src"
    gemma3_vl(len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    (tmp_path / "calib.txt").write_text(tiny_text)
    calib = ["--n-samples", "4", "--seq-len", "32"]
    with caplog.at_level(logging.INFO, logger="shear"):
        assert main(["prune", str(src), "--ratio", "0.2", "--estimator", "magnitude_l2", "--structures", "heads", "mlp",
                     "--calib", str(tmp_path / "calib.txt"), "-o", str(tmp_path / "p")] + calib) == 0
        assert main(["sparsify", str(src), "--method", "wanda", "--sparsity", "0.5", "--source",
                     str(tmp_path / "calib.txt"), "-o", str(tmp_path / "s")] + calib) == 0
    assert sum("language model only" in r.getMessage() for r in caplog.records) == 2
    plans = json.loads((tmp_path / "p" / "plans.json").read_text())
    assert any(k.endswith("kv_group") for p in plans for k in p["remove"])
    pruned = load_model(str(src))
    for p in plans:
        prune_(pruned, PrunePlan(p["remove"]))
    expected = {"p/model": _logits(pruned), "s/model": _logits(load_model(str(tmp_path / "s" / "model")))}
    for d, out in expected.items():
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"], d
        assert "vision_config" not in cfg and not any("vision" in k for k in load_file(
            str(next((tmp_path / d).glob("*.safetensors")))))
        save_file({"out": out.contiguous()}, str(tmp_path / d / "expected.safetensors"))
    save_file({"ids": IDS}, str(tmp_path / "ids.safetensors"))
    run = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path), *expected], env=ONE_THREAD,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [["Gemma3ForCausalLM", {}, True]] * 2
