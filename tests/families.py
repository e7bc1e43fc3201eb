"""Tiny in-process models of every family shear analyzes (2 layers, hidden 64, 4 heads of 16).

``mytestllama`` is a model_type no family lists (a Llama registered under a new name, on import of this
module: a fresh process that reloads its exports imports it too); shear recognises it by structure."""
from __future__ import annotations

import torch
import transformers


class MyTestLlamaConfig(transformers.LlamaConfig):
    model_type = "mytestllama"


class MyTestLlamaForCausalLM(transformers.LlamaForCausalLM):
    config_class = MyTestLlamaConfig


transformers.AutoConfig.register("mytestllama", MyTestLlamaConfig, exist_ok=True)
transformers.AutoModelForCausalLM.register(MyTestLlamaConfig, MyTestLlamaForCausalLM, exist_ok=True)
LOCAL = {c.__name__: c for c in (MyTestLlamaConfig, MyTestLlamaForCausalLM)}

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, use_cache=False)

#: family -> (config class, model class, config kwargs)
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, tie_word_embeddings=False)),
    "mytestllama": ("MyTestLlamaConfig", "MyTestLlamaForCausalLM", dict(COMMON, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, sliding_window=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, tie_word_embeddings=False)),  # q/k norms
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(COMMON, hidden_act="gelu_pytorch_tanh")),  # tied
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, query_pre_attn_scalar=16, sliding_window=4,
                                                         layer_types=["sliding_attention", "full_attention"])),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # q/k norms, sandwich norms, sliding layers
                    dict(COMMON, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(COMMON)),  # post-norms, q/k norms over the projection
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(COMMON, embedding_multiplier=3.0, residual_multiplier=0.5,
                                                            attention_multiplier=0.1, logits_scaling=4.0)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(COMMON, no_rope_layers=[0, 1], pad_token_id=0,
                                                            bos_token_id=0, eos_token_id=0)),  # layer 0 NoPE
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(COMMON, use_qk_norm=True, logit_scale=0.5, pad_token_id=0,
                                                          bos_token_id=0, eos_token_id=0)),  # parallel
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(COMMON, use_bias=True, bos_token_id=0,
                                                                     eos_token_id=0, hidden_act="gelu_pytorch_tanh")),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",  # fused per-head qkv, parallel residual, rotary 25%
                 dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, rotary_pct=0.25, use_parallel_residual=True, use_cache=False,
                      bos_token_id=0, eos_token_id=0)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(vocab_size=128, hidden_size=64, intermediate_size=96,  # parallel
                                                num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5,
                                                max_position_embeddings=128, use_cache=False, bos_token_id=0,
                                                eos_token_id=0)),
    "falcon": ("FalconConfig", "FalconForCausalLM",  # new_decoder_architecture: fused qkv by KV group, parallel
               dict(vocab_size=128, hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_kv_heads=2, new_decoder_architecture=True, max_position_embeddings=128, use_cache=False,
                    bos_token_id=0, eos_token_id=0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict({k: v for k, v in COMMON.items() if k != "head_dim"},
                                                   pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                                                   n_positions=128, use_cache=False)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=128,
                                                word_embed_proj_dim=64, use_cache=False, pad_token_id=1)),
    "bert": ("BertConfig", "BertModel", dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=128)),
}
FAMILIES = tuple(FAMILY_CONFIGS)
GQA = ("llama", "mytestllama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "granite", "smollm3",
       "cohere", "starcoder2", "phi3")
PRENORM = tuple(f for f in FAMILIES if f not in ("bert", "falcon"))
#: the structures of a family whose others are refused (shear.analyze.families.Family.refused)
STRUCTURES = {"falcon": ("mlp", "layers")}


def _cls(name: str):
    return LOCAL.get(name) or getattr(transformers, name)


def family_config(family: str, **over):
    cfg_cls, _, kw = FAMILY_CONFIGS[family]
    return _cls(cfg_cls)(**dict(kw, **over))


def family_model(family: str, std: float = 0.2, **over):
    """A tiny model in eval mode, fp32, every parameter drawn from N(0, std) (norms included, so
    zeroing or slicing a unit can never pass by accident)."""
    model = _cls(FAMILY_CONFIGS[family][1])(family_config(family, **over))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (decoders) or last hidden state (encoders), fp32, no grad."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()
