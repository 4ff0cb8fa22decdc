"""`uptrain()`: the typed library function behind `attnconv uptrain` (and the demo script).

Layout on disk while training: `OUT.uptrain-run/` holds `checkpoints/step-N/` and the live
`train_log.jsonl`; `--resume` continues from its last complete checkpoint. When training ends, the
model (saved like its input, safetensors, in its input dtype), tokenizer, `train_log.jsonl` and
`attnconv.json` appear in OUT in one rename, then the run folder is removed (unless keep_checkpoints).
OUT is locked for the whole run; inputs (model, teacher, data, tokenizer) are never written.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

from attnconv.dtypes import canonical_dtype
from attnconv.errors import AttnconvError
from attnconv.fingerprint import folder_fingerprint
from attnconv.kernels.linear_cross_entropy import cpu_has_fast_bf16
from attnconv.loading import (
    ModelFolder,
    load_causal_lm,
    load_tokenizer,
    quiet_transformers,
    read_config,
    read_provenance,
    resolve_source,
    weight_files,
)
from attnconv.model_shape import max_positions
from attnconv.outputs import RUN_SUFFIX, atomic_output_dir, check_output_dir, output_lock, protect_inputs
from attnconv.uptrain.checkpoint import latest_checkpoint
from attnconv.uptrain.data import BlockSchedule, eval_windows, pack_blocks, tokenize_cached, tokenizer_facts
from attnconv.uptrain.latent_units import from_training_units, to_training_units
from attnconv.uptrain.model_setup import enable_gradient_checkpointing, select_trainable
from attnconv.uptrain.settings import UptrainSettings
from attnconv.uptrain.sharded import check_fsdp_version, is_sharded, setup_fsdp
from attnconv.uptrain.trainer import Run, identity_differences, refuse_other_settings
from attnconv.uptrain.trainer import train as run_training


def run_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}{RUN_SUFFIX}"


def _input_dtype(folder: ModelFolder) -> torch.dtype:
    cfg = read_config(folder)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    try:
        return getattr(torch, canonical_dtype(name) or "float32")
    except (ValueError, TypeError):
        return torch.float32


def _prepare_run_dir(out: Path, run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Apply the OUT / run-folder rules before any work; returns True when a checkpoint will be resumed."""
    has_ckpt = latest_checkpoint(run_dir / "checkpoints") is not None
    if resume and has_ckpt:
        return True
    if resume and out.exists() and not overwrite:
        raise AttnconvError(f"{out} already holds a finished run of other settings and {run_dir} has no checkpoint "
                            "to resume; pass --overwrite to train again from the input model")
    if not resume:
        check_output_dir(out, overwrite)
        if has_ckpt and not overwrite:
            raise AttnconvError(f"an unfinished run left checkpoints in {run_dir}; pass --resume to continue it "
                                "or --overwrite to start over")
    return False


def _finished(out: Path, identity_without_fingerprints: dict) -> dict | None:
    """The recorded summary when OUT already holds a finished run of exactly these settings."""
    record = read_provenance(out).get("uptrain")
    if not isinstance(record, dict):
        return None
    saved = {k: v for k, v in (record.get("identity") or {}).items() if k in identity_without_fingerprints}
    return record if saved and not identity_differences(saved, identity_without_fingerprints) else None


def _load_teacher(settings: UptrainSettings, student_tokenizer, student_config):
    t_tok = load_tokenizer(settings.teacher)
    if t_tok.get_vocab() != student_tokenizer.get_vocab():
        raise AttnconvError(f"teacher {settings.teacher} has another tokenizer than the model (their vocabularies "
                            "differ); distil from the model's own source")
    dtype = "bfloat16" if settings.dtype == "bfloat16" else "float32"
    model = load_causal_lm(settings.teacher, dtype=dtype, allow_pickle=settings.allow_pickle)
    if model.config.vocab_size != student_config.vocab_size:
        raise AttnconvError(f"teacher {settings.teacher} has {model.config.vocab_size} logits per token but the model "
                            f"has {student_config.vocab_size}; distil from the model's own source")
    return model.requires_grad_(False)


def _check_loss_kernel(kernel: str) -> None:
    from attnconv.kernels.linear_cross_entropy import liger_available

    if kernel == "liger" and not liger_available():
        raise AttnconvError("--loss-kernel liger needs a CUDA GPU and liger-kernel (pip install 'attnconv[gpu]'); "
                            "use --loss-kernel auto")


def _fingerprints(folders: dict[str, ModelFolder], allow_pickle: bool) -> tuple[threading.Thread, dict[str, str]]:
    """Hash each folder's weights and config in a thread (it runs while the model loads); a file that cannot be
    read leaves its key out (loading the model reports why)."""
    files = {key: [*weight_files(folder, allow_pickle)[0], folder.path / "config.json"]
             for key, folder in folders.items()}
    out: dict[str, str] = {}

    def work():
        for key, paths in files.items():
            try:
                out[key] = folder_fingerprint(paths)
            except OSError:
                return

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, out


def uptrain(settings: UptrainSettings) -> dict:
    """Continue training settings.model on settings.data and write the result to settings.out; returns the run's
    summary. A step reads batch_size x grad_accum x processes blocks of seq_len + 1 tokens; steps: given, or
    ceil(tokens / tokens per step), or one pass over the data."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    s = settings
    out_path = check_output_dir(s.out, overwrite=True)  # the name's length; existence is decided below
    run_dir = run_dir_for(out_path)
    if len(run_dir.name.encode()) > 255:
        raise AttnconvError(f"the run folder {run_dir.name[:40]}... would be longer than 255 bytes; choose a shorter "
                            "output name")
    inputs = [s.model, s.teacher, s.data, s.eval_data, s.tokenizer]
    protect_inputs(out_path, inputs)
    protect_inputs(run_dir, inputs)
    folder = resolve_source(s.model, s.allow_pickle)
    teacher_folder = resolve_source(s.teacher, s.allow_pickle) if s.teacher else None
    _check_loss_kernel(s.loss_kernel)

    # Accelerate keeps its state per process; a second uptrain() in one process (demo, tests) may change precision.
    check_fsdp_version()
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision="bf16" if s.dtype == "bfloat16" else "no",
                              gradient_accumulation_steps=s.grad_accum, cpu=not torch.cuda.is_available())
    setup_fsdp(accelerator, bf16=s.dtype == "bfloat16")
    main = accelerator.is_main_process
    # The run folder is locked like OUT: no other command may write into it while this one trains.
    with output_lock(out_path) if main else nullcontext(), output_lock(run_dir) if main else nullcontext():
        if s.resume and latest_checkpoint(run_dir / "checkpoints") is None and out_path.exists():
            done = _finished(out_path, s.run_values())
            if done is not None:
                return {**done, "out": str(out_path), "log": [], "already_finished": True}
        will_resume = _prepare_run_dir(out_path, run_dir, s.resume, s.overwrite)
        if will_resume:
            refuse_other_settings(accelerator, run_dir / "checkpoints", s)
        if main and not will_resume and run_dir.exists():
            shutil.rmtree(run_dir)  # --overwrite, or --resume with nothing to resume
        accelerator.wait_for_everyone()
        return _uptrain(s, accelerator, folder, teacher_folder, out_path, run_dir, will_resume)


def _uptrain(s: UptrainSettings, accelerator, folder: ModelFolder, teacher_folder: ModelFolder | None,
             out_path: Path, run_dir: Path, will_resume: bool) -> dict:
    from accelerate.utils import set_seed

    from attnconv.textdata import Corpus

    hashing, hashes = _fingerprints({"model": folder, **({"teacher": teacher_folder} if teacher_folder else {})},
                                    s.allow_pickle)
    set_seed(s.seed)
    tok = load_tokenizer(folder, s.tokenizer)
    net = load_causal_lm(folder, dtype="float32", allow_pickle=s.allow_pickle, attn_implementation="sdpa")
    limit = max_positions(net.config)
    if limit is not None and s.seq_len > limit:
        raise AttnconvError(f"--seq-len {s.seq_len} is beyond the model's maximum of {limit} positions; "
                            f"use --seq-len {limit} or less")
    teacher_net = _load_teacher(s, tok, net.config) if s.teacher is not None else None

    tok_facts = tokenizer_facts(tok)
    with accelerator.main_process_first():  # tokenise once; the other processes read the cache
        stream, data_key = tokenize_cached(Corpus(s.data), tok, s.cache_dir, tok_facts)
        eval_stream = tokenize_cached(Corpus(s.eval_data, default_split="test"), tok, s.cache_dir, tok_facts)[0] \
            if s.eval_data else None
    vocab = net.get_input_embeddings().num_embeddings
    blocks = pack_blocks(stream, s.seq_len + 1, vocab)  # [n_blocks, seq_len + 1]
    plan = BlockSchedule(len(blocks), s.batch_size, s.grad_accum, accelerator.num_processes, s.seed)
    plan.check(f"--data {s.data} ({len(stream)} tokens)")
    windows = None
    if eval_stream is not None:
        windows = eval_windows(eval_stream, s.seq_len, s.max_eval_windows, vocab)
        if len(windows) == 0:
            raise AttnconvError(f"--eval-data {s.eval_data} has {len(eval_stream)} tokens, fewer than one window of "
                                f"{s.seq_len + 1}; give more held-out text or lower --seq-len")
    tokens_per_step = plan.global_batch * s.seq_len
    steps = s.steps or (math.ceil(s.tokens / tokens_per_step) if s.tokens is not None else plan.steps_per_epoch)

    units = to_training_units(net)  # a linear latent norm (attnconv's DeepSeek-V3) in steppable units
    trainable, total = select_trainable(net, s.train)
    if s.gradient_checkpointing:
        enable_gradient_checkpointing(net)
    net.config.use_cache = False
    from attnconv.patches.liger import apply_liger

    liger = apply_liger(net)
    if accelerator.is_main_process and s.dtype == "bfloat16" and accelerator.device.type == "cpu" \
            and not cpu_has_fast_bf16():
        print("uptrain: note: this CPU has no bf16 instructions; bf16 autocast runs several times slower here "
              "than --dtype float32", file=sys.stderr)
    hashing.join()
    identity = {**s.run_values(), "steps": steps, "processes": accelerator.num_processes, "data_key": data_key,
                "tokenizer_sha256": tok_facts.fingerprint, "model_sha256": hashes.get("model"),
                "teacher_sha256": hashes.get("teacher")}
    if accelerator.is_main_process and not s.quiet:
        print(f"uptrain: {trainable:,} of {total:,} parameters learn; {steps} steps of {tokens_per_step:,} tokens "
              f"on {accelerator.num_processes} process(es){' (FSDP)' if is_sharded(accelerator) else ''}, "
              f"{accelerator.device.type}"
              + (", resuming" if will_resume else ""), file=sys.stderr)
    result = run_training(accelerator, net, blocks, Run(s, steps, identity, run_dir), teacher=teacher_net,
                          eval_windows=windows, resume=will_resume, show_progress=not s.quiet)
    trained = result.pop("model")
    from_training_units(trained, units)
    log = result.pop("log")
    summary = {"source": s.model, "data": s.data, "data_tokens": int(len(stream)), "eval_data": s.eval_data,
               "settings": {**s.record(), "steps": steps, "processes": accelerator.num_processes,
                            "fsdp": is_sharded(accelerator),
                            "trainable_parameters": trainable, "liger_kernel": liger,
                            "loss_kernel_used": result.pop("loss_kernel")},
               "identity": identity, "results": result}
    if accelerator.is_main_process:
        _write_output(s, folder, out_path, trained, tok, log, summary, s.overwrite or will_resume or s.resume)
        if not s.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return {**summary, "out": str(out_path), "log": log}


def _write_output(s: UptrainSettings, src: ModelFolder, out: Path, net, tok, log: list[dict], summary: dict,
                  replace: bool) -> None:
    """Model + tokenizer + train_log.jsonl + attnconv.json, appearing in OUT in one rename."""
    provenance = read_provenance(src.path)
    provenance["uptrain"] = summary
    net = net.to(_input_dtype(src))
    # OUT was checked before training: one that appeared since is found at publish, which keeps this work.
    with atomic_output_dir(out, overwrite=replace, inputs=[s.model, s.teacher, s.data, s.eval_data, s.tokenizer],
                           recheck=False) as tmp:
        with quiet_transformers():
            net.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (tmp / "attnconv.json").write_text(json.dumps(provenance, indent=2) + "\n")
