"""The model card of a converted (and possibly uptrained) model, written from its `attnconv.json` provenance."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from attnconv import __version__
from attnconv.loading import read_provenance


def _kib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024:,.1f} KiB"


def _looks_like_hub_id(source: str | None) -> bool:
    return bool(source) and not Path(source).expanduser().exists() and source.count("/") == 1


def _mla_section(prov: dict, conv: dict) -> list[str]:
    kv_before, kv_after = conv.get("kv_bytes_per_token_before"), conv.get("kv_bytes_per_token_after")
    ratio = f" ({kv_before / kv_after:.0f}x smaller)" if kv_before and kv_after else ""
    ranks = sorted(set(conv.get("kv_rank") or [])) or ["?"]
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (per layer)"
    shared = conv.get("format") == "deepseek-v3" or conv.get("rope_key") == "shared"
    rope = (f"one RoPE key of {conv.get('rope_dim')} dims shared by all heads" if shared
            else f"{conv.get('rope_dim')} RoPE dims kept per key/value head ({conv.get('rope_select')})")
    calib = conv.get("calibration")
    how = f"{conv.get('init')} initialisation" + (
        f" on {calib['tokens']:,} tokens of `{calib['data']}`" if calib else " (weights only)")
    lines = [
        f"Converted from `{prov.get('source', '?')}` ({prov.get('source_family', '?')}) with attnconv "
        f"{prov.get('attnconv_version', '?')} to **multi-head latent attention** (MLA, as in DeepSeek-V2/V3) in "
        f"the `{conv.get('format')}` format: a latent of {rank} values per token and layer plus {rope}, by {how}.",
        "", "| | source | this model |", "|---|---|---|",
        f"| key/value heads | {conv.get('kv_heads_before')} | latent |",
        f"| KV cache per token | {_kib(kv_before)} | {_kib(kv_after)}{ratio} |"]
    if conv.get("engines"):  # deepseek-v3: what it was made for and every engine whose limits it meets
        lines += ["", f"Made for `{conv.get('engine')}`; within the limits of: "
                  + ", ".join(f"`{e}`" for e in conv["engines"]) + " (attnconv's engine records)."]
    return lines + [f"- {note}" for note in conv.get("notes") or []]


def _calibrated_method(conv: dict) -> str:
    """A calibrated method's description from the registry, with its calibration text."""
    from attnconv.convert.gqa.methods import parse_method
    from attnconv.errors import AttnconvError

    name = str(conv.get("method", "?"))
    try:
        info = parse_method(name)
    except AttnconvError:
        return name
    calib = conv.get("calibration")
    data = f", calibrated on {calib['tokens']:,} tokens of `{calib['data']}`" if calib else ""
    return f"the `{info.name}` method ({info.help}; {info.source}){data}"


def _conversion_section(prov: dict) -> list[str]:
    conv = prov.get("conversion") or {}
    if not conv:
        return ["This model was not converted by attnconv (its folder has no `attnconv.json` conversion record)."]
    if conv.get("to") == "mla":
        return _mla_section(prov, conv)
    before, after = conv.get("kv_heads_before"), conv.get("kv_heads_after")
    kv_before, kv_after = conv.get("kv_bytes_per_token_before"), conv.get("kv_bytes_per_token_after")
    ratio = f" ({kv_before / kv_after:.0f}x smaller)" if kv_before and kv_after else ""
    method = {"mean": "mean-pooling the key/value heads of each group (Ainslie et al. 2023, GQA)",
              "first": "keeping the first key/value head of each group (the GQA paper's ablation)",
              "random": "random initialisation of the new key/value heads (the GQA paper's ablation)"}
    how = method.get(conv.get("method")) or _calibrated_method(conv)
    lines = [
        f"Converted from `{prov.get('source', '?')}` ({prov.get('source_family', '?')}) with "
        f"attnconv {prov.get('attnconv_version', '?')}: "
        f"{conv.get('n_heads', '?')} query heads, **{before} -> {after} key/value heads** "
        f"({str(conv.get('to', '')).upper()}), by {how}.",
        "",
        "| | source | this model |",
        "|---|---|---|",
        f"| key/value heads | {before} | {after} |",
        f"| KV cache per token | {_kib(kv_before)} | {_kib(kv_after)}{ratio} |",
    ]
    return lines


def _uptrain_section(prov: dict) -> list[str]:
    run = prov.get("uptrain")
    if not isinstance(run, dict):
        return []
    settings, results = run.get("settings") or {}, run.get("results") or {}
    lines = ["", "## Uptraining", "",
             f"Continued training after the conversion with `attnconv uptrain`: {results.get('steps', '?')} steps, "
             f"{results.get('tokens', 0):,} tokens of `{run.get('data', '?')}` "
             f"(sequence length {settings.get('seq_len', '?')}, learning rate {settings.get('lr', '?')}, "
             f"{settings.get('schedule', '?')} schedule, {settings.get('dtype', '?')})."]
    if settings.get("teacher"):
        lines.append(f"Distilled from `{settings['teacher']}` (weight {settings.get('distill_weight')}, "
                     f"temperature {settings.get('temperature')}).")
    if results.get("final_loss") is not None:
        lines.append(f"Final training loss {results['final_loss']:.4f}"
                     + (f"; held-out perplexity {results['eval_ppl']:.2f}." if results.get("eval_ppl") else "."))
    return lines


def model_card(folder: Path, repo_id: str) -> str:
    """The README.md text (YAML metadata + markdown) for FOLDER published as REPO_ID."""
    prov = read_provenance(folder)
    source = prov.get("source")
    conv = prov.get("conversion") or {}
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        base_model=source if _looks_like_hub_id(source) else None,
        tags=["attnconv"] + ([str(conv["to"])] if conv.get("to") else []) + (["uptrained"] if "uptrain" in prov
                                                                             else []),
    )
    own_format = conv.get("to") == "mla" and conv.get("format") == "attnconv"
    loads = ("It loads in `transformers` once `attnconv` is imported (`pip install attnconv`; no remote code): "
             "attnconv registers its MLA classes, the source family's own with the attention replaced."
             if own_format else
             "It loads in plain `transformers` (no remote code): "
             + ("a native DeepseekV3 checkpoint, as DeepSeek-serving engines read it." if conv.get("to") == "mla"
                else "the architecture is the source's own with fewer key/value heads."))
    body = [f"# {repo_id.split('/')[-1]}", "", *_conversion_section(prov), *_uptrain_section(prov), "",
            "## Use", "", "```python", *(["import attnconv  # registers the attnconv MLA classes"] if own_format
                                         else []),
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "", loads, ""]
    hashes = prov.get("source_weight_sha256") or {}
    if hashes or prov.get("source_revision"):
        body += ["## Provenance", "", f"`attnconv.json` in this repository records the whole run. Source "
                 f"revision: {prov.get('source_revision') or 'a local folder'}; source weights (sha256):", ""]
        body += [f"- `{name}`: `{digest}`" for name, digest in sorted(hashes.items())] + [""]
    body.append(f"Card written by attnconv {__version__}.")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))
