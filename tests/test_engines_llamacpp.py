"""A real engine runs attnconv's DeepSeek-V3 output: llama.cpp equals transformers on the same model.

Opt-in (`make test-engines`): needs the tools scripts/build_llamacpp.py builds into $ATTNCONV_CACHE/llama.cpp and
minutes of CPU, so `make test` deselects these tests (marker `engines`) and they skip where the build is absent.
The model is SmolLM2-135M-Instruct where scripts/build_smollm2.py has built it, else a tiny random Llama with
the GPT-2 tokenizer. The yardstick is llama-perplexity: chunks of CTX tokens, the second half of each scored,
reproduced token for token in transformers (attnconv.llamacpp.transformers_perplexity); greedy continuations of
llama-simple must equal transformers' greedy tokens. Exactness here means llama.cpp == transformers on the same
converted model, whatever its quality (that is issue 26's subject).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from attnconv import llamacpp
from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.loading import load_causal_lm, load_tokenizer
from attnconv.testing import build_tiny_model

pytestmark = [pytest.mark.engines,
              pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp is not built: make test-engines")]

CTX, CHUNKS, N_GREEDY = 256, 4, 16
PROMPT = "The history of the city begins"
TOLERANCE = 0.005  # llama.cpp caches K/V (and MLA's latent) in f16


def _smollm2() -> Path | None:
    cache = Path(os.environ.get("ATTNCONV_CACHE") or Path.home() / ".cache" / "attnconv")
    path = cache / "models" / "SmolLM2-135M-Instruct"
    return path if (path / "model.safetensors").exists() else None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    source = _smollm2() or build_tiny_model("llama", root / "tiny", vocab=50257, hidden=64, n_heads=4, n_kv_heads=2,
                                            with_tokenizer=True, max_positions=1024)
    mla = root / "mla"
    # 9 heads x 3 KV heads of 64 (SmolLM2): the setting; the tiny model takes what its heads hold
    kv, rope = (96, 32) if _smollm2() else (24, 8)
    convert(ConvertSettings(source, mla, to="mla", kv_rank=(kv,), rope_dim=rope, engine="llama.cpp", init="svd",
                            phases=False), progress=False)
    text = Path(__file__).resolve().parents[1] / "attnconv" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    sample = root / "sample.txt"  # no trailing newline, no backslash: both tools read it alike
    sample.write_text(text.read_text(encoding="utf-8")[:60_000].replace("\\", "").rstrip(), encoding="utf-8")
    return {"source": source, "mla": mla, "text": sample, "root": root}


@pytest.mark.parametrize("which", ["source", "mla"])
def test_llamacpp_perplexity_equals_transformers(work, which):
    gguf = llamacpp.to_gguf(work[which], work["root"] / f"{which}.gguf")
    ids = llamacpp.tokenize(gguf, work["text"])
    assert len(ids) >= CTX * CHUNKS
    engine = llamacpp.perplexity(gguf, work["text"], CTX, CHUNKS)
    reference = llamacpp.transformers_perplexity(load_causal_lm(work[which], dtype="float32"), ids, CTX, CHUNKS,
                                                 llamacpp.bos(gguf))
    print(f"{which}: llama.cpp {engine:.4f}  transformers {reference:.4f}")
    assert abs(engine / reference - 1) <= TOLERANCE, (engine, reference)


@pytest.mark.parametrize("which", ["source", "mla"])
def test_llamacpp_greedy_tokens_equal_transformers(work, which):
    gguf = llamacpp.to_gguf(work[which], work["root"] / f"{which}.gguf")
    engine = llamacpp.greedy(gguf, PROMPT, N_GREEDY)
    tok = load_tokenizer(work[which])
    model = load_causal_lm(work[which], dtype="float32")
    bos = llamacpp.bos(gguf)
    prompt = torch.tensor([([bos] if bos is not None else []) + tok(PROMPT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=N_GREEDY, do_sample=False, eos_token_id=None)
    reference = tok.decode(out[0], skip_special_tokens=False)
    print(f"{which}: {engine!r}")
    # llama-simple stops early at an end-of-generation token; transformers was told not to
    assert len(engine.strip()) > len(PROMPT) and reference.startswith(engine.strip()), (engine, reference)
