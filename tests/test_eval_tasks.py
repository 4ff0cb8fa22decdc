"""Task scores through lm-evaluation-harness: a multiple-choice task defined locally (YAML + JSONL written here,
read offline) scored on a tiny model; accuracy and acc_norm must equal an independent scoring of every choice's
log-likelihood in plain torch."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from attnconv.errors import AttnconvError
from attnconv.eval import task_names
from attnconv.eval import tasks as tasks_module
from attnconv.eval.tasks import check_tasks, parse_limit, run_tasks, task_rows, tasks_markdown
from attnconv.testing import assert_one_line_error, build_tiny_model

TASK = "attnconv_tiny_mc"
PROMPT = "Question: {q}\nAnswer:"
# Choices of very different lengths, so normalising by length (acc_norm) changes some picks. The model is
# untrained, so no answer is "right": the gold indices are arbitrary, set so that acc and acc_norm of this seed's
# model differ (the test checks that, so a mix-up of the two metrics cannot pass unseen).
QUESTIONS = [
    ("What is two plus two?", ["four", "three hundred and six", "seven", "a fish"], 0),
    ("Which colour is the sky?", ["green as grass", "red", "yellow", "it has none"], 1),
    ("Where do fish live?", ["in trees", "sea", "on the moon above us", "nowhere"], 3),
    ("How many legs has a cat?", ["twelve", "six or seven", "four", "more than anyone could count"], 2),
    ("What do bees make?", ["wax", "bread", "cars", "small wooden chairs for dolls"], 3),
    ("Which is a fruit?", ["a stone", "an apple picked in the autumn", "justice", "iron"], 1),
    ("What is ice made of?", ["sand", "glass", "water that has frozen solid", "light"], 2),
    ("When is it dark?", ["at noon", "in the morning", "dawn", "at night when the sun has set"], 3),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tasks")
    build_tiny_model("llama", root / "model", with_tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    return model, AutoTokenizer.from_pretrained(root / "model")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A task folder as a user would write it: JSONL data and a YAML definition that reads it offline."""
    folder = tmp_path_factory.mktemp("task-def")
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "data.jsonl"}
  cache_dir: {folder / "datasets-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the hub clients' offline switches (read at call time by datasets and huggingface_hub)."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def reference(tiny) -> list[tuple[bool, bool]]:
    """Per question, whether acc and acc_norm pick the gold answer, scored here as the harness defines them:
    log P(" " + choice | prompt) summed over the choice's tokens; acc takes the argmax, acc_norm the argmax per
    character of the choice. Plain torch: the decoder's hidden states, the LM head on the choice positions."""
    model, tokenizer = tiny
    hits = []
    for q, choices, gold in QUESTIONS:
        context = tokenizer.encode(PROMPT.format(q=q))
        lls = []
        for choice in choices:
            whole = tokenizer.encode(PROMPT.format(q=q) + " " + choice)
            with torch.no_grad():
                hidden = model.get_decoder()(torch.tensor([whole])).last_hidden_state[0]  # [seq, hidden]
                logp = model.get_output_embeddings()(hidden[len(context) - 1:-1]).float().log_softmax(-1)
            lls.append(logp.gather(1, torch.tensor(whole[len(context):])[:, None]).sum().item())
        pick = max(range(len(choices)), key=lambda i: lls[i])
        pick_norm = max(range(len(choices)), key=lambda i: lls[i] / len(choices[i]))
        hits.append((pick == gold, pick_norm == gold))
    return hits


def _accuracy(hits: list[tuple[bool, bool]]) -> tuple[float, float]:
    return sum(h for h, _ in hits) / len(hits), sum(h for _, h in hits) / len(hits)


def test_accuracy_matches_an_independent_scoring(tiny, task_dir, reference, capsys, caplog):
    model, tokenizer = tiny
    caplog.set_level(logging.DEBUG)
    pad_before = tokenizer.pad_token
    out = run_tasks(model, tokenizer, [TASK], limit=None, batch_size=3, include_path=str(task_dir), device="cpu")
    acc, acc_norm = _accuracy(reference)
    assert acc != acc_norm, "the data no longer tells acc from acc_norm: change a gold index"
    scores = out["tasks"][TASK]
    assert scores["acc"] == acc and scores["acc_norm"] == acc_norm and scores["samples"] == len(QUESTIONS)
    n = len(QUESTIONS)
    assert scores["acc_stderr"] == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5)  # sample std of the mean
    json.dumps(out, allow_nan=False)  # fits in results.json as it is
    assert tokenizer.pad_token == pad_before  # the harness worked on a copy
    captured = capsys.readouterr()  # nothing but the harness's progress bars: no logs, warnings or prompts
    assert captured.out == "" and not [s for s in re.split(r"[\r\n]", captured.err)
                                       if s.strip() and not re.search(r"\|.*\[.*/s\]$", s)], captured.err
    libraries = ("lm_eval", "transformers", "datasets")
    assert not [r.getMessage() for r in caplog.records if r.name.split(".")[0] in libraries]

    half = run_tasks(model, tokenizer, [TASK], limit=0.5, batch_size=8, include_path=str(task_dir), device=None)
    assert (half["tasks"][TASK]["acc"], half["tasks"][TASK]["acc_norm"]) == _accuracy(reference[:4])
    assert half["tasks"][TASK]["samples"] == 4 and half["limit"] == 0.5

    header, rows = task_rows({"gqa": out, "half": half})
    assert header == ["task", "metric", "n", "gqa", "half"]
    assert rows[0][:2] == [TASK, "acc ↑"] and rows[0][3].startswith(f"{acc:.4f} ± ")
    assert f"| {TASK} | acc_norm ↑ |" in tasks_markdown({"gqa": out})


def test_unknown_task_names_close_matches(tiny, task_dir, tmp_path, monkeypatch):
    model, tokenizer = tiny
    with pytest.raises(AttnconvError, match=r"unknown task 'attnconv_tiny_mq' \(did you mean attnconv_tiny_mc.*"
                                            r"'hellaswagg' \(did you mean hellaswag") as e:
        run_tasks(model, tokenizer, ["attnconv_tiny_mq", "hellaswagg"], limit=2, batch_size=1,
                  include_path=str(task_dir), device=None)
    assert "\n" not in str(e.value)
    with pytest.raises(AttnconvError, match="--task-include .*no such folder"):
        run_tasks(model, tokenizer, [TASK], limit=2, batch_size=1, include_path=str(tmp_path / "nope"), device=None)
    # The same checks before any model is loaded: what `attnconv eval` runs first.
    with pytest.raises(AttnconvError, match=r"unknown task 'hellaswagg' \(did you mean hellaswag"):
        check_tasks(["hellaswagg"], include_path=str(task_dir))
    with pytest.raises(AttnconvError, match="no task given"):
        check_tasks([" "])
    check_tasks([TASK], include_path=str(task_dir))
    # A later process reads the harness's names from the cache written above: its index is not built again.
    real_index = tasks_module._index

    def only_local(include_path, include_defaults):
        assert not include_defaults, "the harness's full task index was built again"
        return real_index(include_path, include_defaults)

    monkeypatch.setattr(tasks_module, "_index", only_local)
    tasks_module._harness_names.cache_clear()
    with pytest.raises(AttnconvError, match=r"unknown task 'hellaswagg' \(did you mean hellaswag"):
        check_tasks(["hellaswagg"])
    check_tasks(["hellaswag", TASK], include_path=str(task_dir))
    monkeypatch.undo()

    broken = tmp_path / "broken"  # a task whose data file is not there: one line, not the datasets traceback
    broken.mkdir()
    (broken / "t.yaml").write_text((task_dir / "tiny_mc.yaml").read_text().replace(str(task_dir / "data.jsonl"),
                                                                                   str(broken / "missing.jsonl")))
    with pytest.raises(AttnconvError, match=f"could not load task.s. {TASK}: ") as e:
        run_tasks(model, tokenizer, [TASK], limit=2, batch_size=1, include_path=str(broken), device=None)
    assert "\n" not in str(e.value)


def test_harness_names_are_cached_and_rebuilt_when_stale_or_damaged(tmp_path, monkeypatch):
    """The names cache on its own, with a stand-in for the (15 s) index build: built once, then read; a damaged
    file, or one written for another harness version or task folder, is rebuilt; an unwritable cache still works."""
    import lm_eval

    monkeypatch.setattr(task_names, "cache_folder", lambda: tmp_path / "cache")
    builds = []

    def build():
        builds.append(1)
        return ["hellaswag", "arc_easy", "mmlu"]

    names = frozenset(build())
    builds.clear()
    assert task_names.harness_task_names(build) == names and len(builds) == 1
    assert task_names.harness_task_names(build) == names and len(builds) == 1  # read back, not built
    file = task_names.cache_file(task_names.harness_identity())
    assert sorted(json.loads(file.read_text())["names"]) == sorted(names)
    for damage in ("{not json", "", json.dumps({"identity": task_names.harness_identity(), "names": "hellaswag"}),
                   json.dumps(["hellaswag"])):
        file.write_text(damage)
        assert task_names.harness_task_names(build) == names
        assert task_names.harness_task_names(build) == names  # rewritten whole: read back next time
    assert len(builds) == 5
    monkeypatch.setattr(lm_eval, "__version__", "0.0.1")  # another harness version installed in the same place
    assert task_names.harness_task_names(build) == names and len(builds) == 6
    assert json.loads(file.read_text())["identity"]["lm_eval"] == "0.0.1"
    identity = task_names.harness_identity()
    monkeypatch.setattr(task_names, "harness_identity", lambda: {**identity, "mtime_ns": identity["mtime_ns"] + 1})
    assert task_names.harness_task_names(build) == names and len(builds) == 7  # the task folder changed
    assert sorted(p.name for p in file.parent.iterdir()) == [file.name, f"{file.name}.lock"]  # no temp files left

    file.unlink()  # two processes at once (threads here: each opens its own lock): one builds, the other reads
    started = threading.Barrier(2)

    def slow_build():
        time.sleep(0.3)
        return build()

    def lookup():
        started.wait()
        return task_names.harness_task_names(slow_build)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: lookup(), range(2))) == [names, names]
    assert len(builds) == 8

    (tmp_path / "blocked").write_text("a file where the cache folder would go")
    monkeypatch.setattr(task_names, "cache_folder", lambda: tmp_path / "blocked" / "cache")
    assert task_names.harness_task_names(build) == names and len(builds) == 9


@pytest.mark.parametrize("text", ["0", "-3", "1.5", "abc", "nan"])
def test_bad_limit_is_one_line(text):
    with pytest.raises(AttnconvError, match="--limit") as e:
        parse_limit(text)
    assert "\n" not in str(e.value)


def test_limit_forms():
    assert parse_limit("100") == 100 and isinstance(parse_limit("100"), int) and parse_limit("0.25") == 0.25
    assert parse_limit("3.0") == 3 and parse_limit(None) is None


def test_missing_harness_names_the_install(tiny, task_dir, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    for call in (lambda: run_tasks(model, tokenizer, [TASK], limit=None, batch_size=1, include_path=str(task_dir),
                                   device=None), lambda: check_tasks([TASK], include_path=str(task_dir))):
        with pytest.raises(AttnconvError, match=r"pip install 'attnconv\[tasks\]'") as e:
            call()
        assert "\n" not in str(e.value)


def test_eval_command_scores_tasks_beside_perplexity(tiny, task_dir, reference, tmp_path, cli):
    """`attnconv eval --tasks` runs the harness on the models it loaded: results.json holds the same accuracy as
    the independent scoring, next to the perplexity; the task flags without --tasks are refused."""
    model, tokenizer = tiny
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    code, out, err = cli("eval", folder, "--data", text, "-L", 32, "--tasks", TASK, "--task-include", task_dir,
                         "--out", tmp_path / "report", "--batch-size", 3)
    assert code == 0, err
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    scores = results["models"][0]["tasks"][TASK]
    assert (scores["acc"], scores["acc_norm"]) == _accuracy(reference)
    assert results["models"][0]["token_perplexity"] > 1 and results["tasks_harness"].startswith("lm-evaluation")
    assert f"| {TASK} | acc ↑ |" in (tmp_path / "report" / "results.md").read_text()
    code, _, err = cli("eval", folder, "--limit", "4")
    assert_one_line_error(code, err, "go with --tasks")
