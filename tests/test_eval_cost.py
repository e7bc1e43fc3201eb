"""Parameter and MAC counts against hand computation, including non-uniform per-layer widths."""
import torch
from torch import nn

from conftest import tiny_llama_config
from shear.eval.cost import attention_widths, count_params, linear_macs_per_token, macs_per_token

# tiny Llama: hidden 64, 4 heads x 16, 2 KV heads x 16, intermediate 96, 2 layers, vocab 128
H, Q, KV, I, V, LAYERS = 64, 64, 32, 96, 128, 2
PER_LAYER_LINEAR = H * Q + 2 * H * KV + Q * H + 3 * H * I
NORMS = (2 * LAYERS + 1) * H


def test_count_params_untied(tiny_llama):
    c = count_params(tiny_llama)
    emb = 2 * V * H  # embed_tokens + untied lm_head
    assert c["embedding"] == emb
    assert c["non_embedding"] == LAYERS * PER_LAYER_LINEAR + NORMS
    assert c["total"] == emb + LAYERS * PER_LAYER_LINEAR + NORMS


def test_count_params_tied_counts_once():
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    c = count_params(m)
    assert c["embedding"] == V * H and c["total"] == V * H + LAYERS * PER_LAYER_LINEAR + NORMS


def test_macs_per_token_hand(tiny_llama):
    m = macs_per_token(tiny_llama, seq_len=100)
    assert m["linear"] == LAYERS * PER_LAYER_LINEAR + H * V
    assert m["attention"] == LAYERS * (Q + Q) * 100  # QK^T over 4 heads x 16 + A.V over 4 heads x 16
    assert m["total"] == m["linear"] + m["attention"] and m["context"] == 100


def test_macs_non_uniform_widths(tiny_llama):
    """Shrink layer 1's MLP to 40 channels and its attention to 2 query heads (1 KV head): counted from modules."""
    layer = tiny_llama.model.layers[1]
    layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(H, 40, bias=False), nn.Linear(H, 40, bias=False)
    layer.mlp.down_proj = nn.Linear(40, H, bias=False)
    at = layer.self_attn
    at.q_proj, at.k_proj, at.v_proj = nn.Linear(H, 32, bias=False), nn.Linear(H, 16, bias=False), nn.Linear(H, 16, bias=False)
    at.o_proj = nn.Linear(32, H, bias=False)
    at.config = tiny_llama_config(num_attention_heads=2, num_key_value_heads=1)
    at.num_key_value_groups = 2
    per = linear_macs_per_token(tiny_llama)
    assert per["model.layers.1.mlp.down_proj"] == 40 * H
    layer1 = H * 32 + 2 * H * 16 + 32 * H + 3 * H * 40
    m = macs_per_token(tiny_llama, seq_len=10)
    assert m["linear"] == PER_LAYER_LINEAR + layer1 + H * V
    assert attention_widths(tiny_llama)[1][1:] == (32, 32)
    assert m["attention"] == (2 * Q + 2 * 32) * 10
