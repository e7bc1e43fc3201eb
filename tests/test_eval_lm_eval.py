"""lm-eval bridge, offline: a multiple-choice task over a local jsonl file, checked against hand scoring."""
import json

import pytest
import torch

pytest.importorskip("lm_eval")

from test_eval_command import make_model_dir  # noqa: E402

ITEMS = [
    {"question": "To be, or not to", "choices": ["be", "sea", "mind"], "label": 0},
    {"question": "that is the", "choices": ["question", "arrows", "fortune"], "label": 0},
    {"question": "the slings and", "choices": ["troubles", "arrows", "nobler"], "label": 1},
    {"question": "or to take arms against a", "choices": ["sea", "mind", "be"], "label": 0},
    {"question": "whether 'tis nobler in the", "choices": ["fortune", "question", "mind"], "label": 2},
    {"question": "of outrageous", "choices": ["fortune", "slings", "sea"], "label": 0},
]

TASK_YAML = """task: shear_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    data = d / "mc.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    (d / "shear_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return d


def _hand_accuracy(model, tok) -> float:
    """Pick the choice with the highest log p(" " + choice | question), lm-eval's default target delimiter."""
    right = 0
    for it in ITEMS:
        ctx = tok(it["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for c in it["choices"]:
            whole = tok(it["question"] + " " + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            x = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == it["label"])
    return right / len(ITEMS)


def test_run_tasks_local_multiple_choice(tmp_path, task_dir):
    from shear.cli.eval import load_model
    from shear.eval.lm_eval_bridge import run_tasks

    d = make_model_dir(tmp_path / "m")
    model, tok = load_model(str(d))
    res = run_tasks(model, tok, ["shear_tiny_mc"], include_path=str(task_dir))
    row = res["tasks"]["shear_tiny_mc"]
    assert 0.0 <= row["acc"] <= 1.0 and row["samples"] == len(ITEMS)
    assert row["acc"] == pytest.approx(_hand_accuracy(model, tok))
    assert res["lm_eval_version"].startswith("0.4")


@pytest.mark.slow
def test_unknown_task_is_a_clear_error(tmp_path, task_dir):
    """Slow: a name missing from include_path makes lm-eval index its ~15k built-in tasks (~30 s)."""
    from shear.eval.lm_eval_bridge import run_tasks

    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_tasks(torch.nn.Linear(1, 1), None, ["no_such_task_xyz"], include_path=str(task_dir))


def test_eval_command_tasks(tmp_path, task_dir, capsys):
    from shear.cli import main

    d = make_model_dir(tmp_path / "m")
    out = tmp_path / "r.json"
    rc = main(["eval", str(d), "--no-speed", "--no-ppl", "--tasks", "shear_tiny_mc", "--include-path", str(task_dir),
               "--limit", "4", "--json", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())["models"]["model"]["tasks"]["shear_tiny_mc"]
    assert row["samples"] == 4 and 0.0 <= row["acc"] <= 1.0
    assert "shear_tiny_mc acc" in capsys.readouterr().out
