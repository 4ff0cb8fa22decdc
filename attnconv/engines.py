"""One declarative record per serving engine: which DeepSeek-V3-format MLA settings it runs, and what it needs.

`convert --to mla --engine NAME` checks its setting against the engine's record before any work starts and picks
defaults that fit; `info --kv-rank/--rope-dim` lists the engines that serve a setting; `attnconv.json` and the model
card say which engines an output was made for. Every fact names the source file or thread it was read from (the
llama.cpp facts: the copy vendored in the llama-cpp-python 0.3.36 sdist, which scripts/build_llamacpp.py builds;
vLLM and SGLang: their repositories' main branches as read for issue 25). Torch-free, like families.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from attnconv.errors import AttnconvError

# Expert fields every engine reads although no layer is an MoE layer (first_k_dense_replace = num_hidden_layers):
# two routed experts in one group, because llama.cpp asserts n_expert_groups < n_expert (llama-model.cpp,
# load_hparams) and reads expert_shared_count and expert_feed_forward_length unconditionally (models/deepseek2.cpp);
# transformers and vLLM want n_routed_experts to be an int (transformers 5 DeepseekV3Config validation, vLLM PR
# #32614); SGLang fuses shared experts only for 256 routed experts (deepseek_v2.py determine_num_fused_shared_experts).
DENSE_EXPERT_FIELDS: dict[str, Any] = {
    "moe_layer_freq": 1, "n_routed_experts": 2, "n_shared_experts": 1, "num_experts_per_tok": 1, "n_group": 1,
    "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
}


@dataclass(frozen=True)
class Engine:
    """What one engine accepts of a DeepSeek-V3 checkpoint (config.json keys named as transformers names them)."""

    name: str
    latent_sums: tuple[int, ...] | None = None  # allowed kv_lora_rank + qk_rope_head_dim; None: any
    latent_pairs: tuple[tuple[int, int], ...] | None = None  # allowed (kv_lora_rank, qk_rope_head_dim); None: any
    nope_dims: tuple[int, ...] | None = None  # allowed qk_nope_head_dim; None: any >= 1
    null_q_rank: str = "any"  # when q_lora_rank may be null: "any", "never", or "lite" (llama.cpp's lite models)
    lite_layers: tuple[int, ...] = ()  # "lite": the layer counts whose q_lora_rank must be null (no others may)
    avoid_routed_experts: tuple[int, ...] = ()  # n_routed_experts values that switch on a path a dense model breaks
    expert_fields: tuple[str, ...] = ()  # expert keys it reads even when every layer is dense
    activations: tuple[str, ...] | None = None  # hidden_act values its DeepSeek MLP runs; None: any
    drops: tuple[str, ...] = ()  # what it ignores silently (so attnconv must never rely on it)
    # what it always runs, whatever the checkpoint says: kv_a_layernorm over the latent exists in every DeepSeek
    # implementation (transformers DeepseekV3Attention, vLLM DeepseekV2MLAAttention, llama.cpp attn_kv_a_norm),
    # so no conversion into this format is exact while the latent's RMS varies per token (mla/deepseek.py)
    always_applies: tuple[str, ...] = ("kv_a_layernorm",)
    note: str = ""

    def setting_problem(self, kv_rank: int, rope_dim: int, nope_dim: int | None = None) -> str | None:
        """Why (kv_rank, rope_dim, nope_dim) cannot be served, with the allowed values; None when it can."""
        if self.latent_pairs is not None and (kv_rank, rope_dim) not in self.latent_pairs:
            allowed = ", ".join(f"--kv-rank {r} --rope-dim {d}" for r, d in self.latent_pairs)
            return f"{self.name} serves MLA only with {allowed} (got --kv-rank {kv_rank} --rope-dim {rope_dim})"
        if self.latent_sums is not None and kv_rank + rope_dim not in self.latent_sums:
            sums = " or ".join(str(s) for s in self.latent_sums)
            fits = ", ".join(f"--kv-rank {s - rope_dim}" for s in self.latent_sums if s > rope_dim)
            return (f"{self.name}'s MLA kernels need --kv-rank + --rope-dim = {sums} (got {kv_rank} + {rope_dim} = "
                    f"{kv_rank + rope_dim}); with --rope-dim {rope_dim} use {fits}")
        if nope_dim is not None and self.nope_dims is not None and nope_dim not in self.nope_dims:
            return (f"{self.name} needs qk_nope_head_dim in {list(self.nope_dims)}, and the source's head_dim gives "
                    f"{nope_dim}")
        return None

    def q_rank_problem(self, q_rank: int | None, layers: int) -> str | None:
        """Why this q_lora_rank cannot be served by a model of `layers` layers; None when it can."""
        if self.null_q_rank == "never" and q_rank is None:
            return f"{self.name} needs a query latent: pass --q-rank (the hidden size is exact)"
        if self.null_q_rank == "lite":
            lite = layers in self.lite_layers
            if lite and q_rank is not None:
                return (f"{self.name} reads no q_lora_rank for a {layers}-layer model (its DeepSeek-V2-Lite rule): "
                        "drop --q-rank")
            if not lite and q_rank is None:
                return (f"{self.name} needs q_lora_rank for a {layers}-layer model: pass --q-rank (the hidden size "
                        "is exact)")
        return None

    def default_q_rank(self, hidden: int, layers: int) -> int | None:
        """The q_lora_rank to write when the user gives none: the exact query latent where one is required."""
        needs = self.null_q_rank == "never" or (self.null_q_rank == "lite" and layers not in self.lite_layers)
        return hidden if needs else None

    def config_problems(self, config: Mapping[str, Any]) -> list[str]:
        """Everything in a deepseek_v3 config.json this engine would refuse or run differently."""
        out = []
        nope = config.get("qk_nope_head_dim")
        if (p := self.setting_problem(config["kv_lora_rank"], config["qk_rope_head_dim"], nope)) is not None:
            out.append(p)
        if not isinstance(nope, int) or nope < 1:
            out.append(f"qk_nope_head_dim must be >= 1 (llama.cpp asserts it), got {nope!r}")
        if (p := self.q_rank_problem(config.get("q_lora_rank"), config["num_hidden_layers"])) is not None:
            out.append(p)
        out += [f"{self.name} reads {key}, which is missing or not an int" for key in self.expert_fields
                if not isinstance(config.get(key), int) or isinstance(config.get(key), bool)]
        experts, groups = config.get("n_routed_experts"), config.get("n_group")
        if self.name == "llama.cpp" and isinstance(experts, int) and isinstance(groups, int) and groups >= experts:
            out.append(f"llama.cpp asserts n_group < n_routed_experts (got {groups} >= {experts})")
        if experts in self.avoid_routed_experts:
            out.append(f"{self.name} switches on shared-expert fusion for n_routed_experts {experts}")
        if config.get("first_k_dense_replace") != config["num_hidden_layers"]:
            out.append("attnconv writes dense MLPs only: first_k_dense_replace must equal num_hidden_layers")
        act = config.get("hidden_act", "silu")
        if self.activations is not None and act not in self.activations:
            out.append(f"{self.name}'s DeepSeek MLP runs only {', '.join(self.activations)}, not {act}")
        if config.get("attention_bias") and "attention biases" in self.drops:
            out.append(f"{self.name} loads no attention biases")
        if config.get("rope_scaling") and "rope scaling other than yarn" in self.drops:
            out.append(f"{self.name} rewrites any rope_scaling to DeepSeek's yarn")
        return out


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in [
        # transformers 5.x models/deepseek_v3 (modeling_deepseek_v3.py, configuration_deepseek_v3.py): any dims;
        # q_lora_rank null builds q_proj; n_routed_experts validated as an int.
        Engine("transformers", expert_fields=("n_routed_experts",)),
        # llama.cpp (vendored in llama-cpp-python 0.3.36): src/models/deepseek2.cpp load_arch_hparams reads
        # q_lora_rank unless the model is "lite" (26 or 27 layers; 48 with vocab 128256: not expressible here, no
        # Llama-family source has that vocab and 48 layers at once in attnconv's test set), and asserts
        # qk_nope >= 1; llama-model.cpp asserts n_expert_groups < n_expert; conversion/deepseek.py writes
        # expert_feed_forward_length from moe_intermediate_size and expert_shared_count; its graph runs SiLU only
        # (LLM_FFN_SILU), has no attention biases, applies attn_kv_a_norm always, RoPE in interleaved pairs.
        Engine("llama.cpp", null_q_rank="lite", lite_layers=(26, 27),
               expert_fields=("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "n_group"),
               activations=("silu",), drops=("attention biases", "hidden_act", "rope scaling other than yarn"),
               note="CPU and GPU; any latent size (its MLA is plain ggml ops); GGUF in bf16 or f32, not f16 "
                    "(the latent projection lies below float16's range)"),
        # vLLM: vllm/model_executor/layers/attention/mla_attention.py MLACommonBackend.get_supported_head_sizes
        # = [320, 576] (FlashMLA and the sparse backends: [576]); TRITON_MLA crashed at kv_lora_rank 256 (vllm
        # #45031); models/deepseek_v2.py DeepseekV2MLAAttention builds every projection with bias=False (biases
        # in a checkpoint are never loaded), always builds kv_a_layernorm, uses non-neox (interleaved) RoPE and
        # turns any non-default rope_type into deepseek_yarn; q_lora_rank None builds q_proj.
        Engine("vllm", latent_sums=(320, 576), expert_fields=("n_routed_experts",), activations=("silu",),
               drops=("attention biases", "rope scaling other than yarn"),
               note="GPU MLA kernels; VLLM_MLA_DISABLE=1 serves any size but caches full K/V"),
        # SGLang: its TRTLLM MLA backend requires kv_lora_rank 512, qk_rope_head_dim 64, qk_nope_head_dim 128
        # (trtllm_mla_backend.py, sglang PR #7938); FlashMLA, its default on Hopper, is 512 + 64 only (FlashMLA
        # #78); models/deepseek_v2.py determine_num_fused_shared_experts fuses the shared expert for
        # DeepseekV3ForCausalLM with n_routed_experts 256; projections without biases as in vLLM.
        Engine("sglang", latent_pairs=((512, 64),), expert_fields=("n_routed_experts",), avoid_routed_experts=(256,),
               activations=("silu",), drops=("attention biases", "rope scaling other than yarn"),
               note="TRTLLM MLA additionally needs qk_nope_head_dim 128; tensor parallelism wider than "
                    "n_routed_experts raises only where MoE layers are built (none here)"),
    ]
}
ENGINE_NAMES = tuple(ENGINES)


def engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise AttnconvError(f"--engine {name!r} is not known; choose one of {', '.join(ENGINE_NAMES)}") from None


def engines_serving(kv_rank: int, rope_dim: int, nope_dim: int | None = None) -> list[str]:
    """The engines whose MLA runs a latent of kv_rank plus a shared RoPE key of rope_dim (and nope_dim)."""
    return [e.name for e in ENGINES.values() if e.setting_problem(kv_rank, rope_dim, nope_dim) is None]


def engines_loading(config: Mapping[str, Any]) -> list[str]:
    """The engines that load a deepseek_v3 config.json as it is."""
    return [e.name for e in ENGINES.values() if not e.config_problems(config)]
