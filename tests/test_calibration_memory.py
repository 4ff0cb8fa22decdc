"""Calibration memory (one layer at a time, measured in a fresh process) and the reference model end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnconv.calibration import CovarianceCollector, calibrate_layers, calibration_tokens, estimate_memory
from attnconv.loading import load_tokenizer
from attnconv.reference import REFERENCE_DIR
from attnconv.tensor_io import read_safetensors_header
from attnconv.testing import build_tiny_model

_MEASURE = r"""
import json, sys
from pathlib import Path
import torch
from attnconv.calibration import CovarianceCollector, calibrate_layers

big, warm, n_seq, seq_len, batch_tokens = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
torch.set_num_threads(1)  # the test machine is shared; memory does not depend on it
tokens = torch.randint(0, 256, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
# Warm-up on a 2-layer model of the same family: imports, kernels and thread pools come before the measurement.
for _ in calibrate_layers(warm, tokens, lambda i: [CovarianceCollector()], batch_tokens=batch_tokens,
                          progress=False):
    pass

def status(key):
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) * 1024

try:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, as attnconv.eval PeakMemory does
except OSError:
    print(json.dumps({"skip": "/proc/self/clear_refs is not writable"}))
    sys.exit(0)
base = status("VmRSS")
kept = [c for _, c in calibrate_layers(big, tokens, lambda i: [CovarianceCollector()], batch_tokens=batch_tokens,
                                       progress=False)]
print(json.dumps({"peak_growth": status("VmHWM") - base, "count": kept[-1][0].count}))
"""


@pytest.mark.slow
def test_peak_memory_is_one_layer_not_the_model(tmp_path):
    """A 10-layer checkpoint (hidden 768, 237 MB in float32) calibrated in a fresh process: the resident set
    grows by one layer + the hidden states + the covariances kept + a stated margin, far below the model."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to measure peak RSS")
    n_layers, hidden = 10, 768
    big = build_tiny_model("llama", tmp_path / "big", hidden=hidden, n_heads=12, layers=n_layers, vocab=256)
    warm = build_tiny_model("llama", tmp_path / "warm", hidden=64, layers=2, vocab=256)
    n_seq, seq_len, batch_tokens = 2, 64, 64
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(big), str(warm), str(n_seq), str(seq_len),
                          str(batch_tokens)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["count"] == n_seq * seq_len

    metas = read_safetensors_header(big / "model.safetensors").values()
    whole = sum(m.nbytes for m in metas)
    layer = sum(m.nbytes for m in metas if m.name.startswith("model.layers.0."))
    states = n_seq * seq_len * hidden * 4
    covariances = n_layers * CovarianceCollector.nbytes(hidden)  # the consumer keeps every layer's
    # Margin: one batch's activations (64 tokens: ~3 MiB) plus BLAS buffers and allocator slack.
    margin = 16 << 20
    bound = layer + states + covariances + margin
    assert whole > 9 * layer and bound < whole / 2
    assert result["peak_growth"] < bound, (result, layer, bound)
    # The --dry-run estimate does not promise less than is used.
    config = json.loads((big / "config.json").read_text())
    estimate = estimate_memory(config, n_seq * seq_len, covariances, seq_len=seq_len, batch_tokens=batch_tokens)
    assert result["peak_growth"] <= estimate < 2 * result["peak_growth"], (result, estimate)


def test_reference_model_calibrates_end_to_end():
    """4096 tokens of Tiny Shakespeare through the shipped reference model. Layer 0's statistics equal those of
    its input norm applied to the embeddings (later layers: test_calibration.py against the loaded model)."""
    from transformers import AutoModelForCausalLM

    tokens = calibration_tokens("tinyshakespeare:train", load_tokenizer(REFERENCE_DIR), 4096, 256)
    assert tokens.shape == (16, 256)
    stats = dict(calibrate_layers(REFERENCE_DIR, tokens, lambda i: [CovarianceCollector()], progress=False))
    assert sorted(stats) == list(range(6))
    for (cov,) in stats.values():
        assert cov.count == 4096
        eig = torch.linalg.eigvalsh(cov.covariance())
        assert eig.min() > -1e-9 * eig.max() and eig.max() > 0  # a covariance: positive semi-definite

    model = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens)).reshape(-1, 256).double()
    torch.testing.assert_close(stats[0][0].second_moment(), x.T @ x / len(x), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats[0][0].mean(), x.mean(0), rtol=1e-6, atol=1e-9)
