"""Dynamic batch loading: weight update by hand, drift toward a lagging domain, exact resume, genre split."""
import json
import math

import pytest
import torch

from shear.data.corpus import HELD_OUT, _works
from shear.data.domains import (GENRES, DomainConfig, DomainSampler, build_domain_datasets, domain_loss, genre_texts,
                                plot_weights, reference_losses, update_weights)


def test_update_formula_by_hand():
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    loss, ref, eta = (torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64),
                      torch.tensor([2.5, 2.2, 1.0], dtype=torch.float64), 2.0)
    z = [math.log(0.5) + 2 * 0.5, math.log(0.3) + 2 * -0.2, math.log(0.2)]
    expect = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    assert update_weights(w, loss, ref, eta).tolist() == pytest.approx(expect, rel=1e-12)
    zc = [math.log(0.5) + 1.0, math.log(0.3), math.log(0.2)]  # gap clamped at 0 (Sheared-LLaMA Alg. 1)
    expect_c = [math.exp(v) / sum(math.exp(u) for u in zc) for v in zc]
    assert update_weights(w, loss, ref, eta, clamp_gap=True).tolist() == pytest.approx(expect_c, rel=1e-12)
    assert update_weights(w, ref, ref, eta).tolist() == pytest.approx(w.tolist())  # no gap: no change


def test_weights_shift_toward_domain_held_high():
    s = DomainSampler([10, 10, 10], ["a", "b", "c"], seed=0)
    ref = {"a": 2.0, "b": 2.0, "c": 2.0}
    for step in range(1, 6):
        s.update(step * 10, {"a": 2.0, "b": 3.0, "c": 2.0}, ref, eta=0.5)  # b held 1 nat above reference
    w = s.weight_dict()
    assert w["b"] > 0.8 and w["a"] == pytest.approx(w["c"]) and sum(w.values()) == pytest.approx(1.0)
    assert [h["step"] for h in s.history] == [0, 10, 20, 30, 40, 50]
    assert all(h["weights"]["b"] < g["weights"]["b"] for h, g in zip(s.history, s.history[1:]))
    counts = [0, 0, 0]
    for step in range(20):
        for i in s.global_batch(step, 16):
            counts[i // 10] += 1
    assert counts[1] > 0.7 * sum(counts)  # batches follow the weights


def _run(sampler, steps, size, updates):
    out = []
    for step in steps:
        out.append(sampler.global_batch(step, size))
        if step in updates:
            sampler.update(step, updates[step], {"a": 1.0, "b": 1.0, "c": 1.0}, eta=1.0)
    return out


def test_sampler_resumes_exactly(tmp_path):
    sizes, names = [7, 5, 11], ["a", "b", "c"]
    updates = {3: {"a": 1.5, "b": 1.0, "c": 1.2}, 7: {"a": 1.0, "b": 2.0, "c": 1.0}}
    full = _run(DomainSampler(sizes, names, seed=3), range(12), 8, updates)
    first = DomainSampler(sizes, names, seed=3)
    head = _run(first, range(5), 8, updates)
    (tmp_path / "s.json").write_text(json.dumps(first.state_dict()))  # checkpoints hold plain data
    second = DomainSampler(sizes, names, seed=3)
    second.load_state_dict(json.loads((tmp_path / "s.json").read_text()))
    tail = _run(second, range(5, 12), 8, updates)
    assert head + tail == full
    assert second.history == _replay_history(sizes, names, updates)
    assert all(0 <= i < sum(sizes) for b in full for i in b) and len({tuple(b) for b in full}) == 12
    with pytest.raises(ValueError, match="seed"):
        DomainSampler(sizes, names, seed=4).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="differ"):
        DomainSampler([7, 5, 12], names, seed=3).load_state_dict(first.state_dict())


def _replay_history(sizes, names, updates):
    s = DomainSampler(sizes, names, seed=3)
    _run(s, range(12), 8, updates)
    return s.history


def test_each_domain_reads_every_item_once_per_epoch():
    s = DomainSampler([6, 4], ["a", "b"], seed=0, weights=[1.0, 1.0])
    seen = {0: [], 1: []}
    for step in range(30):
        for i in s.global_batch(step, 4):
            seen[0 if i < 6 else 1].append(i)
    for d, n, off in ((0, 6, 0), (1, 4, 6)):
        reads = len(seen[d])  # epoch permutations: every item read floor or ceil of reads/n times
        assert {seen[d].count(i) for i in range(off, off + n)} <= {reads // n, -(-reads // n)}


def test_genre_split_covers_all_works_without_overlap():
    works = [w for w, _ in _works()]
    assert len(works) == 42
    listed = [w for g in GENRES.values() for w in g]
    assert sorted(listed) == sorted(works) and len(set(listed)) == len(listed)
    assert set(GENRES) == {"comedies", "histories", "tragedies", "poems"}
    texts = genre_texts()
    n_train = sum(len(tr) for tr, _ in texts.values())
    assert n_train == 42 - len(HELD_OUT)  # the corpus's held-out works stay unseen
    for g, (tr, va) in texts.items():
        assert len(tr) == len(va) > 0 and all(t.strip() for t in va)
        assert not any(v in t for t, v in zip(tr, va))


def test_reference_losses_and_plot(tmp_path, tiny_llama):
    from shear.data.text import BlockDataset

    torch.manual_seed(0)
    val = {"a": BlockDataset(torch.randint(0, 64, (3, 8))), "b": BlockDataset(torch.randint(0, 64, (2, 8)))}
    ref = reference_losses(tiny_llama, val, given={"b": 1.25})
    assert ref["b"] == 1.25 and 0 < ref["a"] < 20
    ids = val["a"].input_ids
    logits = tiny_llama(input_ids=ids).logits[:, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert domain_loss(tiny_llama, val["a"], batch_size=2) == pytest.approx(by_hand, rel=1e-5)
    s = DomainSampler([3, 2], ["a", "b"], seed=0)
    s.update(5, {"a": 3.0, "b": 1.0}, ref, eta=1.0)
    png = plot_weights(s.history, tmp_path / "w.png")
    assert png.stat().st_size > 1000


def test_local_domains_build(tmp_path, tiny_llama):
    from shear.data.tokenizer import train_bpe

    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        for i in range(6):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} document {i} " * 40)
    tok = train_bpe([f"x document {i} y document" for i in range(20)], vocab_size=280)
    domains = [DomainConfig(name=n, source=str(tmp_path / n)) for n in ("x", "y")]
    train, val = build_domain_datasets(domains, tok, seq_len=16, validation_fraction=0.34)
    assert list(train) == ["x", "y"] and all(len(d) > 0 for d in (*train.values(), *val.values()))
    with pytest.raises(ValueError, match="duplicate"):
        build_domain_datasets(domains + domains[:1], tok, seq_len=16)
    with pytest.raises(ValueError, match="unknown genre"):
        build_domain_datasets([DomainConfig(name="z", source="genre:sagas")], tok, seq_len=16)


def _toy_mix():
    from test_train_worker import ToyDataset

    from shear.data.domains import DomainMix
    from shear.data.text import BlockDataset

    g = torch.Generator().manual_seed(0)
    easy, noise = BlockDataset(ToyDataset(32).x), BlockDataset(torch.randint(0, 128, (32, 16), generator=g))
    return DomainMix(train={"easy": easy, "noise": noise},
                     val={"easy": BlockDataset(ToyDataset(4, seed=1).x),
                          "noise": BlockDataset(torch.randint(0, 128, (4, 16), generator=g))},
                     ref_losses={"easy": 1.0, "noise": 1.0}, eta=0.5)


def test_trainer_reweights_and_resumes_exactly(tmp_path):
    from test_train_worker import tiny_model

    from shear.train.config import TrainConfig
    from shear.train.trainer import train

    def run(name, steps, resume=False):
        cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=0, scheduler="constant", log_every=1,
                          eval_every=4, save_every=4, eval_batches=1, seed=2, resume=resume)
        return train(tiny_model(), None, _toy_mix().val["easy"], cfg, tmp_path / name, domains=_toy_mix())

    full = run("full", 12)
    hist = full.metrics["domain_weights"]
    assert [h["step"] for h in hist] == [0, 4, 8, 12]
    assert hist[-1]["weights"]["noise"] > hist[1]["weights"]["noise"] > 0.5  # noise stays far above its reference
    assert (tmp_path / "full" / "domain_weights.png").exists()
    assert "domain_weight/noise" in full.metrics["eval"][-1]
    run("cut", 4)
    resumed = run("cut", 12, resume=True)
    assert resumed.metrics["domain_weights"] == hist
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_recipe_data_domains_key(tmp_path):
    """data.domains in a recipe: typos refused; a shrunk KD recipe trains on two local domains, reference
    losses from the teacher, weights in the train summary and plot."""
    import yaml
    from pydantic import ValidationError
    from test_recipes_smoke import ROOT, shrink

    from shear.config import load_recipe
    from shear.data.text import DataConfig
    from shear.pipeline import run_recipe

    assert DataConfig(domains="genres").domains == "genres"
    with pytest.raises(ValidationError, match="ref_los"):
        DataConfig(domains=[{"name": "a", "source": "x", "ref_los": 1.0}])
    parts = tmp_path / "corpus"
    parts.mkdir()
    from shear.data.corpus import load_corpus

    text = load_corpus("validation")[0]["text"][:60_000]
    for i in range(6):
        (parts / f"part{i}.txt").write_text(text[i * 10_000:(i + 1) * 10_000])
    doms = {}
    for name, lo in (("early", 0), ("late", 3)):
        doms[name] = tmp_path / name
        doms[name].mkdir()
        for i in range(lo, lo + 3):
            (doms[name] / f"{i}.txt").write_text(text[i * 10_000:(i + 1) * 10_000])
    model_dir = _tiny_dir(tmp_path / "tiny", parts)
    path = ROOT / "recipes" / "reference" / "quick-prune-kd.yaml"
    data = yaml.safe_load(path.read_text())
    over = shrink(data, model_dir, parts, tmp_path) + [
        f"data.domains=[{{name: early, source: {doms['early']}}}, {{name: late, source: {doms['late']}, ref_loss: 0.5}}]",
        "data.max_validation_blocks=4", "eval=null", "export=null"]
    summary = run_recipe(load_recipe(path, over), tmp_path / "run")
    hist = summary["train"]["domain_weights"]
    assert [h["step"] for h in hist] == [0, 1, 2, 3] and set(hist[-1]["weights"]) == {"early", "late"}
    assert hist[-1]["weights"]["late"] > 0.5  # its reference (0.5 nats) is far below a tiny model's loss
    assert (tmp_path / "run" / "train" / "domain_weights.png").exists()


def _tiny_dir(d, corpus):
    from test_recipes_smoke import TINY_ARCH
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from shear.data.tokenizer import train_bpe

    tok = train_bpe([p.read_text() for p in sorted(corpus.iterdir())], vocab_size=300)
    cfg = tiny_llama_config(vocab_size=len(tok), **TINY_ARCH, eos_token_id=tok.eos_token_id,
                            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_domains_refused_in_prune_while_tuning():
    from shear.config import validate_recipe
    from shear.train.iterative import run_rounds_from_recipe

    recipe = validate_recipe({"model": {"path": "x"}, "data": {"domains": "genres"}, "prune": {"target": {"ratio": 0.3}},
                              "train": {"steps": 2}})
    with pytest.raises(ValueError, match="data.domains"):
        run_rounds_from_recipe(recipe, None, None, None, None)


def test_weight_floor_mixes_with_uniform():
    """Every weight stays at or above the floor m after an update, the sum stays 1: (1 - K·m)·α + m.
    None = LLM-Shearing's (1 - c)·α + c/K, c = 1e-4."""
    from shear.data.domains import DEFAULT_SMOOTHING, min_weight_of
    from shear.data.text import DataConfig

    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    loss, ref = torch.tensor([40.0, 1.0, 1.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    bare = update_weights(w, loss, ref, eta=1.0)
    assert float(bare[1]) < 1e-15  # no floor: a domain can starve
    floored = update_weights(w, loss, ref, eta=1.0, min_weight=0.05)
    assert floored.tolist() == pytest.approx([(1 - 0.15) * float(b) + 0.05 for b in bare], rel=1e-12)
    assert float(floored.min()) == pytest.approx(0.05) and float(floored.sum()) == pytest.approx(1.0, abs=1e-12)
    assert min_weight_of(None, 4) == DEFAULT_SMOOTHING / 4 == 2.5e-5 and min_weight_of(0.0, 4) == 0.0
    with pytest.raises(ValueError, match="domain_min_weight"):
        min_weight_of(0.5, 2)
    assert DataConfig().domain_min_weight is None and DataConfig().domain_reference == "given_else_teacher"
    s = DomainSampler([10, 10, 10], ["a", "b", "c"], seed=0)
    for step in range(1, 6):
        s.update(step, {"a": 30.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0}, eta=1.0, min_weight=0.02)
    assert min(s.weight_dict().values()) >= 0.02 - 1e-12


def test_reference_source_is_a_named_choice(tmp_path, tiny_llama, caplog):
    import logging

    from shear.data.domains import mix_from_config
    from shear.data.text import BlockDataset, DataConfig
    from shear.data.tokenizer import train_bpe

    val = {"a": BlockDataset(torch.randint(0, 64, (3, 8))), "b": BlockDataset(torch.randint(0, 64, (2, 8)))}
    with pytest.raises(ValueError, match="'given' needs"):
        reference_losses(tiny_llama, val, given={"b": 1.25}, reference="given")
    with pytest.raises(ValueError, match="'teacher' measures"):
        reference_losses(tiny_llama, val, given={"b": 1.25}, reference="teacher")
    with pytest.raises(ValueError, match="domain_reference"):
        reference_losses(tiny_llama, val, reference="scaling")
    measured = reference_losses(tiny_llama, val, reference="teacher")
    assert measured["b"] == pytest.approx(domain_loss(tiny_llama, val["b"]))
    assert reference_losses(None, val, given={"a": 2.0, "b": 1.25}, reference="given") == {"a": 2.0, "b": 1.25}

    for name in ("x", "y"):
        (tmp_path / name).mkdir()
        for i in range(6):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} document {i} " * 40)
    tok = train_bpe([f"x document {i} y document" for i in range(20)], vocab_size=280)
    doms = [{"name": "x", "source": str(tmp_path / "x"), "ref_loss": 2.0}, {"name": "y", "source": str(tmp_path / "y")}]
    data = DataConfig(seq_len=16, validation_fraction=0.34, domains=doms, domain_min_weight=0.01)
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    with caplog.at_level(logging.INFO, logger="shear"):
        mix = mix_from_config(data, tok, teacher=teacher)
    line = [r.getMessage() for r in caplog.records if "reference losses" in r.getMessage()]
    assert len(line) == 1 and "(given_else_teacher)" in line[0] and "x 2.0000 (given)" in line[0] and "(teacher)" in line[0]
    assert mix.ref_losses["x"] == 2.0 and mix.min_weight == 0.01
    with pytest.raises(ValueError, match="'given' needs"):
        mix_from_config(data.model_copy(update={"domain_reference": "given"}), tok, teacher=teacher)
