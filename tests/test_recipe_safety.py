"""Hostile recipes and recipe states: YAML bombs fail at once in one line, no stage may write over the recipe or
an enclosing folder, a hand-edited state or checkpoint name is ignored with a warning, an output missing files is
not done, and `link/../x.yaml` is refused instead of running another file. A seeded fuzz of recipe files and stage
graphs asserts one-line errors and that nothing the recipe did not create is deleted."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import yaml

from attnconv.errors import AttnconvError
from attnconv.recipes import load_recipe, prepare, run_recipe
from attnconv.testing import assert_one_line_error, build_tiny_model


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipe-safety")
    return build_tiny_model("llama", root / "src", with_tokenizer=True, n_heads=4, n_kv_heads=4, hidden=32)


def write(path: Path, recipe) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def _laughs(levels: int = 9) -> str:
    lines = ["    a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        this, prev = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"    {this}: &{this} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "- convert:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, needle", [(_laughs(), "more than 100,000 values through its aliases"),
                                          ("[" * 5000, "nested deeper than 50 levels"),
                                          ("{a: " * 3000, "nested deeper than 50 levels"),
                                          ("- convert: {kv_heads: " + "9" * 5000 + "}\n", "thousands of digits")])
def test_yaml_bombs_fail_at_once_in_one_line(cli, tmp_path, text, needle):
    recipe = write(tmp_path / "r.yaml", text)
    code, _, err = cli("run", recipe, "--dry-run")
    assert_one_line_error(code, err, needle)
    t0 = time.perf_counter()
    with pytest.raises(AttnconvError, match=needle):
        load_recipe(recipe)
    assert time.perf_counter() - t0 < 0.25  # unbounded: 95 s and a MemoryError, or a RecursionError


def test_an_oversized_recipe_is_refused_unread(cli, tmp_path):
    recipe = write(tmp_path / "r.yaml", "#" * (1 << 20) + "\n- convert: {}\n")
    code, _, err = cli("run", recipe, "--dry-run")
    assert_one_line_error(code, err, "a recipe is at most 1,048,576")


@pytest.mark.parametrize("value, needle", [("+-5", "not '+-5'"), ("²", "not '²'"), ("9" * 4000, "hex digits")])
def test_bad_integers_in_a_recipe_are_one_line(cli, src, tmp_path, value, needle):
    recipe = write(tmp_path / "r.yaml", f"- convert:\n    source: {src}\n    out: o\n    to: mla\n"
                                        f"    kv_rank: {json.dumps(value) if value[0] != '9' else value}\n")
    code, _, err = cli("run", recipe, "--dry-run")
    assert_one_line_error(code, err, "convert.kv_rank must be an integer >= 1", needle)


@pytest.mark.parametrize("out", ["{recipe_dir}", "{recipe_dir}/..", "", ".", "{recipe_dir}/r.yaml"])
def test_no_stage_may_write_over_the_recipe_or_an_enclosing_folder(cli, src, tmp_path, monkeypatch, out):
    folder = tmp_path / "recipes"
    folder.mkdir()
    monkeypatch.chdir(folder)
    recipe = write(folder / "r.yaml", [{"convert": {"source": str(src), "out": out, "kv_heads": 2,
                                                    "overwrite": True}}])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args in (["--dry-run"], []):
        code, _, err = cli("run", recipe, *args)
        assert code == 2 and "Traceback" not in err, err
        assert any(n in err for n in ("holds the recipe itself", "is the current folder", "a folder above",
                                      "the output path is empty")), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_link_then_dotdot_is_refused_not_run_as_another_file(cli, tmp_path, monkeypatch):
    (tmp_path / "real" / "deep").mkdir(parents=True)
    write(tmp_path / "real" / "x.yaml", "- eval: {models: [a]}\n")
    write(tmp_path / "x.yaml", "- eval: {models: [b]}\n")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("run", "link/../x.yaml", "--dry-run")
    assert_one_line_error(code, err, "give the recipe's path without '..' after a link")
    assert load_recipe(tmp_path / "real" / "deep" / ".." / "x.yaml").path == tmp_path / "real" / "x.yaml"


def test_a_hand_edited_state_or_checkpoint_name_is_ignored_with_a_warning(src, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = write(tmp_path / "r.yaml", [{"convert": {"source": str(src), "out": "out/gqa", "kv_heads": 2}},
                                         {"uptrain": {"model": "out/gqa", "out": "out/up", "data": "tinyshakespeare",
                                                      "steps": 1}}])
    state = tmp_path / ".r.attnconv-run.json"
    state.write_text(json.dumps({"format": 1, "recipe": str(recipe), "files": {"a": "zzz"},
                                 "outputs": {str(tmp_path / "out" / "gqa"): {"done": "zzz"},
                                             str(tmp_path / "out" / "up"): {"attempt": {"fingerprint": 5}}}}))
    (tmp_path / "out" / "up.uptrain-run" / "checkpoints" / "step-abc").mkdir(parents=True)
    (tmp_path / "out" / "up.uptrain-run" / "checkpoints" / "step-abc" / "state.json").write_text("{}")
    _, _, decisions = prepare(recipe)
    assert [d.run for d in decisions] == [True, True]
    err = capsys.readouterr().err
    assert err.count("is damaged and was ignored") == 2, err


def test_an_output_missing_files_is_not_done(src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write(tmp_path / "r.yaml", [{"convert": {"source": str(src), "out": "out/gqa", "kv_heads": 2}}])
    run_recipe(recipe, echo=lambda line: None)
    assert not run_recipe(recipe, echo=lambda line: None).decisions[0].run
    (tmp_path / "out" / "gqa" / "model.safetensors").unlink()
    _, _, decisions = prepare(recipe)
    assert decisions[0].run and "incomplete" in decisions[0].reason
    run_recipe(recipe, echo=lambda line: None)
    assert (tmp_path / "out" / "gqa" / "model.safetensors").is_file()


def _hostile_recipe(rng: random.Random, src: Path, root: Path) -> str:
    """A recipe file from a few hostile pieces: aliases, deep nesting, odd outputs, cycles, duplicates."""
    outs = ["out/a", "out/a/b", "{recipe_dir}", "", ".", "..", "out/a.uptrain-run", "/", "out/./a", "~"]
    stages = []
    for i in range(rng.randrange(1, 4)):
        kind = rng.choice(["convert", "uptrain", "eval"])
        out = rng.choice(outs)
        if kind == "convert":
            body = {"source": rng.choice([str(src), "out/a", "{recipe_dir}"]), "out": out, "kv_heads": 2}
        elif kind == "uptrain":
            body = {"model": rng.choice(["out/a", str(src)]), "out": out, "data": "tinyshakespeare", "steps": 1}
        else:
            body = {"models": [rng.choice(["out/a", str(src)])], "out": out}
        if rng.random() < 0.5:
            body["overwrite"] = True
        stages.append({"name": rng.choice([f"s{i}", "same"]), kind: body})
    text = yaml.safe_dump(stages, sort_keys=False)
    mutation = rng.randrange(5)
    if mutation == 0:
        text = _laughs(rng.randrange(3, 10))
    elif mutation == 1:
        text = rng.choice(["[", "{a: ", "- "]) * rng.randrange(40, 4000)
    elif mutation == 2:
        text = text.replace("kv_heads: 2", rng.choice(["kv_heads: +-5", "kv_heads: ²", "kv_heads: " + "7" * 4400,
                                                       "kv_heads: *nope", "kv_heads: !!python/object:os.system x"]))
    return text


def test_fuzzed_recipes_end_in_one_line_and_never_delete_what_they_did_not_create(src, tmp_path, monkeypatch):
    rng = random.Random(2323)
    outcomes = {"refused": 0, "ran": 0}
    for case in range(30):
        root = tmp_path / f"c{case}"
        (root / "work").mkdir(parents=True)
        (root / "work" / "keep.txt").write_text("mine")
        monkeypatch.chdir(root / "work")
        recipe = write(root / "work" / "r.yaml", _hostile_recipe(rng, src, root))
        before = {p for p in root.rglob("*")}
        t0 = time.perf_counter()
        try:
            prepare(recipe)  # checks only: the refusals a run would give before any stage starts
        except AttnconvError as e:
            assert "\n" not in str(e) and "Traceback" not in str(e)
            outcomes["refused"] += 1
        else:
            outcomes["ran"] += 1
        assert time.perf_counter() - t0 < 1.0
        assert before <= {p for p in root.rglob("*")}, case  # nothing that existed is gone
        assert (root / "work" / "keep.txt").read_text() == "mine"
    assert outcomes["refused"] > 10, outcomes
