"""Shared fixtures: seeded RNGs, offline hubs, tiny models built in-process from configs."""
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch


#: the environment of a fresh process whose outputs are compared bit for bit with a test's (which runs
#: ``one_thread``): the same thread count, hence the same reduction order
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}

#: a child's check of exports ``ROOT/<case>`` (``ROOT/cases.json``: the case directories) against the logits in
#: their ``expected.safetensors`` on ``ROOT/ids.safetensors``: plain from_pretrained, no missing / unexpected /
#: mismatched keys; prints the failures as JSON
RELOAD_CAUSAL = """
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
root, bad = sys.argv[1], []
ids = load_file(root + "/ids.safetensors")["ids"]
for d in json.load(open(root + "/cases.json")):
    m, info = AutoModelForCausalLM.from_pretrained(root + "/" + d, output_loading_info=True, dtype=torch.float32,
                                                   trust_remote_code=True)
    keys = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    with torch.no_grad():
        got = m.eval()(input_ids=ids).logits
    if keys or not torch.equal(got, load_file(root + "/" + d + "/expected.safetensors")["out"]):
        bad.append((d, keys, "outputs differ"))
print(json.dumps(bad))
"""


def reload_in_child(root, cases: list, ids: torch.Tensor, script: str = RELOAD_CAUSAL):
    """Write ``cases`` and ``ids`` under ``root``, run ``script`` on it in a fresh process at one thread (the
    thread count of the tests that compare bit for bit) and return what it printed last (JSON)."""
    import json
    import subprocess
    import sys

    from safetensors.torch import save_file

    (root / "cases.json").write_text(json.dumps(cases))
    save_file({"ids": ids}, root / "ids.safetensors")
    run = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=300,
                         env=ONE_THREAD)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is faster than two and immune to a busy second core.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=False,
    )
    kw.update(over)
    return LlamaConfig(**kw)


@pytest.fixture
def tiny_llama():
    """A 2-layer GQA Llama (4 query heads, 2 KV heads) in eval mode, fp32."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def tiny_text():
    """30k characters of the embedded corpus (Macbeth)."""
    from shear.data.corpus import load_corpus

    return load_corpus("validation")[0]["text"][:30_000]


def write_tiny_lm(d, text: str, dtype: torch.dtype = torch.float32):
    """Save into ``d`` a tiny Llama (2 layers, max_position_embeddings=128), its weights in ``dtype``, with a
    BPE tokenizer (vocab 300) trained on ``text``; returns ``d``."""
    from transformers import LlamaForCausalLM

    from shear.data.tokenizer import train_bpe

    tok = train_bpe([text], vocab_size=300)
    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                            pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_text):
    """A saved tiny Llama (2 layers, max_position_embeddings=128) with a BPE tokenizer (vocab 300)."""
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), tiny_text)
