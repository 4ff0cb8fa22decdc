"""What a conversion reads and how its output is laid out, known from config.json and shard headers alone.

Torch-free on purpose for GQA/MQA: `convert` starts copying the tensors it leaves unchanged while the main thread
is still importing torch, and the plan (which needs torch to infer the converted shapes) follows this layout. A
layout converted a layer at a time (MLA: mla/*_target.py; calibrated GQA methods: gqa/target.py) imports torch: its
conversion is dominated by calibration and the per-layer solves anyway.
Within each output shard the unchanged tensors come first, in source order, then the converted ones (layers
in layer order, the order calibration computes them in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attnconv.convert.settings import ConvertSettings
from attnconv.convert.target import LayerTarget, attention_key
from attnconv.dtypes import canonical_dtype
from attnconv.errors import AttnconvError
from attnconv.families import ROPE_FAMILIES, Family, check_kv_heads, source_family
from attnconv.loading import check_layers, read_config, resolve_source, weight_files
from attnconv.model_shape import HeadLayout
from attnconv.tensor_io import ST_DTYPES, CheckpointReader, TensorMeta, header_reserve, st_dtype

# Files never copied: weights (rewritten), config (rewritten), the source's card and any remote code.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".py")
_SKIP_NAMES = {"config.json", "attnconv.json", "README.md", ".gitattributes", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"}
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old GPT-2 checkpoints


@dataclass(frozen=True)
class Entry:
    """One output tensor: where it comes from and what happens to it (its shape, when known before any work)."""

    output: str
    meta: TensorMeta  # the (first) source tensor
    op: str  # a name in attnconv/convert/ops.py
    out_dtype: str  # safetensors dtype name
    raw: bool  # copied as bytes: unchanged, same dtype, from a safetensors file
    more: tuple[TensorMeta, ...] = ()  # further source tensors (all attention tensors of an MLA layer)
    shape: tuple[int, ...] | None = None  # known output shape; None: the op's result on meta tensors tells
    layer: int | None = None  # the layer whose computation this output is part of
    key: str | None = None  # which output of that computation (a name relative to the attention module)

    @property
    def inputs(self) -> tuple[TensorMeta, ...]:
        return (self.meta, *self.more)

    @property
    def reserve_meta(self) -> TensorMeta:
        """What bounds this entry's header entry: the source tensor, or the declared output."""
        if self.shape is None:
            return self.meta
        return TensorMeta(self.output, self.meta.file, "F32", self.shape)


@dataclass
class Source:
    """A checked conversion request: the source, its heads before and after, and the output layout."""

    settings: ConvertSettings
    path: Path
    family: Family
    layout_in: HeadLayout
    layout_out: HeadLayout
    dtype: str | None  # output dtype name ('bfloat16', ...) or None to keep the source's
    reader: CheckpointReader
    config_out: dict
    files_to_copy: list[str]
    config_in: dict = field(default_factory=dict)
    shards: dict[str, list[Entry]] = field(default_factory=dict)

    target: LayerTarget | None = None  # converts a layer at a time (convert/target.py)

    def reserve(self, shard: str) -> int:
        """Header bytes to reserve in an output shard (names may gain a 12-character prefix)."""
        return header_reserve([e.reserve_meta for e in self.shards[shard]])


def raw_runs(entries: list[Entry]) -> list[list[Entry]]:
    """The byte-copied entries, grouped where their source bytes follow each other (one kernel copy each)."""
    runs: list[list[Entry]] = []
    for e in entries:
        if not e.raw:
            continue
        last = runs[-1][-1].meta if runs else None
        if last is not None and last.file == e.meta.file and last.end == e.meta.start:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _output_name(family: Family, name: str) -> str | None:
    if family.target_model_type == "gpt_bigcode":
        if name.endswith(_GPT2_BUFFERS):
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            return f"transformer.{name}"  # hub GPT-2 checkpoints omit the base-model prefix
    return name


def _config_out(family: Family, config: dict, kv_heads: int, dtype: str | None) -> dict:
    if family.target_model_type == "gpt_bigcode":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(flag):
                raise AttnconvError(f"this GPT-2 checkpoint sets {flag}, which GPTBigCode cannot express")
        keep = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
                "scale_attn_weights", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"]
        out = {k: config[k] for k in keep if k in config}
        out.update(model_type="gpt_bigcode", architectures=["GPTBigCodeForCausalLM"], multi_query=kv_heads == 1,
                   attention_softmax_in_fp32=True, scale_attention_softmax_in_fp32=True, tie_word_embeddings=True)
        out.setdefault("activation_function", "gelu_new")
    else:
        out = dict(config)
        out[family.n_kv_key] = kv_heads
    if dtype is not None:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    return out


def _entry(family: Family, reader: CheckpointReader, meta: TensorMeta, dtype: str | None) -> Entry | None:
    out_name = _output_name(family, meta.name)
    if out_name is None:
        return None
    floating = meta.st_dtype.startswith(("F", "BF"))
    out_dtype = st_dtype(dtype) if dtype is not None and floating else meta.st_dtype
    op = family.op_for(meta.name)
    raw = op == "copy" and reader.format == "safetensors" and out_dtype == meta.st_dtype
    return Entry(out_name, meta, op, out_dtype, raw)


def _layer_layout(src: Source, files: list[Path], dtype: str | None) -> Source:
    """Entries of a conversion computed a layer at a time (MLA, calibrated GQA: src.target): each layer's
    attention tensors become the target's outputs (one computation per layer, written to the shard of the
    layer's first attention tensor), every other tensor what the target makes of it."""
    target, reader = src.target, src.reader
    shard_of = {file: "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                for i, file in enumerate(files)}
    ordered = sorted(reader.tensors.values(), key=lambda m: (files.index(m.file), m.start))
    kept: dict[str, list[Entry]] = {shard: [] for shard in shard_of.values()}
    layers: dict[int, tuple[str, str, dict[str, TensorMeta]]] = {}  # layer -> (shard, prefix, {key: meta})
    extra: dict[int, dict[str, TensorMeta]] = {}  # tensors outside attention a layer's conversion also reads
    for m in ordered:
        where = attention_key(m.name)
        if where is not None:  # a layer's tensors may straddle two shards: its outputs go to the first
            layers.setdefault(where[0], (shard_of[m.file], where[1], {}))[2][where[2]] = m
            continue
        if (hit := target.extra_layer_input(m.name)) is not None:
            extra.setdefault(hit[0], {})[hit[1]] = m
        for out, shape, kind in target.other_outputs(m.name, m.shape):
            floating = m.st_dtype.startswith(("F", "BF"))
            out_dtype = st_dtype(dtype) if dtype is not None and floating else m.st_dtype
            raw = kind == "copy" and reader.format == "safetensors" and out_dtype == m.st_dtype
            kept[shard_of[m.file]].append(Entry(out, m, "copy" if kind == "copy" else "deepseek_tensor", out_dtype,
                                                raw, shape=None if raw else shape, key=kind))
    if not layers:
        raise AttnconvError(f"no attention tensors (….layers.N.self_attn.*) found in {src.path}; the weights do not "
                            f"match a {src.family.name} checkpoint")
    converted: dict[str, list[Entry]] = {shard: [] for shard in shard_of.values()}
    for layer, (shard, prefix, inputs) in sorted(layers.items()):
        names = sorted(inputs) + sorted(extra.get(layer, {}))  # attention tensors first: they set dtype and shard
        inputs = {**inputs, **extra.get(layer, {})}
        first = inputs[names[0]]
        out_dtype = st_dtype(dtype) if dtype is not None else first.st_dtype
        shapes = {k: tuple(m.shape) for k, m in inputs.items()}
        _check_layer_shapes(target, prefix, inputs, src.layout_in)
        for key, shape in target.layer_outputs(layer, shapes).items():
            converted[shard].append(Entry(prefix + key, first, target.op, out_dtype, False,
                                          tuple(inputs[k] for k in names[1:]), tuple(shape), layer, key))
    for shard, entries in kept.items():
        src.shards[shard] = [e for e in entries if e.raw] + [e for e in entries if not e.raw] + converted[shard]
    return src


def _check_layer_shapes(target, prefix: str, inputs: dict[str, TensorMeta], lay: HeadLayout) -> None:
    """A layer's attention tensors have the shapes its config gives (the target's weights() checks them, here
    on meta tensors), or a one-line refusal before anything is written."""
    import torch

    try:
        target.weights({k: torch.empty(m.shape, dtype=m.dtype, device="meta") for k, m in inputs.items()})
    except (KeyError, ValueError, RuntimeError) as e:
        shapes = ", ".join(f"{k} {list(m.shape)}" for k, m in sorted(inputs.items()) if k.endswith("weight"))
        raise AttnconvError(f"{prefix}*: {shapes} do not fit the config's {lay.n_heads} heads / {lay.n_kv_heads} "
                            f"KV heads of {lay.head_dim} ({e}); the config does not match the weights") from None


def _gqa(settings: ConvertSettings, config: dict, family: str) -> LayerTarget | None:
    if not settings.needs_calibration:  # mean/first/random: one tensor at a time, and no torch before the copy
        return None
    from attnconv.convert.gqa.target import GqaTarget

    return GqaTarget.create(settings, config, family)


def _deepseek_v3(settings: ConvertSettings, config: dict, family: str) -> LayerTarget:
    from attnconv.convert.mla.deepseek_target import DeepSeekV3Target

    return DeepSeekV3Target.create(settings, config)


def _attnconv_mla(settings: ConvertSettings, config: dict, family: str) -> LayerTarget:
    from attnconv.convert.mla.attnconv_target import AttnconvMlaTarget

    return AttnconvMlaTarget.create(settings, config)


# (--to, --format) -> the LayerTarget that converts its layers (format None: whatever --format says, as GQA/MQA
# have one output format; a None target: GQA/MQA by mean/first/random, one tensor at a time)
TARGETS: dict[tuple[str, str | None], Callable[[ConvertSettings, dict, str], LayerTarget | None]] = {
    ("gqa", None): _gqa, ("mqa", None): _gqa, ("mla", "deepseek-v3"): _deepseek_v3, ("mla", "attnconv"): _attnconv_mla}


def layer_target(settings: ConvertSettings, config: dict, family: str) -> LayerTarget | None:
    make = TARGETS.get((settings.to, settings.format)) or TARGETS[settings.to, None]
    return make(settings, config, family)


def _source_float_dtype(src: Source) -> str | None:
    """The dtype of the source's attention weights as a torch name ('float16', ...), from the headers."""
    meta = next((m for m in src.reader.tensors.values() if ".self_attn." in m.name), None)
    return None if meta is None else ST_DTYPES[meta.st_dtype][0]


def inspect_source(settings: ConvertSettings) -> Source:
    """Read config and headers, check the request, and lay out every output tensor (no tensor is read)."""
    folder = resolve_source(settings.source, settings.allow_pickle)
    path = folder.path
    config = read_config(folder)
    family = source_family(config)
    try:
        layout_in = family.layout(config)
        if layout_in.n_heads % layout_in.n_kv_heads or layout_in.hidden < 1:
            raise ValueError
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise AttnconvError(f"{path / 'config.json'} lacks the head counts a {family.name} config has") from None
    mla = settings.to == "mla"
    kv_heads = layout_in.n_kv_heads if mla else settings.target_kv_heads
    check_kv_heads(family, layout_in, kv_heads)
    dtype = canonical_dtype(settings.dtype)
    files, fmt = weight_files(folder, settings.allow_pickle)
    reader = CheckpointReader(files, fmt)
    check_layers(config, list(reader.tensors), path)
    if settings.needs_calibration:
        settings.calibration_seq_len(config)  # refused now, not after the copy has begun
    layout_out = HeadLayout(layout_in.n_heads, kv_heads, layout_in.head_dim, layout_in.hidden, layout_in.layers,
                            layout_in.rope)
    copy = sorted(p.name for p in path.iterdir()
                  if p.is_file() and p.name not in _SKIP_NAMES and not p.name.endswith(_SKIP_SUFFIXES))
    src = Source(settings, path, family, layout_in, layout_out, dtype, reader,
                 {} if mla else _config_out(family, config, kv_heads, dtype), copy, config_in=config)
    if mla and family.name not in ROPE_FAMILIES:
        raise AttnconvError(f"--to mla needs RoPE attention ({', '.join(ROPE_FAMILIES)}); "
                            f"{family.name} has learned positions: convert it with --to mqa")
    src.target = layer_target(settings, config, family.name)  # MLA, calibrated GQA: a layer at a time
    if src.target is not None:
        src.target.check_dtype(dtype or _source_float_dtype(src))
        _layer_layout(src, files, dtype)
        src.config_out = src.target.planned_config(src.config_out)
        return src
    n = len(files)
    for i, file in enumerate(files):
        shard = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        metas = sorted((m for m in reader.tensors.values() if m.file == file), key=lambda m: m.start)
        entries = [e for m in metas if (e := _entry(family, reader, m, dtype)) is not None]
        # Unchanged tensors first: they can be copied before the converted tensors' shapes are known.
        src.shards[shard] = [e for e in entries if e.raw] + [e for e in entries if not e.raw]
    if not any(e.op != "copy" for entries in src.shards.values() for e in entries):
        raise AttnconvError(f"no attention K/V tensors found in {path}; the weights do not match a "
                            f"{family.name} checkpoint")
    return src
