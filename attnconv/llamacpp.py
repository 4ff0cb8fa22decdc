"""llama.cpp as a yardstick: run the tools scripts/build_llamacpp.py builds, and score text the way they do.

Used by the opt-in engine tests (`make test-engines`) and benchmarks/engines.py, never by attnconv's commands.
llama.cpp's sources and binaries live in $ATTNCONV_CACHE/llama.cpp (src/, bin/); nothing of it is committed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

TOOLS = ("llama-perplexity", "llama-simple", "llama-tokenize", "llama-bench")

# convert_hf_to_gguf.py's Llama converter imports sentencepiece before it looks for tokenizer.model (and falls back
# to tokenizer.json when that file is missing): where the package is not installed, the import error would end the
# conversion, so the check for the file comes first.
_CONVERT = """
import runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])  # the script's folder, as when it runs as a script
from conversion import base
load = base.TextModel._create_vocab_sentencepiece
def create_vocab_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return load(self)
base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def root() -> Path:
    cache = Path(os.environ.get("ATTNCONV_CACHE") or Path.home() / ".cache" / "attnconv")
    return cache / "llama.cpp"


def available() -> bool:
    """Whether scripts/build_llamacpp.py has built the tools (the engine tests skip otherwise)."""
    return (root() / "BUILT").exists() and all((root() / "bin" / t).exists() for t in TOOLS)


def _run(args: list, timeout: int = 1800) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{Path(str(args[0])).name} failed ({done.returncode}):\n{tail}")
    return done


def to_gguf(model: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_hf_to_gguf.py (with its vendored gguf-py) on a transformers checkpoint folder."""
    if out.exists():
        return out
    src = root() / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    part = out.with_suffix(".part")
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(src / "convert_hf_to_gguf.py"), str(model),
                           "--outfile", str(part), "--outtype", outtype],
                          capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError("convert_hf_to_gguf.py failed:\n" + "\n".join(done.stderr.strip().splitlines()[-15:]))
    part.rename(out)
    return out


def bos(gguf: Path) -> int | None:
    """The BOS id llama.cpp prepends (and puts at the start of every perplexity chunk), or None when it adds none."""
    sys.path.insert(0, str(root() / "src" / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    fields = GGUFReader(str(gguf)).fields

    def value(key):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]][0].item()

    return int(value("tokenizer.ggml.bos_token_id")) if value("tokenizer.ggml.add_bos_token") else None


def tokenize(gguf: Path, text_file: Path) -> list[int]:
    """The ids llama.cpp makes of a text file (the file must have no trailing newline and no backslash: the
    perplexity tool strips the one and processes escapes of the other differently)."""
    out = _run([root() / "bin" / "llama-tokenize", "-m", gguf, "-f", text_file, "--ids", "--log-disable"]).stdout
    return json.loads(out.strip().splitlines()[-1])


def perplexity(gguf: Path, text_file: Path, ctx: int, chunks: int, threads: int = 2) -> float:
    """llama-perplexity's final estimate: chunks of ctx tokens, the second half of each scored."""
    done = _run([root() / "bin" / "llama-perplexity", "-m", gguf, "-f", text_file, "-c", ctx, "--chunks", chunks,
                 "-b", ctx, "-t", threads])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if m is None:
        raise RuntimeError("llama-perplexity printed no final estimate")
    return float(m.group(1))


def greedy(gguf: Path, prompt: str, n: int) -> str:
    """llama-simple's output: the prompt and n greedily chosen tokens, as text."""
    return _run([root() / "bin" / "llama-simple", "-m", gguf, "-n", n, prompt]).stdout


def transformers_perplexity(model, ids: list[int], ctx: int, chunks: int, bos_id: int | None) -> float:
    """llama-perplexity's score in transformers: each chunk of ctx tokens starts with BOS when the model adds one,
    and the logits at positions ctx/2 .. ctx-2 are scored against the next token (perplexity.cpp)."""
    first, nll, count = ctx // 2, 0.0, 0
    for i in range(chunks):
        chunk = torch.tensor(ids[i * ctx:(i + 1) * ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        with torch.no_grad():
            logits = model(input_ids=chunk[None]).logits[0].double()
        logp = torch.log_softmax(logits[first:ctx - 1], dim=-1)
        nll -= float(logp.gather(1, chunk[first + 1:, None]).sum())
        count += ctx - 1 - first
    return math.exp(nll / count)


def bench(gguf: Path, depths: list[int], n_gen: int = 32, threads: int = 2, reps: int = 2) -> list[dict]:
    """llama-bench's decode speed (tg n_gen) after a context of each depth (-d): its JSON records."""
    done = _run([root() / "bin" / "llama-bench", "-m", gguf, "-p", 0, "-n", n_gen, "-d",
                 ",".join(map(str, depths)), "-t", threads, "-r", reps, "-o", "json"], timeout=3600)
    return json.loads(done.stdout)
