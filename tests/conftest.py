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
