"""Outputs that can never delete what a command did not create: an empty or enclosing OUT is refused, OUT made,
replaced or linked by another program while a command runs is left alone (the finished work is kept under a
printed name), working folders are locked and refused as outputs, and failed runs remove the folders they made."""

from __future__ import annotations

import os
import random

import pytest

from attnconv.errors import AttnconvError
from attnconv.outputs import atomic_output_dir, check_output_dir, output_lock
from attnconv.testing import assert_one_line_error


def test_an_empty_or_enclosing_out_is_refused_and_nothing_is_touched(cli, tiny, tmp_path, monkeypatch):
    root, model = tiny
    here = tmp_path / "work"
    (here / "sub").mkdir(parents=True)
    (here / "keep.txt").write_text("mine")
    monkeypatch.chdir(here / "sub")
    text = root / "text.txt"
    for out, needle in [("", "the output path is empty"), (".", "is the current folder"),
                        ("..", "a folder above the current one"), (str(here), "a folder above the current one"),
                        ("/", "a folder above the current one")]:
        code, _, err = cli("convert", model, out, "--to", "gqa", "--kv-heads", "2", "--overwrite")
        assert_one_line_error(code, err, needle)
        code, _, err = cli("eval", model, "--data", text, "-L", "16", "--out", out, "--overwrite")
        assert_one_line_error(code, err, needle)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    code, _, err = cli("convert", model, "~", "--to", "mqa", "--overwrite")
    assert_one_line_error(code, err, "is the home folder")
    assert sorted(p.name for p in here.iterdir()) == ["keep.txt", "sub"] and not list((here / "sub").iterdir())


def test_a_dangling_link_at_out_is_refused_before_any_work(cli, tiny, tmp_path):
    root, model = tiny
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    code, _, err = cli("convert", model, tmp_path / "out", "--to", "mqa")
    assert_one_line_error(code, err, "is a symbolic link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (tmp_path / "nowhere").exists()


def _raced(out, kind):
    """Make OUT as another program would: a folder with a file, a file, or a link."""
    if kind == "folder":
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    elif kind == "empty folder":
        out.mkdir()
    elif kind == "file":
        out.write_text("theirs")
    else:
        out.symlink_to(out.parent / "elsewhere")


@pytest.mark.parametrize("kind", ["folder", "empty folder", "file", "link"])
def test_out_made_by_another_program_during_a_run_is_kept_and_so_is_the_work(tmp_path, kind):
    out = tmp_path / "out"
    with pytest.raises(AttnconvError, match="appeared at .* the finished output is kept in") as e:
        with atomic_output_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
            _raced(out, kind)
    kept = tmp_path / str(e.value).split("kept in ")[1].split(":")[0].rsplit("/", 1)[1]
    assert (kept / "ours.txt").read_text() == "ours"
    if kind == "folder":
        assert (out / "theirs.txt").read_text() == "theirs"
    elif kind == "file":
        assert out.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == sorted(["out", kept.name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden temporaries left


def test_overwrite_replaces_only_a_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AttnconvError, match="a file or link appeared"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.rmdir()
            out.write_text("theirs")
    assert out.read_text() == "theirs"


def _race_before(monkeypatch, module, name, out):
    """Make a folder at OUT (as another program would) when MODULE.NAME, a step of the command's work, starts."""
    real = getattr(module, name)

    def racing(*args, **kwargs):
        _raced(out, "folder")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, racing)


def test_convert_keeps_a_folder_made_at_out_while_it_runs(cli, tiny, tmp_path, monkeypatch):
    root, model = tiny
    out = tmp_path / "out"
    from attnconv.convert import execute

    _race_before(monkeypatch, execute, "write_plan", out)
    code, _, err = cli("convert", model, out, "--to", "mqa")
    assert_one_line_error(code, err, "a folder appeared at", "the finished output is kept in")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if ".attnconv-finished-" in p.name]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()


def test_uptrain_keeps_its_finished_training_when_out_appears(tiny, tmp_path, monkeypatch):
    from attnconv.uptrain import api
    from attnconv.uptrain.settings import UptrainSettings

    root, model = tiny
    out = tmp_path / "up"
    _race_before(monkeypatch, api, "run_training", out)
    with pytest.raises(AttnconvError, match="kept in"):
        api.uptrain(UptrainSettings(str(model), str(out), data=str(root / "text.txt"), steps=1, seq_len=8,
                                    batch_size=1, quiet=True))
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if ".attnconv-finished-" in p.name]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file() and (kept[0] / "attnconv.json").is_file()


def test_working_folders_are_locked_and_refused_as_outputs(cli, tiny, tmp_path, monkeypatch):
    root, model = tiny
    for out in [tmp_path / "up.uptrain-run", tmp_path / "up.uptrain-run" / "checkpoints",
                tmp_path / ".out.attnconv-tmp-1-abc"]:
        (out).mkdir(parents=True, exist_ok=True)
        code, _, err = cli("convert", model, out, "--to", "mqa", "--overwrite")
        assert_one_line_error(code, err, "another attnconv command's working folder")
    assert not list((tmp_path / "up.uptrain-run" / "checkpoints").iterdir())
    import attnconv.outputs as outputs
    from attnconv.uptrain import api
    from attnconv.uptrain.settings import UptrainSettings

    seen = []

    def as_another_writer(s, accelerator, folder, teacher, out_path, run_dir, will_resume):
        held = dict(outputs._HELD)  # the locks are re-entrant within a process: ask as a second process would
        outputs._HELD.clear()
        try:
            with pytest.raises(AttnconvError, match="is being written by"), output_lock(run_dir):
                pass
        finally:
            outputs._HELD.update(held)
        seen.append(run_dir)
        raise AttnconvError("stop here")

    monkeypatch.setattr(api, "_uptrain", as_another_writer)
    with pytest.raises(AttnconvError, match="stop here"):
        api.uptrain(UptrainSettings(str(model), str(tmp_path / "up2"), data=str(root / "text.txt"), steps=1,
                                    seq_len=8, quiet=True))
    assert seen == [tmp_path / "up2.uptrain-run"]


def test_a_failed_run_removes_the_folders_it_created_and_only_those(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("x")
    out = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out):
            raise RuntimeError("failed")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mine.txt"]
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("done")
    assert (out / "x").read_text() == "done"


def test_fuzzed_out_races_never_delete_what_the_command_did_not_create(tmp_path):
    """Seeded: OUT created, replaced or linked (or left alone) while the output is written, with and without
    --overwrite; every run ends published or with one line keeping the work, and whatever another program put
    at OUT is still there unless --overwrite replaced a folder."""
    rng = random.Random(23)
    for case in range(24):
        root = tmp_path / f"c{case}"
        root.mkdir()
        out = root / "out"
        before = rng.choice(["none", "folder"])
        overwrite = rng.random() < 0.5
        race = rng.choice(["none", "folder", "empty folder", "file", "link", "replace"])
        if before == "folder":
            _raced(out, "folder")
        try:
            check_output_dir(out, overwrite)
        except AttnconvError:
            assert before == "folder" and not overwrite
            continue
        raced = "none"
        try:
            with atomic_output_dir(out, overwrite) as tmp:
                (tmp / "ours.txt").write_text("ours")
                if race == "replace" and out.exists():
                    (out / "theirs.txt").unlink()
                    out.rmdir()
                    out.write_text("theirs")
                    raced = "file"
                elif race not in ("none", "replace") and not os.path.lexists(out):
                    _raced(out, race)
                    raced = race
        except AttnconvError as e:
            assert "\n" not in str(e) and "kept in" in str(e)
            kept = [p for p in root.iterdir() if ".attnconv-finished-" in p.name]
            assert len(kept) == 1 and (kept[0] / "ours.txt").read_text() == "ours"
            assert os.path.lexists(out)
            if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
                assert (out / "theirs.txt").read_text() == "theirs"
            elif out.is_file():
                assert out.read_text() == "theirs"
            continue
        assert (out / "ours.txt").read_text() == "ours"
        assert raced == "none" or (overwrite and raced in ("folder", "empty folder")), (before, overwrite, raced)
        assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_eval_keeps_its_reports_when_out_appears(cli, tiny, tmp_path, monkeypatch):
    from attnconv.eval import api

    root, model = tiny
    out = tmp_path / "report"
    _race_before(monkeypatch, api, "print_table", out)
    code, _, err = cli("eval", model, "--data", root / "text.txt", "-L", "16", "--out", out, "--quiet")
    assert_one_line_error(code, err, "a folder appeared at", "kept in")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if ".attnconv-finished-" in p.name]
    assert len(kept) == 1 and (kept[0] / "results.json").is_file()
