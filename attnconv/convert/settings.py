"""The settings of `attnconv convert` and `attnconv info` (see attnconv/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

from attnconv.convert.gqa.methods import METHODS_HELP, parse_method
from attnconv.dtypes import ALIASES, DTYPES
from attnconv.engines import ENGINE_NAMES, engine
from attnconv.errors import AttnconvError
from attnconv.settings import Settings, allow_pickle_option, option, overwrite_option, quiet_option

TARGETS = ("gqa", "mqa", "mla")
MLA_FORMATS = ("deepseek-v3", "attnconv")
MLA_INITS = ("svd", "pca")
ROPE_SELECT = ("high", "low", "uniform", "2-norm")
ROPE_KEYS = ("per-kv-head", "shared")


@dataclass(frozen=True)
class ConvertSettings(Settings):
    command_name = "convert"

    source: str = option(help="Source checkpoint: a local folder (with config.json) or a hub id.", argument=True,
                         io="model")
    out: str | None = option(None, help="Output folder (written to a temporary sibling, renamed when complete).",
                             argument=True, run=False, io="out")
    to: str = option("gqa", help="Target attention: gqa (needs --kv-heads), mqa (1 KV head) or mla (multi-head "
                     "latent attention; needs --kv-rank).", choices=TARGETS)
    kv_heads: int | None = option(None, help="KV heads to keep; must divide the query and KV heads. With --to mla "
                                  "--format attnconv: merge the KV heads into this many by --method first (the "
                                  "latent then compresses that GQA; phases off).", minimum=1)
    method: str = option("mean", help=METHODS_HELP, metavar="[mean|first|random|grouped+aligned+fit|...]")
    seed: int = option(0, help="Seed for --method random and for the grouping search of --method grouped.",
                       minimum=0)
    dtype: str = option("auto", help="Output dtype; auto keeps the source's. Pooling is computed in float32 either "
                        "way.", choices=("auto", *DTYPES), aliases=ALIASES)
    kv_rank: tuple[int, ...] | None = option(None, help="MLA: the latent's dims per token and layer (one value, or one "
                                             "per layer with --format attnconv).", minimum=1)
    rope_dim: int | None = option(None, help="MLA: RoPE dims: the one shared RoPE key's size in deepseek-v3 format "
                                  "(default min(64, rotary dims)), the dims kept per KV head in attnconv format "
                                  "(default half the rotary dims); the rest of each key comes from the latent.",
                                  minimum=2)
    format: str = option("deepseek-v3", help="MLA output: deepseek-v3 (a native transformers DeepseekV3 checkpoint "
                         "that serving engines load) or attnconv (exact structure, lossless at full rank; loads "
                         "after `import attnconv`).", choices=MLA_FORMATS)
    rope_key: str = option("per-kv-head", help="MLA attnconv: per-kv-head (each KV head keeps --rope-dim of its "
                           "own RoPE dims; lossless at full rank, any family) or shared (one RoPE key for all heads "
                           "and a full NoPE key per head, DeepSeek's structure without its latent norm; better on "
                           "SmolLM2 at MQA's cache; not for per-head q/k norms).", choices=ROPE_KEYS)
    init: str = option("pca", help="MLA latent: pca (activation-aware, on the calibration text) or svd (weights "
                       "only, no calibration).", choices=MLA_INITS)
    rope_select: str = option("high", help="MLA: which RoPE pairs keep their rotation: high (the fastest-rotating "
                              "first), low, uniform, or 2-norm (largest query x key norms on calibration text; "
                              "attnconv format).", choices=ROPE_SELECT)
    phases: bool = option(True, help="MLA: a query pair whose rotation is dropped turns by the source's mean "
                          "rotation of that pair on calibration text (folded into q_proj; no cache cost).")
    q_rank: int | None = option(None, help="MLA deepseek-v3: factor the query through a latent of this size too "
                                "(the hidden size is exact: the input RMSNorm is folded into the projections). "
                                "Default: none, or the hidden size where --engine needs one (llama.cpp).", minimum=1)
    engine: str = option("transformers", help="MLA deepseek-v3: the engine the output is for; the setting is "
                         "checked against its limits before any work (attnconv/engines.py) and defaults picked to "
                         "fit it. The output loads in transformers either way.", choices=ENGINE_NAMES)
    calibrate: str | None = option(None, help="Calibration text (the --data forms of eval/uptrain; default "
                                   "wikitext-2-test:calib, the first half of the WikiText-2 test split shipped with "
                                   "attnconv, disjoint from eval's default second half), for the calibrated GQA/MQA "
                                   "methods and MLA's --init pca, --phases, --rope-select 2-norm.", io="data")
    calib_tokens: int = option(131072, help="Calibration tokens.", minimum=1)
    calib_seq_len: int | None = option(None, help="Tokens per calibration sequence (default min(2048, the model's "
                                       "maximum positions)).", minimum=2)
    dry_run: bool = option(False, help="Print the plan (tensors, sizes, KV cache) and exit.", run=False)
    overwrite: bool = overwrite_option()
    allow_pickle: bool = allow_pickle_option()
    quiet: bool = quiet_option()

    def check(self) -> None:
        to, kv = self.label("to"), self.label("kv_heads")
        if self.to == "mqa" and self.kv_heads not in (None, 1):
            raise AttnconvError(f"{to} mqa means one KV head; drop {kv} {self.kv_heads} or use {to} gqa")
        if self.to == "gqa" and self.kv_heads is None:
            raise AttnconvError(f"{to} gqa needs {kv} N (the number of KV heads to keep)")
        if self.out is None and not self.dry_run:
            raise AttnconvError(f"an output folder {self.label('out')} is needed (or pass --dry-run to only print "
                                "the plan)")
        # parsed once: plan, ops and targets receive this Method
        object.__setattr__(self, "merge_method", parse_method(self.method, self.label("method")))
        merge = self.to == "mla" and self.kv_heads is not None
        if self.to == "mla" and self.method != "mean" and not merge:
            raise AttnconvError(f"{self.label('method')} is for {to} gqa/mqa, or for {to} mla with {kv} (how the "
                                f"KV heads merge first); MLA's latent is set by {self.label('init')}")
        mla_only = ("kv_rank", "rope_dim", "q_rank")
        if self.to == "mla":
            if self.kv_rank is None:
                raise AttnconvError(f"{to} mla needs {self.label('kv_rank')} R (the latent's dims per token and "
                                    "layer)")
            if merge and self.format != "attnconv":
                raise AttnconvError(f"{kv} with {to} mla (merge the KV heads first, then the latent) needs --format "
                                    "attnconv; DeepSeek-V3's format has one RoPE key for all heads")
            if merge and (self.merge_method.name in ("first", "random") or self.rope_select == "2-norm"):
                raise AttnconvError(f"{to} mla {kv} merges KV heads by mean or a calibrated method (not "
                                    f"{self.merge_method.name}) and keeps RoPE pairs by high/low/uniform (2-norm "
                                    "scores the source's heads)")
            if self.format != "attnconv" and self.rope_key != "per-kv-head":
                raise AttnconvError(f"{self.label('rope_key')} is for --format attnconv (deepseek-v3's RoPE key is "
                                    "always shared)")
            if self.format == "attnconv" and self.q_rank is not None:
                raise AttnconvError(f"{self.label('q_rank')} is for --format deepseek-v3")
            if self.format == "deepseek-v3" and len(self.kv_rank) > 1:
                raise AttnconvError(f"a rank per layer ({self.label('kv_rank')} R1,R2,...) needs --format attnconv")
            if self.rope_dim is not None and self.rope_dim % 2:
                raise self.error("rope_dim", "an even number (RoPE rotates pairs of dims)", self.rope_dim)
            if self.engine != "transformers" and self.format != "deepseek-v3":
                raise AttnconvError(f"{self.label('engine')} {self.engine} serves --format deepseek-v3; --format "
                                    "attnconv loads only in transformers")
            if self.format == "deepseek-v3" and self.rope_dim is not None:  # else checked once the model is read
                problem = engine(self.engine).setting_problem(self.kv_rank[0], self.rope_dim)
                if problem is not None:
                    raise AttnconvError(problem)
        elif given := [n for n in mla_only if getattr(self, n) is not None]:
            raise AttnconvError(f"{self.label(given[0])} is for {to} mla")
        elif self.rope_key != "per-kv-head":
            raise AttnconvError(f"{self.label('rope_key')} is for {to} mla --format attnconv")
        elif self.engine != "transformers":
            raise AttnconvError(f"{self.label('engine')} is for {to} mla --format deepseek-v3 (GQA/MQA outputs keep "
                                "the source's architecture)")
        if self.calibrate is not None and not self.needs_calibration:
            raise AttnconvError(f"{self.label('calibrate')} is unused: this conversion reads no activations (it "
                                "calibrates for the grouped/aligned/fit methods, MLA's --init pca, --phases and "
                                "--rope-select 2-norm); drop it or choose one of those")

    def calibration_seq_len(self, config: dict) -> int:
        """Tokens per calibration sequence (--calib-seq-len, default min(2048, the model's positions)), checked
        against the model's positions and --calib-tokens."""
        from attnconv.model_shape import max_positions

        limit = max_positions(config)
        seq_len = self.calib_seq_len or min(2048, limit or 2048)
        if limit and seq_len > limit:
            raise AttnconvError(f"{self.label('calib_seq_len')} {seq_len} exceeds the model's {limit} positions; "
                                f"choose at most {limit}")
        if self.calib_tokens < seq_len:
            raise AttnconvError(f"{self.label('calib_tokens')} {self.calib_tokens} is less than one calibration "
                                f"sequence of {seq_len} tokens; give at least {seq_len} (or a shorter "
                                f"{self.label('calib_seq_len')})")
        return seq_len

    @property
    def needs_calibration(self) -> bool:
        """Whether the conversion reads activations on calibration text."""
        return bool(self.calibration_uses)  # with --kv-heads, MLA's phases are not used (source heads' rotations)

    @property
    def calibration_uses(self) -> list[str]:
        """The options that read calibration text (empty: weights only), for saying why it is read."""
        if self.to != "mla":
            return [f"--method {self.method}"] if self.merge_method.calibrated else []
        uses = ["--init pca"] if self.init == "pca" else []
        if self.kv_heads is not None:
            return uses + ([f"--method {self.method}"] if self.merge_method.calibrated else [])
        return uses + ["--phases"] * self.phases + ["--rope-select 2-norm"] * (self.rope_select == "2-norm")

    @property
    def target_kv_heads(self) -> int:
        return 1 if self.to == "mqa" else self.kv_heads


@dataclass(frozen=True)
class InfoSettings(Settings):
    command_name = "info"

    model: str = option(help="A model folder or hub id.", argument=True)
    batch: int = option(1, help="Batch size for the KV-cache table.", minimum=1)
    context: int | None = option(None, help="Context length (default: the model's maximum).", minimum=1)
    dtype: str = option("bfloat16", help="Cache dtype for the table.", choices=DTYPES, aliases=ALIASES)
    kv_rank: int | None = option(None, help="Also show MLA's cache for a latent of this many values.", minimum=1)
    rope_dim: int | None = option(None, help="RoPE dims of MLA's key (default head_dim / 2), with --kv-rank.",
                                  minimum=2)

    def check(self) -> None:
        if self.rope_dim is not None and self.kv_rank is None:
            raise AttnconvError(f"{self.label('rope_dim')} needs {self.label('kv_rank')} (it sizes the MLA rows "
                                f"that {self.label('kv_rank')} adds to the table)")
        if self.rope_dim is not None and self.rope_dim % 2:
            raise self.error("rope_dim", "an even number (RoPE rotates pairs of dims)", self.rope_dim)
