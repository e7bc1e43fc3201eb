"""The 'english' source (shear/data/english.py): the standard library's docstrings, split every 20th."""
import pytest

from shear.data.english import EVERY, MIN_CHARS, _documents, load_english
from shear.data.text import DataConfig, load_text_splits


@pytest.fixture(scope="module")
def splits():
    return load_english("train"), load_english("validation")


def test_splits_nonempty_and_disjoint(splits):
    train, val = splits
    assert len(train) > 500 and len(val) > 20
    assert not set(train) & set(val)  # by text: a docstring repeated in the library is not on both sides
    assert all(isinstance(d, str) and len(d) >= MIN_CHARS for d in train + val)
    # every document is in one split (repeats of a held-out text are the only ones dropped from train)
    assert set(train) | set(val) == set(_documents())


def test_validation_is_every_20th_document(splits):
    train, val = splits
    docs = _documents()
    assert EVERY == 20
    assert val == [docs[i] for i in range(len(docs)) if i % 20 == 19]
    assert len(val) == len(docs) // 20
    held = set(val)
    assert train == [d for i, d in enumerate(docs) if i % 20 != 19 and d not in held]


def test_order_is_deterministic(splits):
    train, val = splits
    _documents.cache_clear()  # rebuilt from the sources, not served from the cache
    assert load_english("train") == train
    assert load_english("validation") == val


def test_no_language_reference_text():
    """pydoc_data (the language reference's topics) is an evaluation text: none of it is in the source."""
    from pydoc_data.topics import topics

    joined = "\n".join(_documents())
    long = sorted(k for k, v in topics.items() if len(v) > 2000)
    assert len(long) >= 5
    for key in long[:8]:
        head = topics[key][:200]
        assert head.strip() and head not in joined, key


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_english("test")


def test_data_config_english_through_load_text_splits(splits):
    from shear.data.text import calibration_scope, calibration_texts

    train, val = splits
    ds = load_text_splits(DataConfig(source="english"))
    assert set(ds) == {"train", "validation"}
    assert list(ds["train"]["text"]) == train
    assert list(ds["validation"]["text"]) == val
    other = load_text_splits(DataConfig(source="english", text_field="body", validation_fraction=0.5, seed=3))
    assert list(other["validation"]["body"]) == val  # its own fixed split: fraction and seed do not apply
    # calibration draws from train only
    assert calibration_texts(DataConfig(source="english")) == train
    assert calibration_scope("english") == "train split"


def test_english_is_an_evaluation_text():
    """``shear eval --dataset english`` (and compare's default held-out text) scores the validation split."""
    from shear.data.english import load_english
    from shear.eval.perplexity import load_eval_text

    text = load_eval_text("english", "validation")
    assert text == "\n\n".join(load_english("validation"))
    assert not set(load_english("validation")) & set(load_english("train"))
