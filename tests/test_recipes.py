"""attnconv run: a recipe's stages run exactly as their commands would, every problem is reported before anything
starts, and a rerun skips what is done, resumes what was killed and redoes what changed (with what follows)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.recipes import RecipeError, load_recipe, prepare, run_recipe
from attnconv.reference import REFERENCE_DIR, load_train_run
from attnconv.testing import assert_one_line_error, build_tiny_model
from attnconv.textdata import tinyshakespeare_split
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.checkpoint import KILL_AFTER_ENV
from attnconv.uptrain.settings import UptrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
UPTRAIN = dict(steps=4, seq_len=32, batch_size=2, lr=0.01, warmup=1, save_every=2, quiet=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    build_tiny_model("llama", root / "src", with_tokenizer=True, n_heads=4, n_kv_heads=4, hidden=32)
    (root / "train.txt").write_text(tinyshakespeare_split("train")[:20_000])
    (root / "test.txt").write_text(tinyshakespeare_split("test")[:800])  # a few eval windows suffice
    return root


def stages(env: Path, push: bool = False) -> list[dict]:
    """convert -> uptrain -> eval (-> push), outputs relative to the current folder."""
    out = [
        {"name": "convert", "convert": {"source": str(env / "src"), "out": "out/gqa", "kv_heads": 2}},
        {"name": "uptrain", "uptrain": {"model": "out/gqa", "out": "out/gqa-up", "data": str(env / "train.txt"),
                                        "cache_dir": "{recipe_dir}/cache", **UPTRAIN}},
        {"name": "eval", "eval": {"models": ["out/gqa", "out/gqa-up"], "reference": str(env / "src"),
                                  "data": str(env / "test.txt"), "max_length": 32, "out": "out/report",
                                  "quiet": True}},
    ]
    if push:
        out.append({"name": "push", "push": {"model": "out/gqa-up", "repo_id": "me/tiny-gqa-up"}})
    return out


def write(path: Path, recipe: list[dict] | str) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def actions(run) -> dict[str, str]:
    return {d.stage.name: ("run" if d.run else "skip") for d in run.decisions}


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: what a skipped stage must leave exactly as it was."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def ran(env: Path, tmp_path_factory) -> Path:
    """A folder where the recipe r.yaml of stages(env) has run once (state beside it, outputs in out/); tests that
    start from a finished run take a copy_of it."""
    folder = tmp_path_factory.mktemp("ran")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        run_recipe(write(folder / "r.yaml", stages(env)), echo=lambda line: None)
    return folder


def copy_of(ran: Path, folder: Path) -> Path:
    """The recipe, state and outputs of RAN in FOLDER, as if the recipe had run there; returns the recipe. The
    state names outputs (and the recipe) by absolute path; its fingerprints and markers do not depend on where."""
    shutil.copytree(ran, folder, dirs_exist_ok=True)
    state_file = folder / ".r.attnconv-run.json"
    state = json.loads(state_file.read_text())
    state["recipe"] = str(folder / "r.yaml")
    state["outputs"] = {str(folder / Path(k).relative_to(ran)): v for k, v in state["outputs"].items()}
    state_file.write_text(json.dumps(state))
    return folder / "r.yaml"


def test_every_stage_runs_as_its_command_would_and_a_rerun_skips_them(env, tmp_path, monkeypatch, hub):
    monkeypatch.chdir(tmp_path)
    recipe = write(tmp_path / "r.yaml", stages(env, push=True))
    run = run_recipe(recipe, echo=lambda line: None)
    assert actions(run) == {"convert": "run", "uptrain": "run", "eval": "run", "push": "run"}

    # The same work done by the library functions directly, with the settings spelled out here.
    convert(ConvertSettings(env / "src", tmp_path / "direct", kv_heads=2), progress=False)
    direct = uptrain(UptrainSettings(str(tmp_path / "direct"), str(tmp_path / "direct-up"), data=str(env / "train.txt"),
                                     cache_dir=str(tmp_path / "cache"), **UPTRAIN))
    out = tmp_path / "out"
    assert same_weights(out / "gqa", tmp_path / "direct") and same_weights(out / "gqa-up", tmp_path / "direct-up")
    logged = [json.loads(line)["loss"] for line in (out / "gqa-up" / "train_log.jsonl").read_text().splitlines()]
    assert logged == [r["loss"] for r in direct["log"]] and len(logged) == 4
    report = json.loads((out / "report" / "results.json").read_text())
    assert [m["name"] for m in report["models"]] == [str(env / "src"), "out/gqa", "out/gqa-up"]
    assert report["max_length"] == 32 and report["data"] == str(env / "test.txt")
    pushed = hub.state.files("me/tiny-gqa-up")
    assert pushed["model.safetensors"] == (out / "gqa-up" / "model.safetensors").read_bytes()
    n_commits = len(hub.state.commits)

    before = tree(out)
    again = run_recipe(recipe, echo=lambda line: None)
    assert actions(again) == {"convert": "skip", "uptrain": "skip", "eval": "skip", "push": "skip"}
    assert all("settings and inputs unchanged" in d.reason for d in again.decisions)
    assert tree(out) == before and len(hub.state.commits) == n_commits
    state = json.loads((tmp_path / ".r.attnconv-run.json").read_text())
    assert set(state["outputs"]) == {str(out / "gqa"), str(out / "gqa-up"), str(out / "report"),
                                     "hub:me/tiny-gqa-up@main"}


def test_a_changed_uptrain_key_reruns_uptrain_and_what_follows_but_not_convert(env, ran, tmp_path, monkeypatch,
                                                                               cli):
    monkeypatch.chdir(tmp_path)
    recipe = copy_of(ran, tmp_path)
    recipe_stages = stages(env)
    out = tmp_path / "out"
    converted, trained = tree(out / "gqa"), (out / "gqa-up" / "model.safetensors").read_bytes()

    recipe_stages[1]["uptrain"]["lr"] = 0.02
    write(recipe, recipe_stages)
    code, stdout, err = cli("run", recipe, "--dry-run")
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("r.yaml: 3 stages")
    assert lines[1].split()[:4] == ["1", "convert", "convert", "skip"]
    assert lines[2].split()[:4] == ["2", "uptrain", "uptrain", "run"] and "uptrain.lr 0.01 -> 0.02" in lines[2]
    assert lines[3].split()[:4] == ["3", "eval", "eval", "run"]
    assert "eval.models reads the output of stage 2 (uptrain)" in lines[3]
    assert tree(out / "gqa") == converted and (out / "gqa-up" / "model.safetensors").read_bytes() == trained

    run = run_recipe(recipe, echo=lambda line: None)
    assert actions(run) == {"convert": "skip", "uptrain": "run", "eval": "run"}
    assert tree(out / "gqa") == converted  # not rewritten
    assert (out / "gqa-up" / "model.safetensors").read_bytes() != trained  # replaced: the recipe wrote it
    provenance = json.loads((out / "gqa-up" / "attnconv.json").read_text())
    assert provenance["uptrain"]["settings"]["lr"] == 0.02

    # --from reruns that stage and every later one, even when nothing changed; earlier ones stay done.
    code, stdout, err = cli("run", recipe, "--dry-run", "--from", "uptrain")
    assert code == 0, err
    assert [line.split()[3] for line in stdout.splitlines()[1:]] == ["skip", "run", "run"]
    assert "--from" in stdout.splitlines()[2]
    code, _, err = cli("run", recipe, "--dry-run", "--from", "uptrian")
    assert_one_line_error(code, err, "--from uptrian", "did you mean 'uptrain'?")


def test_a_setting_added_since_a_stage_ran_reruns_nothing_while_at_its_default(env, ran, tmp_path, monkeypatch,
                                                                               cli):
    """A newer attnconv has a setting the recorded run did not: at its default the stages stay done (the run was
    made with that behaviour) and uptrain's own resume check agrees; set to anything else, they run."""
    monkeypatch.chdir(tmp_path)
    recipe = copy_of(ran, tmp_path)
    recipe_stages = stages(env)
    state_file = tmp_path / ".r.attnconv-run.json"
    state = json.loads(state_file.read_text())
    entry = state["outputs"][str((tmp_path / "out" / "gqa-up").resolve())]
    done = entry["done"]
    assert done["settings"].pop("decay_fraction") == 0.2  # as recorded before the setting existed
    body = {"command": "uptrain", "settings": done["settings"], "inputs": done["inputs"]}
    old_print = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    state_text = json.dumps(state).replace(done["fingerprint"], old_print)  # eval recorded it as its input too
    assert state_text.count(old_print) >= 2
    state_file.write_text(state_text)
    code, stdout, err = cli("run", recipe, "--dry-run")
    assert code == 0, err
    assert [line.split()[3] for line in stdout.splitlines()[1:]] == ["skip", "skip", "skip"], stdout
    from attnconv.uptrain.trainer import identity_differences

    assert identity_differences({"lr": 0.01}, {"lr": 0.01, "decay_fraction": 0.2}) == []
    assert identity_differences({"lr": 0.01}, {"lr": 0.01, "decay_fraction": 0.5}) == [
        "decay_fraction: None -> 0.5"]
    recipe_stages[1]["uptrain"]["decay_fraction"] = 0.5
    write(recipe, recipe_stages)
    code, stdout, err = cli("run", recipe, "--dry-run")
    assert code == 0, err
    assert [line.split()[3] for line in stdout.splitlines()[1:]] == ["skip", "run", "run"], stdout
    assert "uptrain.decay_fraction 'unset' -> 0.5" in stdout


def test_sigkill_during_uptrain_then_the_rerun_skips_convert_and_resumes(env, tmp_path, monkeypatch):
    recipe = write(tmp_path / "r.yaml", stages(env)[:2])
    child_env = {**os.environ, KILL_AFTER_ENV: "2", "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "attnconv", "run", str(recipe)], cwd=tmp_path, env=child_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "gqa" / "attnconv.json").is_file() and not (out / "gqa-up").exists()
    assert (out / "gqa-up.uptrain-run" / "checkpoints" / "step-0000002").is_dir()

    monkeypatch.chdir(tmp_path)
    _, _, decisions = prepare(recipe)
    assert (decisions[0].run, decisions[0].reason) == (False, "done: out/gqa; settings and inputs unchanged")
    assert decisions[1].run and decisions[1].reason == "not run yet; resumes from its checkpoint at step 2"
    run_recipe(recipe, echo=lambda line: None)
    record = json.loads((out / "gqa-up" / "attnconv.json").read_text())["uptrain"]
    assert record["results"]["resumed_from"] == 2 and record["results"]["steps"] == 4


def test_an_output_finished_by_a_killed_run_is_adopted_and_a_foreign_one_refused(env, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    recipe = write(tmp_path / "r.yaml", stages(env)[:1])
    run_recipe(recipe, echo=lambda line: None)
    state_file = tmp_path / ".r.attnconv-run.json"
    state = json.loads(state_file.read_text())
    entry = state["outputs"][str(tmp_path / "out" / "gqa")]
    entry["attempt"], entry["done"] = entry["done"], None  # killed between publishing OUT and recording it
    state_file.write_text(json.dumps(state))
    decision = prepare(recipe)[2][0]
    assert not decision.run and "finished by a run killed before it was recorded" in decision.reason
    run_recipe(recipe, echo=lambda line: None)  # records it as done
    entry = json.loads(state_file.read_text())["outputs"][str(tmp_path / "out" / "gqa")]
    assert entry["attempt"] is None and entry["done"]["marker"] is not None

    state_file.unlink()  # now nothing says the recipe wrote out/gqa
    code, _, err = cli("run", recipe)
    assert_one_line_error(code, err, "r.yaml:", "out/gqa already exists and this recipe did not write it",
                          "overwrite: true")
    assert not state_file.exists()


def _bad(env: Path, case: str) -> list[dict] | str:
    s = stages(env)
    conv, up, ev = s[0]["convert"], s[1]["uptrain"], s[2]["eval"]
    if case == "unknown key":
        up["seq_length"] = up.pop("seq_len")
    elif case == "wrong type":
        up["steps"] = "many"
    elif case == "impossible value":
        up["lr"] = -1
    elif case == "impossible conversion":
        conv["kv_heads"] = 3
    elif case == "stage order":
        s[1], s[2] = s[2], s[1]
    elif case == "unknown command":
        s[2] = {"name": "eval", "evaluate": ev}
    elif case == "unknown task":
        ev["tasks"] = ["hellaswagg"]
    elif case == "missing input":
        up["data"] = "./nosuch/train.txt"
    elif case == "later output taken for a hub id":
        ev["models"] = ["out/gqa-2"]
    elif case == "unknown placeholder":
        up["cache_dir"] = "{recipe_dri}/cache"
    elif case == "unquoted placeholder":
        return yaml.safe_dump(s, sort_keys=False).replace(str(env / "src"), "{reference}", 1)
    elif case == "bad yaml":
        return yaml.safe_dump(s, sort_keys=False).replace("kv_heads: 2", "kv_heads: [2")
    elif case == "duplicate key":
        return yaml.safe_dump(s, sort_keys=False).replace("kv_heads: 2", "kv_heads: 2\n    kv_heads: 1")
    return s


@pytest.mark.parametrize("case, needles", [
    ("unknown key", ["stage 2 (uptrain): uptrain.seq_length is not a setting of uptrain; did you mean 'seq_len'?"]),
    ("wrong type", ["uptrain.steps must be an integer >= 1, not 'many'"]),
    ("impossible value", ["uptrain.lr must be a number > 0, not -1.0"]),
    ("impossible conversion", ["stage 1 (convert)", "3"]),
    ("stage order", ["stage 2 (eval): eval.models reads out/gqa-up, which only the later stage 3 (uptrain) writes"]),
    ("unknown command", ["stage 3: 'evaluate' is not a command; did you mean 'eval'?"]),
    ("unknown task", ["unknown task 'hellaswagg' (did you mean hellaswag"]),
    ("missing input", ["uptrain.data ./nosuch/train.txt: no such file or folder here"]),
    ("later output taken for a hub id", ["eval.models out/gqa-2", "did you mean out/gqa, written by stage 1"]),
    ("unknown placeholder", ["unknown placeholder {recipe_dri} (did you mean {recipe_dir}?)"]),
    ("unquoted placeholder", ["in quotes"]),
    ("bad yaml", ["r.yaml:", "not valid YAML"]),
    ("duplicate key", ["r.yaml:6: 'kv_heads' is given twice"]),
])
def test_a_bad_recipe_is_one_line_per_problem_and_nothing_starts(env, tmp_path, monkeypatch, cli, case, needles):
    monkeypatch.chdir(tmp_path)
    recipe = write(tmp_path / "r.yaml", _bad(env, case))
    code, out, err = cli("run", recipe)
    assert_one_line_error(code, err, *needles)
    assert code == 2 and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no output, no state, no lock


def test_every_problem_of_a_recipe_is_listed_at_once(env, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    s = stages(env)
    s[0]["convert"]["kv_heads"] = "two"
    s[1]["uptrain"].update(lr=0, seq_length=8)
    s[2]["eval"]["models"] = ["out/gqa", "out/gqa-upp"]
    code, _, err = cli("run", write(tmp_path / "r.yaml", s), "--dry-run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 4 and all(line.startswith("error: r.yaml:") for line in lines), err
    assert "convert.kv_heads" in lines[0] and "seq_length" in lines[1] and "uptrain.lr" in lines[2]
    assert "out/gqa-upp" in lines[3]
    with pytest.raises(RecipeError) as e:
        prepare(tmp_path / "r.yaml")
    assert len(e.value.problems) == 4 and "\n" not in str(e.value)


def test_the_shipped_recipes_validate_offline(tmp_path, monkeypatch):
    def no_network(sock, address):
        raise AssertionError(f"validating a recipe must not use the network ({address})")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    shipped = sorted(RECIPES.glob("*.yaml"))
    assert {p.name for p in shipped} >= {"demo.yaml", "qwen2.5-0.5b-mqa-distill.yaml", "llama2-7b-gqa8.yaml",
                                          "llama2-7b-mla-mha2mla.yaml", "llama3-8b-mla-transmla.yaml"}
    for path in shipped:
        recipe, _, decisions = prepare(path)
        assert all(d.run for d in decisions), path  # nothing done in an empty folder
        commands = [s.command for s in recipe.stages]
        assert commands[0] == "convert" and "uptrain" in commands and "eval" in commands, path

    # The demo keeps make demo's settings: 5% of the reference's pretraining tokens, its sequence length, a third
    # of its peak learning rate; evaluated on the held-out text with the reference's windows.
    demo = load_recipe(RECIPES / "demo.yaml")
    train = load_train_run(REFERENCE_DIR)
    ups = [s.settings for s in demo.stages if s.command == "uptrain"]
    assert len(ups) == 4  # GQA-2, MQA, and MLA at each one's KV bytes: the same uptraining for all
    for up in ups:
        assert up.tokens == int(train["tokens_seen"] * 0.05) == 71_680
        assert up.seq_len == train["seq_len"] and up.lr == train["lr_schedule"]["peak_lr"] / 3
        assert (up.batch_size, up.warmup, up.schedule, up.dtype, up.seed) == (8, 5, "cosine", "float32", 0)
    mla = [s.settings for s in demo.stages if s.command == "convert" and s.settings.to == "mla"]
    assert [m.kv_rank[0] + 8 * m.rope_dim for m in mla] == [2 * 2 * 32, 1 * 2 * 32]  # attnconv format, 8 KV heads
    ev = demo.stages[-1].settings
    assert ev.reference == str(REFERENCE_DIR) and ev.data == "tinyshakespeare:test"
    assert (ev.max_length, ev.stride, ev.contexts, ev.batches, ev.new_tokens) == (256, 128, (128, 512), (1, 8), 32)
