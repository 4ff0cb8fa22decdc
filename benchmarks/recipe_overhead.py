"""What `attnconv run` adds per stage over calling the commands directly (target: < 1 s per stage).

A four-stage recipe on the embedded reference model (convert to GQA-2, a short uptrain, eval, a dry-run push) is
run three ways, each in a fresh folder, alternating, after one warm-up run (imports, token cache, compiled kernels):
  direct   the four command functions called one after the other in this process (what `attnconv CMD` runs);
  recipe   run_recipe() in this process: the same functions plus parsing, checks, fingerprints and state writes;
  rerun    run_recipe() again on a finished folder: every stage skipped, so all of it is overhead.
The recipe's own accounting (time outside the command functions) is reported too. With --processes, also one
`attnconv run` process against four `attnconv CMD` processes (the recipe saves three interpreter starts).

    python benchmarks/recipe_overhead.py [--repeats 3] [--processes] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from attnconv.convert.command import run_convert
from attnconv.convert.settings import ConvertSettings
from attnconv.eval.command import run_eval
from attnconv.eval.settings import EvalSettings
from attnconv.push.command import run_push
from attnconv.push.settings import PushSettings
from attnconv.recipes import run_recipe
from attnconv.reference import REFERENCE_DIR
from attnconv.textdata import tinyshakespeare_split
from attnconv.uptrain.command import run_uptrain
from attnconv.uptrain.settings import UptrainSettings

STAGES = {
    "convert": dict(source=str(REFERENCE_DIR), out="out/gqa2", kv_heads=2),
    "uptrain": dict(model="out/gqa2", out="out/gqa2-up", data="tinyshakespeare:train", steps=3, seq_len=64,
                    batch_size=2, lr=1e-3, quiet=True),
    "eval": dict(models=["out/gqa2-up"], reference=str(REFERENCE_DIR), data="../heldout.txt", max_length=256,
                 out="out/report", quiet=True),
    "push": dict(model="out/gqa2-up", repo_id="me/gqa2-up", dry_run=True),
}
SETTINGS = {"convert": ConvertSettings, "uptrain": UptrainSettings, "eval": EvalSettings, "push": PushSettings}
FUNCTIONS = {"convert": run_convert, "uptrain": run_uptrain, "eval": run_eval, "push": run_push}


def quiet_echo(line: str) -> None:
    pass


def direct(folder: Path) -> dict[str, float]:
    times = {}
    with _cwd(folder):
        for name, values in STAGES.items():
            settings = SETTINGS[name](**values)
            t0 = time.perf_counter()
            FUNCTIONS[name](settings)
            times[name] = time.perf_counter() - t0
    return times


def recipe(folder: Path) -> tuple[float, dict[str, float], dict[str, float], float]:
    """(wall, per-stage wall as the runner saw it, per-stage time inside the command, checks and plan)."""
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump([{"name": k, k: v} for k, v in STAGES.items()], sort_keys=False))
    with _cwd(folder):
        t0 = time.perf_counter()
        run = run_recipe(path, echo=quiet_echo)
        wall = time.perf_counter() - t0
    stage_wall = {r.decision.stage.name: r.total_s for r in run.results}
    inside = {r.decision.stage.name: r.command_s or 0.0 for r in run.results}
    return wall, stage_wall, inside, run.check_s


@contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def processes(root: Path) -> tuple[dict[str, float], float, float]:
    """Wall time of each `attnconv CMD` process, of one `attnconv run` process, and of its rerun (all skipped)."""
    exe = [sys.executable, "-m", "attnconv"]
    a = root / "proc-direct"
    a.mkdir()
    four = {}
    for name, values in STAGES.items():
        cls = SETTINGS[name]
        args = [name]
        for key, value in values.items():
            label = cls.label(key)
            if label.isupper():
                args += value if isinstance(value, list) else [value]
            elif value is True:
                args.append(label)
            else:
                args += [label, ",".join(value) if isinstance(value, list) else str(value)]
        t0 = time.perf_counter()
        subprocess.run(exe + args, cwd=a, check=True, capture_output=True)
        four[name] = time.perf_counter() - t0
    b = root / "proc-recipe"
    b.mkdir()
    (b / "r.yaml").write_text(yaml.safe_dump([{"name": k, k: v} for k, v in STAGES.items()], sort_keys=False))
    t0 = time.perf_counter()
    subprocess.run(exe + ["run", "r.yaml"], cwd=b, check=True, capture_output=True)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(exe + ["run", "r.yaml"], cwd=b, check=True, capture_output=True)
    return four, one, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", action="store_true", help="also time whole processes")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="recipe-overhead-", dir=args.workdir))
    try:
        (root / "heldout.txt").write_text(tinyshakespeare_split("test")[:20_000], encoding="utf-8")
        warm = root / "warm"
        warm.mkdir()
        recipe(warm)  # imports, token cache, kernels
        n = len(STAGES)
        rows = {"direct": [], "recipe": [], "overhead_accounted": [], "check": [], "rerun": []}
        per_stage_direct = {k: [] for k in STAGES}
        per_stage_recipe = {k: [] for k in STAGES}
        for i in range(args.repeats):
            d, r = root / f"direct-{i}", root / f"recipe-{i}"
            d.mkdir()
            r.mkdir()
            times = direct(d)
            rows["direct"].append(sum(times.values()))
            wall, stage_wall, inside, check = recipe(r)
            rows["recipe"].append(wall)
            rows["overhead_accounted"].append(wall - sum(inside.values()))
            rows["check"].append(check)
            for k in STAGES:
                per_stage_direct[k].append(times[k])
                per_stage_recipe[k].append(stage_wall[k] + check / n)
            t0 = time.perf_counter()
            with _cwd(r):
                run_recipe(r / "r.yaml", echo=quiet_echo)
            rows["rerun"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"{n} stages, median of {args.repeats} (s):")
        print(f"  direct (4 command functions)      {med['direct']:8.2f}")
        print(f"  attnconv run (same, in-process)   {med['recipe']:8.2f}   difference "
              f"{(med['recipe'] - med['direct']) / n:+.3f} s per stage")
        print(f"  runner's own time (outside the commands) {med['overhead_accounted']:.3f} s = "
              f"{med['overhead_accounted'] / n:.3f} s per stage (checks + plan {med['check']:.3f} s)")
        print(f"  rerun, every stage skipped        {med['rerun']:8.3f}   = {med['rerun'] / n:.3f} s per stage")
        for k in STAGES:
            print(f"    {k:<8} direct {statistics.median(per_stage_direct[k]):7.2f}   recipe "
                  f"{statistics.median(per_stage_recipe[k]):7.2f}")
        if args.processes:
            four, one, rerun = processes(root)
            each = ", ".join(f"{k} {v:.1f}" for k, v in four.items())
            print(f"  processes: 4 x `attnconv CMD` {sum(four.values()):.2f} s ({each}); 1 x `attnconv run` "
                  f"{one:.2f} s; its rerun (all skipped) {rerun:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
