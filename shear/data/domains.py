"""Dynamic batch loading over named data domains (Sheared-LLaMA, Xia et al. 2023, Alg. 1).

    domains = genre_domains()                                   # comedies, histories, tragedies, poems
    train, val = build_domain_datasets(domains, tokenizer, seq_len=256)
    ref = reference_losses(teacher, val)                        # or given per domain
    sampler = DomainSampler([len(d) for d in train.values()], names=list(train), seed=0)
    idx = sampler.global_batch(step, 64)                        # indices into ConcatDataset(train.values())
    ... after each evaluation:  sampler.update(step, {name: val_loss}, ref, eta=1.0)

Weights follow ../shared/FIELD-NOTES.md section 4: α ← softmax(log α + η·(ℓ − ℓ_ref)) after each
evaluation; with ``clamp_gap=True`` the gap is max(ℓ − ℓ_ref, 0) as in the paper's Algorithm 1. Then
α ← (1 − K·m)·α + m over K domains, so no weight falls below the floor m (LLM-Shearing mixes with
uniform the same way: (1 − c)·α + c/K, c = 1e-4, after DoReMi; ``DEFAULT_SMOOTHING``).
Reference losses ℓ_ref (``reference=``): ``given`` (Sheared-LLaMA: per-domain losses predicted by a
scaling law for a model of the target size), ``teacher`` (the unpruned model's own held-out loss) or
``given_else_teacher`` (given where set, else the teacher's). The
sampler's state (weights, per-domain read positions, history) is a plain dict for checkpoints; the
batch drawn at a step is a function of that state and (seed, step), so a resumed run reads exactly
what an uninterrupted one would. Math (``update_weights``, ``domain_counts``) is apart from glue.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .text import BlockDataset, DomainConfig  # noqa: F401  (DomainConfig: the data.domains key lives with DataConfig)

log = logging.getLogger("shear")

#: LLM-Shearing's mix of the updated weights with uniform, (1 - c)·α + c/K (c from DoReMi, Xie et al. 2023)
DEFAULT_SMOOTHING = 1e-4
REFERENCES = ("given_else_teacher", "given", "teacher")

# First Folio classification (1623); Pericles, absent from the Folio, is a late romance like The
# Tempest and The Winter's Tale, which the Folio lists among the comedies. Cymbeline and Troilus and
# Cressida are Folio tragedies. Keys are the corpus's work names (shear.data.corpus).
GENRES: dict[str, tuple[str, ...]] = {
    "comedies": ("alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
                 "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
                 "much_ado_about_nothing", "pericles", "taming_of_the_shrew", "tempest", "twelfth_night",
                 "two_gentlemen_of_verona", "winters_tale"),
    "histories": ("henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
                  "henry_vi_part_3", "henry_viii", "john", "richard_ii", "richard_iii"),
    "tragedies": ("antony_and_cleopatra", "coriolanus", "cymbeline", "hamlet", "julius_caesar", "lear", "macbeth",
                  "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus",
                  "troilus_and_cressida"),
    "poems": ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"),
}


def genre_texts(holdout_fraction: float = 0.05) -> dict[str, tuple[list[str], list[str]]]:
    """The corpus's training works split by genre: {genre: (train texts, held-out texts)}.

    The corpus's own held-out works (``corpus.HELD_OUT``) are left out entirely, so they stay unseen.
    Each remaining work gives its last ``holdout_fraction`` of characters (cut at a blank line when one
    is near) to the genre's held-out text and the rest to its training text.
    """
    from .corpus import load_corpus

    where = {w: g for g, works in GENRES.items() for w in works}
    out: dict[str, tuple[list[str], list[str]]] = {g: ([], []) for g in GENRES}
    for d in load_corpus("train"):
        if d["work"] not in where:
            raise ValueError(f"corpus work {d['work']!r} has no genre in shear.data.domains.GENRES")
        text = d["text"]
        cut = int(len(text) * (1 - holdout_fraction))
        para = text.rfind("\n\n", 0, cut)
        cut = para if para > cut - 5_000 and para > 0 else cut
        out[where[d["work"]]][0].append(text[:cut])
        out[where[d["work"]]][1].append(text[cut:])
    return out


def genre_domains() -> list[DomainConfig]:
    """The four genres of the shipped corpus as domains (reference losses measured from the teacher)."""
    return [DomainConfig(name=g, source=f"genre:{g}") for g in GENRES]


def domain_texts(d: DomainConfig, validation_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) of one domain."""
    if isinstance(d.source, str) and d.source.startswith("genre:"):
        genre = d.source.split(":", 1)[1]
        if genre not in GENRES:
            raise ValueError(f"data.domains.{d.name}.source: unknown genre {genre!r}; expected one of {list(GENRES)}")
        return genre_texts(validation_fraction)[genre]
    from .text import DataConfig, load_text_splits

    splits = load_text_splits(DataConfig(source=d.source, config_name=d.config_name, text_field=d.text_field,
                                         validation_fraction=validation_fraction, seed=seed))
    return list(splits["train"][d.text_field]), list(splits["validation"][d.text_field])


def build_domain_datasets(domains: list[DomainConfig], tokenizer, seq_len: int, validation_fraction: float = 0.05,
                          seed: int = 0) -> tuple[dict[str, "BlockDataset"], dict[str, "BlockDataset"]]:
    """Packed blocks per domain: ({name: train BlockDataset}, {name: held-out BlockDataset}), in domain order."""
    from .text import BlockDataset, pack, token_stream

    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"data.domains: duplicate domain names in {names}")
    train, val = {}, {}
    for d in domains:
        tr, va = domain_texts(d, validation_fraction, seed)
        train[d.name] = BlockDataset(pack(token_stream(tr, tokenizer), seq_len))
        val[d.name] = BlockDataset(pack(token_stream(va, tokenizer), seq_len))
    return train, val


# ---- math -------------------------------------------------------------------------------------------

def min_weight_of(min_weight: float | None, n_domains: int) -> float:
    """The weight floor: ``min_weight``, or LLM-Shearing's c/K (c = ``DEFAULT_SMOOTHING``) when None."""
    m = DEFAULT_SMOOTHING / n_domains if min_weight is None else float(min_weight)
    if not 0.0 <= m * n_domains < 1.0:
        raise ValueError(f"data.domain_min_weight: {m} x {n_domains} domains must be in [0, 1)")
    return m


def update_weights(weights: torch.Tensor, losses: torch.Tensor, ref_losses: torch.Tensor, eta: float,
                   clamp_gap: bool = False, min_weight: float = 0.0) -> torch.Tensor:
    """α' = (1 − K·m)·softmax(log α + η·g) + m, g = ℓ − ℓ_ref (or max(ℓ − ℓ_ref, 0) with ``clamp_gap``),
    m = ``min_weight`` (every weight ≥ m; the sum stays 1). All [K]."""
    gap = losses.double() - ref_losses.double()
    if clamp_gap:
        gap = gap.clamp(min=0)
    alpha = torch.softmax(weights.double().log() + eta * gap, dim=0)
    if min_weight:
        alpha = (1.0 - alpha.numel() * min_weight) * alpha + min_weight
    return alpha


def domain_counts(weights: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """How many of ``size`` samples come from each domain: one multinomial draw from ``weights`` [D] -> LongTensor[D]."""
    picks = torch.multinomial(weights.double(), size, replacement=True, generator=generator)
    return torch.bincount(picks, minlength=weights.numel())


# ---- glue -------------------------------------------------------------------------------------------

class DomainSampler:
    """Global batches mixed over domains by the current weights; seeded, resumable from ``state_dict``.

    At step ``s`` the domain counts are drawn with a generator seeded by (seed, s); each domain then
    reads its next items from its own seeded epoch permutations (a read position per domain). Indices
    are into the concatenation of the domains' datasets in the order given (``offsets``).
    """

    def __init__(self, sizes: list[int], names: list[str], seed: int, weights: list[float] | None = None):
        if len(sizes) != len(names) or not sizes:
            raise ValueError("data.domains: need one size per domain name, at least one domain")
        empty = [n for n, k in zip(names, sizes) if k <= 0]
        if empty:
            raise ValueError(f"data.domains: no training blocks in {empty}")
        self.sizes, self.names, self.seed = list(sizes), list(names), seed
        w = torch.tensor(weights if weights is not None else [1.0] * len(sizes), dtype=torch.float64)
        self.weights = w / w.sum()
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.read = [0] * len(sizes)  # items consumed per domain
        self.history: list[dict] = [{"step": 0, "weights": self.weight_dict()}]
        self._drawn: dict[int, list[int]] = {}  # step -> batch, so repeated calls at a step agree

    def weight_dict(self) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.names, self.weights)}

    def _item(self, d: int, pos: int) -> int:
        epoch, i = divmod(pos, self.sizes[d])
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + d) * 1_000_003 + epoch)
        return int(torch.randperm(self.sizes[d], generator=g)[i])

    def global_batch(self, step: int, size: int) -> list[int]:
        """``size`` indices for ``step``; advances the read positions once per step."""
        if step in self._drawn:
            return self._drawn[step]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        counts = domain_counts(self.weights, size, g).tolist()
        out = []
        for d, c in enumerate(counts):
            out += [self.offsets[d] + self._item(d, self.read[d] + k) for k in range(c)]
            self.read[d] += c
        order = torch.randperm(size, generator=g).tolist()  # domains interleaved over micro-batches
        self._drawn = {step: [out[i] for i in order]}
        return self._drawn[step]

    def update(self, step: int, losses: dict[str, float], ref_losses: dict[str, float], eta: float,
               clamp_gap: bool = False, min_weight: float = 0.0) -> dict[str, float]:
        """Re-weight after an evaluation at ``step``; logs and returns the new weights."""
        missing = [n for n in self.names if n not in losses or n not in ref_losses]
        if missing:
            raise ValueError(f"data.domains: no loss or reference loss for {missing}")
        cur = torch.tensor([losses[n] for n in self.names])
        ref = torch.tensor([ref_losses[n] for n in self.names])
        self.weights = update_weights(self.weights, cur, ref, eta, clamp_gap, min_weight)
        self.history.append({"step": step, "weights": self.weight_dict(),
                             "losses": {n: float(losses[n]) for n in self.names}})
        return self.weight_dict()

    def state_dict(self) -> dict:
        return {"names": list(self.names), "sizes": list(self.sizes), "seed": self.seed,
                "weights": self.weights.tolist(), "read": list(self.read), "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["sizes"] != self.sizes:
            raise ValueError(f"data.domains: checkpoint domains {dict(zip(state['names'], state['sizes']))} differ "
                             f"from this run's {dict(zip(self.names, self.sizes))}")
        if state["seed"] != self.seed:
            raise ValueError(f"data.domains: checkpoint seed {state['seed']} differs from this run's {self.seed}")
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.read = list(state["read"])
        self.history = [dict(h) for h in state["history"]]
        self._drawn = {}


@dataclass
class DomainMix:
    """What ``shear.train.trainer.train(..., domains=)`` needs: per-domain blocks, ℓ_ref and the step size."""

    train: dict[str, "BlockDataset"]
    val: dict[str, "BlockDataset"]
    ref_losses: dict[str, float]
    eta: float = 1.0
    clamp_gap: bool = False
    weights: list[float] | None = None  # initial weights in domain order (None = uniform)
    min_weight: float | None = None  # weight floor after each update (None = LLM-Shearing's 1e-4 / K)

    def concat(self) -> torch.utils.data.ConcatDataset:
        return torch.utils.data.ConcatDataset(list(self.train.values()))

    def sampler(self, seed: int, state: dict | None = None) -> DomainSampler:
        s = DomainSampler([len(d) for d in self.train.values()], list(self.train), seed, self.weights)
        if state is not None:
            s.load_state_dict(state)
        return s

    def evaluate_and_update(self, step: int, loss_of, sampler: DomainSampler) -> dict[str, float]:
        """``loss_of(ds) -> float`` on each held-out domain, then the weight update; flat keys for the eval log."""
        losses = {n: float(loss_of(ds)) for n, ds in self.val.items()}
        weights = sampler.update(step, losses, self.ref_losses, self.eta, self.clamp_gap,
                                 min_weight_of(self.min_weight, len(self.val)))
        return {**{f"domain_loss/{n}": v for n, v in losses.items()},
                **{f"domain_weight/{n}": v for n, v in weights.items()}}


@torch.no_grad()
def domain_loss(model, ds: "BlockDataset", batch_size: int = 8, max_batches: int | None = None) -> float:
    """Token-mean next-token CE (nats) of ``model`` (HF causal LM) over a domain's blocks [N, L]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n = len(ds) if max_batches is None else min(len(ds), max_batches * batch_size)
    for s in range(0, n, batch_size):
        ids = ds.input_ids[s:min(n, s + batch_size)].to(device)
        labels = ds.labels[s:min(n, s + batch_size)].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        tgt = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((tgt != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def reference_losses(teacher, val: dict[str, "BlockDataset"], given: dict[str, float | None] | None = None,
                     batch_size: int = 8, max_batches: int | None = None,
                     reference: str = "given_else_teacher") -> dict[str, float]:
    """ℓ_ref per domain from ``reference``: ``given_else_teacher`` (the given value, else the teacher's
    held-out loss on the domain), ``given`` (every domain's given value: Sheared-LLaMA's scaling-law
    predictions) or ``teacher`` (the teacher's held-out loss on every domain; no value may be given)."""
    if reference not in REFERENCES:
        raise ValueError(f"data.domain_reference: {reference!r} is not one of {list(REFERENCES)}")
    given = {n: v for n, v in (given or {}).items() if v is not None}
    if reference == "given":
        missing = [n for n in val if n not in given]
        if missing:
            raise ValueError(f"data.domain_reference: 'given' needs data.domains[*].ref_loss for {missing} (Sheared-LLaMA: "
                             "the loss a target-size model is predicted to reach, from a per-domain scaling law)")
    if reference == "teacher" and given:
        raise ValueError(f"data.domain_reference: 'teacher' measures every reference, but ref_loss is set for "
                         f"{sorted(given)}; drop it or use given_else_teacher")
    if teacher is None and any(n not in given for n in val):
        raise ValueError(f"data.domains: no ref_loss for {[n for n in val if n not in given]} and no teacher to "
                         "measure it; set data.domains[*].ref_loss or add a distill section (its teacher measures them)")
    return {n: given[n] if n in given else domain_loss(teacher, ds, batch_size, max_batches) for n, ds in val.items()}


def mix_from_config(data, tokenizer, teacher=None) -> DomainMix:
    """A ``DomainMix`` from a recipe's ``data`` section (``data.domains``, ``data.domain_eta``...).

    ``data.domains: genres`` means ``genre_domains()``. Reference losses follow ``data.domain_reference``;
    measured ones come from ``teacher`` on each domain's held-out blocks (at most
    ``data.max_validation_blocks`` of them). One log line names the reference of every domain.
    """
    domains = genre_domains() if data.domains == "genres" else list(data.domains)
    train, val = build_domain_datasets(domains, tokenizer, data.seq_len, data.validation_fraction, data.seed)
    given = {d.name: d.ref_loss for d in domains}
    reference = getattr(data, "domain_reference", "given_else_teacher")
    cap = data.max_validation_blocks
    ref = reference_losses(teacher, val, given, max_batches=None if cap is None else -(-cap // 8), reference=reference)
    floor = min_weight_of(getattr(data, "domain_min_weight", None), len(domains))
    log.info("dynamic batch loading: reference losses (%s): %s; weight floor %.3g", reference,
             ", ".join(f"{n} {v:.4f} ({'given' if given.get(n) is not None else 'teacher'})" for n, v in ref.items()),
             floor)
    return DomainMix(train, val, ref, data.domain_eta, data.domain_clamp_gap, [d.weight for d in domains], floor)


def plot_weights(history: list[dict], path) -> Path:
    """Domain weights over steps (one line per domain) from ``DomainSampler.history``, saved as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in history[0]["weights"]:
        ax.plot(steps, [h["weights"][name] for h in history], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("domain weight")
    ax.set_ylim(0, max(1e-3, max(max(h["weights"].values()) for h in history)) * 1.05)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

