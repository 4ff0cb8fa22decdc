"""Convert benchmark: a synthetic ~1.5B-parameter Llama (bf16, 2 GB shards) to GQA-4, against a plain copy.

Targets (issue 2): convert wall time <= 1.5x a plain copy of the same files; peak RSS <= largest shard + 1 GB.
Both runs happen here, one after the other, on the same files (page cache warm for both).

    python benchmarks/convert.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=26, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
SHARD_BYTES = 2 << 30


def llama_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def build_checkpoint(folder: Path) -> None:
    """Write the synthetic checkpoint shard by shard (random bf16), as save_pretrained would lay it out."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(**CONFIG, dtype="bfloat16").save_pretrained(folder)
    shards, cur, size = [], [], 0
    for name, shape in llama_tensors(CONFIG):
        nbytes = 2 * int(torch.tensor(shape).prod())
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in entries}
        save_file(tensors, folder / fname, metadata={"format": "pt"})  # as save_pretrained writes them
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def evict(files: list[Path]) -> None:
    """Drop the checkpoint's pages from the page cache, so both runs read it from disk, while the programs
    themselves (cp, python, torch) stay cached: the comparison is about moving the checkpoint's bytes."""
    subprocess.run(["sync"], check=True)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# The peak RSS comes from a small parent of its own: ru_maxrss counts a child's resident set from the fork on,
# before it execs, so a child forked by this process (torch loaded, 2 GiB of random weights just built) would be
# charged this process's size; that made a 0.44 GiB conversion read as 2.4-3.0 GiB.
_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed_child(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process, measured through its own small parent."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-S", "-c", _PEAK, *cmd], check=True, capture_output=True, text=True,
                          env=env)
    return time.perf_counter() - t0, int(done.stdout.split()[-1]) * 1024


def free_page_reporting() -> bool:
    """Whether this is a VM whose balloon hands free memory back to its host (virtio-balloon free page reporting):
    there a page the kernel allocates may first cost a fault in the host, so a copy's speed swings by 2-3x with
    what ran before, for cp and convert alike (docs/benchmarks.md)."""
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if (dev / "device").read_text().strip() == "0x0005":  # balloon
                return (dev / "features").read_text().strip()[5:6] == "1"  # VIRTIO_BALLOON_F_REPORTING
        except OSError:
            continue
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="attnconv-bench-"))
    src = work / "src"
    if not src.exists():
        t0 = time.perf_counter()
        build_checkpoint(src)
        print(f"built {src} in {time.perf_counter() - t0:.0f} s")
    files = sorted(src.glob("*.safetensors"))
    total, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    params = sum(int(torch.tensor(s).prod()) for _, s in llama_tensors(CONFIG))
    print(f"checkpoint: {params / 1e9:.2f} B parameters, {total / 2**30:.2f} GiB in {len(files)} shards "
          f"(largest {largest / 2**30:.2f} GiB)")
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # same warm cache for both
    copies, converts, conv_rss = [], [], 0
    convert_cmd = [sys.executable, "-m", "attnconv", "convert", str(src), str(work / "gqa4"), "--kv-heads", "4"]
    for _ in range(args.repeat):  # alternate the two, take the median of each: this disk is shared and noisy
        for d in ("copy", "gqa4"):
            shutil.rmtree(work / d, ignore_errors=True)
        evict(files)
        copies.append(timed_child(["sh", "-c", f"cp --reflink=never -r '{src}' '{work / 'copy'}' && sync"])[0])
        evict(files)
        # The conversion fsyncs its shards before the rename; the copy gets `sync` to be as durable.
        # A fresh cache each time: the source's sha256 is remembered between conversions, and the first
        # conversion of a checkpoint, which must hash it, is the one compared with the copy.
        cold = {**os.environ, "ATTNCONV_CACHE": tempfile.mkdtemp(dir=work, prefix="cache-")}
        wall, rss = timed_child(convert_cmd, cold)
        converts.append(wall)
        conv_rss = max(conv_rss, rss)
    # Once more with the last run's cache (a second conversion of the same source: no hashing), evicted as well.
    shutil.rmtree(work / "gqa4", ignore_errors=True)
    evict(files)
    repeat_s = timed_child(convert_cmd, cold)[0]
    copy_s, conv_s = statistics.median(copies), statistics.median(converts)
    pairs = sorted(c / p for c, p in zip(converts, copies, strict=True))  # each pair ran back to back
    print("page cache: checkpoint evicted before each run (read from disk by both), programs warm")
    if free_page_reporting():
        print("note: this VM returns free memory to its host (free page reporting): expect copies of either kind to "
              "swing 2-3x between runs; the side-by-side ratios are the figure to read")
    print("runs (s): copy " + ", ".join(f"{t:.1f}" for t in copies) + "; convert " +
          ", ".join(f"{t:.1f}" for t in converts))
    written = sum(f.stat().st_size for f in (work / "gqa4").glob("*.safetensors"))
    rows = {
        "plain copy + sync, median (s)": f"{copy_s:.1f}",
        "convert to GQA-4 incl. start-up, median (s)": f"{conv_s:.1f}",
        "time ratio convert/copy (target <= 1.5)": f"{conv_s / copy_s:.2f}",
        "side-by-side ratios, lowest..highest": f"{pairs[0]:.2f}..{pairs[-1]:.2f}",
        "second conversion of the source (hash remembered) (s)": f"{repeat_s:.1f}",
        "convert peak RSS (GiB)": f"{conv_rss / 2**30:.2f}",
        "largest shard + 1 GiB (GiB, the RSS limit)": f"{(largest + 2**30) / 2**30:.2f}",
        "RSS within limit": str(conv_rss <= largest + 2**30),
        "written (GiB)": f"{written / 2**30:.2f}",
    }
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
