"""Which text calibrates a model when none is named (shear/data/calibration.py).

The model's directory is found through ``model.name_or_path`` (set by ``from_pretrained``); a
``shear_recipe.yaml`` there names the text shear trained it on, followed through ``model.path``."""
import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from shear.data.calibration import DEFAULT_SIZE, SHIPPED_CORPUS_SIZE, calibration_for, resolve_calibration
from shear.data.text import DataConfig
from conftest import tiny_llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_POS = 128  # tiny_llama_config's max_position_embeddings


def _save(d, recipe: dict | None = None, **cfg):
    d.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(tiny_llama_config(**cfg)).save_pretrained(d)
    if recipe is not None:
        (d / "shear_recipe.yaml").write_text(yaml.safe_dump(recipe))
    return d


def _load(d):
    m = LlamaForCausalLM.from_pretrained(str(d))
    assert m.name_or_path == str(d)
    return m


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    plain = _save(root / "plain")
    shakes = _save(root / "shakes", {"model": {"path": "reference"}, "data": {"source": "shakespeare"}})
    export = _save(root / "export", {"model": {"path": str(shakes)}, "prune": {"target": {"ratio": 0.2}}})
    gone = _save(root / "gone", {"data": {"source": str(root / "deleted" / "corpus.txt")}})
    return {"plain": plain, "shakes": shakes, "export": export, "gone": gone, "root": root}


@pytest.fixture(scope="module")
def tok(tiny_text):
    from shear.data.tokenizer import train_bpe

    return train_bpe([tiny_text], vocab_size=300)


def test_no_recipe_is_english_at_default_size(dirs):
    c = resolve_calibration(_load(dirs["plain"]))
    assert c.source == "english" and c.data is None
    assert (c.n_samples, c.seq_len) == (128, min(512, MAX_POS)) == (DEFAULT_SIZE[0], MAX_POS)
    assert "general English" in c.what and "importance.source" in c.what
    # a model with more positions keeps 512; a model never saved has no directory to look in
    wide = LlamaForCausalLM(tiny_llama_config(max_position_embeddings=4096))
    c = resolve_calibration(wide, key="sparsify.source")
    assert (c.source, c.n_samples, c.seq_len) == ("english", 128, 512)
    assert "sparsify.source" in c.what


def test_recipe_with_shakespeare(dirs):
    c = resolve_calibration(_load(dirs["shakes"]))
    assert (c.source, c.data) == ("shakespeare", None)
    assert (c.n_samples, c.seq_len) == SHIPPED_CORPUS_SIZE == (32, 128)
    assert "shear_recipe.yaml" in c.what and "shakespeare" in c.what


def test_export_follows_model_path(dirs):
    c = resolve_calibration(_load(dirs["export"]))
    assert (c.source, c.n_samples, c.seq_len) == ("shakespeare", 32, 128)


def test_export_with_a_vanished_data_path_follows_model_path(dirs, tmp_path):
    d = _save(tmp_path / "e2", {"data": {"source": str(tmp_path / "nope.txt")}, "model": {"path": str(dirs["shakes"])}})
    assert resolve_calibration(_load(d)).source == "shakespeare"


def test_explicit_source_and_data_win(dirs):
    m = _load(dirs["shakes"])
    c = resolve_calibration(m, source="english")
    assert (c.source, c.data, c.n_samples, c.seq_len) == ("english", None, 128, MAX_POS)
    assert c.what == "importance.source=english"
    data = DataConfig(source="english", text_field="text")
    c = resolve_calibration(m, data=data)
    assert c.source == "english" and c.data is data and (c.n_samples, c.seq_len) == (128, MAX_POS)
    assert c.what == "data.source=english"
    # source beats data too
    c = resolve_calibration(m, source="shakespeare", data=data)
    assert (c.source, c.data, c.n_samples, c.seq_len) == ("shakespeare", None, 32, 128)
    # a data section naming shakespeare on a model without recipe: the shipped corpus' size
    c = resolve_calibration(_load(dirs["plain"]), data=DataConfig(source="shakespeare"))
    assert (c.source, c.n_samples, c.seq_len) == ("shakespeare", 32, 128)


def test_explicit_sizes_are_kept(dirs):
    c = resolve_calibration(_load(dirs["shakes"]), n_samples=5, seq_len=64)
    assert (c.source, c.n_samples, c.seq_len) == ("shakespeare", 5, 64)
    c = resolve_calibration(_load(dirs["plain"]), n_samples=3)
    assert (c.source, c.n_samples, c.seq_len) == ("english", 3, MAX_POS)
    c = resolve_calibration(_load(dirs["plain"]), seq_len=16)
    assert (c.n_samples, c.seq_len) == (128, 16)


def test_seq_len_past_the_positions_is_refused(dirs, tok):
    m = _load(dirs["plain"])
    with pytest.raises(ValueError, match=r"importance\.seq_len=129 exceeds the model's max_position_embeddings=128"):
        calibration_for(m, tok, seq_len=MAX_POS + 1)
    with pytest.raises(ValueError, match=r"sparsify\.seq_len=4096 .*max_position_embeddings=128"):
        calibration_for(m, tok, source="shakespeare", seq_len=4096, key="sparsify.source")


def test_vanished_local_source_falls_back_to_english(dirs):
    c = resolve_calibration(_load(dirs["gone"]))
    assert (c.source, c.n_samples, c.seq_len) == ("english", 128, MAX_POS)


def test_existing_local_source_is_used(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("some words\n\n" * 50)
    c = resolve_calibration(_load(_save(tmp_path / "m", {"data": {"source": str(text)}})))
    assert (c.source, c.n_samples, c.seq_len) == (str(text), 128, MAX_POS)


def test_calibration_for_draws_the_resolved_text(dirs, tok, monkeypatch):
    import shear.data.english as english
    import shear.data.text as text

    real = text.calibration_ids
    calls = []

    def recording(tokenizer, n_samples, seq_len, seed, source=None, data=None):
        calls.append((n_samples, seq_len, seed, source, data))
        return torch.zeros(n_samples, seq_len, dtype=torch.long)

    # the shipped corpus is megabytes; what is asked of the sampler is what matters here
    monkeypatch.setattr(text, "calibration_ids", recording)
    ids, line = calibration_for(_load(dirs["shakes"]), tok, n_samples=4, seed=2)
    assert calls == [(4, 128, 2, "shakespeare", None)] and ids.shape == (4, 128)
    assert line.startswith("4 x 128 tokens from the text shear trained this model on (shakespeare")
    assert "train split" in line
    data = DataConfig(source="english")
    calibration_for(_load(dirs["shakes"]), tok, data=data, seq_len=16)
    assert calls[-1] == (128, 16, 0, "english", data)

    # a real draw from english, cut down to 40 short documents so that tokenizing it takes no time
    monkeypatch.setattr(text, "calibration_ids", real)
    docs = tuple(f"document {i}: " + "plain english words in a row. " * 12 for i in range(40))
    monkeypatch.setattr(english, "_documents", lambda: docs)
    ids2, line2 = calibration_for(_load(dirs["plain"]), tok, n_samples=3, seq_len=32, seed=2)
    assert ids2.shape == (3, 32)
    assert torch.equal(ids2, real(tok, 3, 32, 2, source="english"))
    assert not torch.equal(ids2, real(tok, 3, 32, 3, source="english"))
    assert "3 x 32 tokens from general English" in line2
