"""The vocabulary trim as a recipe key (``prune.vocab``) and a ``shear prune`` flag (``--vocab-text``): the
ratio counts from the untrimmed model, the teacher gets the same trim (KD on the same ids), and the export
reloads with AutoTokenizer + AutoModel as the trimmed, pruned model."""
import json

import pytest
import torch

from families import family_model
from test_vocab_trim import KEEP_TEXT, _tokenizer


@pytest.fixture
def enc_dir(tmp_path):
    d = tmp_path / "enc"
    torch.manual_seed(0)
    family_model("bert").save_pretrained(d)
    _tokenizer().save_pretrained(d)
    (tmp_path / "text.txt").write_text("\n".join(KEEP_TEXT * 40))
    return d


def test_shear_prune_vocab_text_counts_the_ratio_from_the_dense_model(enc_dir, tmp_path, capsys):
    from transformers import AutoModel, AutoTokenizer

    from shear.cli import main

    p0 = sum(p.numel() for p in family_model("bert").parameters())
    assert main(["prune", str(enc_dir), "--ratio", "0.3", "--vocab-text", str(tmp_path / "text.txt"),
                 "--structures", "mlp", "--allocation", "uniform", "--estimator", "magnitude_l2",
                 "-o", str(tmp_path / "p")]) == 0
    assert "vocabulary: 128 ->" in capsys.readouterr().out
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    out = tmp_path / "p" / "model"
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    n = sum(p.numel() for p in model.parameters())
    assert rep["params_before"] == p0 and n == rep["params_after"] <= int(p0 * 0.7)
    assert rep["vocab"]["tokens_after"] == model.config.vocab_size < 128
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size and tok.convert_tokens_to_ids("cat") < len(tok)


def test_recipe_trims_the_teacher_too_and_refuses_what_cannot_match(enc_dir, tmp_path):
    from shear.config import validate_recipe
    from shear.pipeline import run_recipe

    text = str(tmp_path / "text.txt")
    d = {"model": {"path": str(enc_dir)}, "data": {"source": text, "seq_len": 16, "validation_fraction": 0.2},
         "importance": {"estimator": "magnitude_l2"},
         "prune": {"target": {"ratio": 0.3}, "structures": ["mlp"], "allocation": "uniform", "vocab": {"min_count": 1}},
         "train": {"steps": 2, "batch_size": 2, "eval_batches": 1, "resume": False},
         "distill": {"embedding_weight": 1.0}, "export": {}}
    summary = run_recipe(validate_recipe(d), tmp_path / "run")
    assert summary["prune"]["vocab"]["tokens_after"] < 128
    import copy

    from shear.models import load_model, load_tokenizer
    from shear.prune.config import ImportanceConfig, PruneConfig
    from shear.prune.pipeline import prune_with_vocab

    model, tok = load_model(str(enc_dir)), load_tokenizer(str(enc_dir))
    teacher, dense = copy.deepcopy(model), copy.deepcopy(model)
    _, new_tok, _ = prune_with_vocab(model, tok, PruneConfig(**d["prune"]), ImportanceConfig(estimator="magnitude_l2"),
                                     data=validate_recipe(d).data, teacher=teacher)
    assert teacher.config.vocab_size == model.config.vocab_size == len(new_tok)
    ids = new_tok(KEEP_TEXT, padding=True, return_tensors="pt")
    old = tok(KEEP_TEXT, padding=True, return_tensors="pt")
    with torch.no_grad():  # the trimmed teacher on new ids = the dense model on the original ids
        torch.testing.assert_close(teacher(**ids).last_hidden_state, dense(**old).last_hidden_state)
    with pytest.raises(ValueError, match="prune.vocab"):
        validate_recipe({**d, "distill": {"embedding_weight": 1.0, "teacher": str(enc_dir)}})
    with pytest.raises(ValueError, match="prune.vocab"):
        validate_recipe({**d, "importance": None, "prune": {**d["prune"], "learn": {"steps": 2}}})
    with pytest.raises(ValueError, match="nothing is left"):
        run_recipe(validate_recipe({**d, "prune": {**d["prune"], "target": {"ratio": 0.01}}}), tmp_path / "r2")
