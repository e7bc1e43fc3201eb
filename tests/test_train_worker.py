"""Helpers for the trainer tests, and a script the multi-process / kill tests launch:

    python tests/test_train_worker.py OUT_DIR '{"steps": 8, ...}' [--sleep S] [--distill] [--teacher-layers N]
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


class ToyDataset(torch.utils.data.Dataset):
    """Learnable toy sequences: x[t] = (start + t * step) % vocab; labels -100 on the first `masked` positions."""

    def __init__(self, n: int, seq_len: int = 16, vocab: int = 128, seed: int = 0, masked: int = 0, sleep: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.x = (start + step * torch.arange(seq_len)) % vocab
        self.masked, self.sleep = masked, sleep

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.sleep:
            time.sleep(self.sleep)
        labels = self.x[i].clone()
        labels[: self.masked] = -100
        return {"input_ids": self.x[i], "labels": labels}


def tiny_model(seed: int = 0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
              use_cache=False)
    kw.update(over)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw))


def main(argv=None):
    from safetensors.torch import save_file

    from shear.train.config import DistillConfig, TrainConfig
    from shear.train.trainer import train

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("cfg")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--distill", default=None, help="DistillConfig as JSON")
    ap.add_argument("--learn", action="store_true", help="learned masks (prune.learn) toward MLP 24, 1 KV group, "
                                                         "KD from the unpruned model; the finished model is saved")
    a = ap.parse_args(argv)
    cfg = TrainConfig(**json.loads(a.cfg))
    model = tiny_model(0)
    teacher = tiny_model(1, num_hidden_layers=3) if a.distill else None
    distill = DistillConfig(**json.loads(a.distill)) if a.distill else None
    if a.learn:
        import copy

        from shear.prune.config import PruneConfig
        from shear.shearing.learn import learn_masks

        pcfg = PruneConfig(target={"shape": {"intermediate_size": 24, "num_key_value_heads": 1}},
                           learn={"steps": cfg.steps, "warmup": 2, "mask_lr": 0.3, "lambda_lr": 0.3})
        teacher = copy.deepcopy(model).eval()
        final, report = learn_masks(model, pcfg, cfg, ToyDataset(64, masked=3), ToyDataset(16, seed=1), a.out,
                                    teacher=teacher, distill=DistillConfig(ce_weight=0.5, kd_weight=0.5))
        metrics = {"processes": int(os.environ.get("WORLD_SIZE", "1")), "report": report}
    else:
        res = train(model, ToyDataset(64, masked=3, sleep=a.sleep), ToyDataset(16, seed=1), cfg, a.out,
                    teacher=teacher, distill=distill)
        final, metrics = res.model, res.metrics
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in final.state_dict().items()}, os.path.join(a.out, "final.safetensors"))
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump(metrics, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
