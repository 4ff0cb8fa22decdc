"""Run a checkpoint's decoder layers one at a time over calibration tokens and feed each layer's collectors.

Memory: the hidden states of all calibration tokens (float32, [n_seq, seq_len, hidden]), one decoder layer's
weights and one batch's activations, plus what the collectors hold; never the whole model. The model is
built from its config with parameters on the meta device (buffers such as RoPE's inverse frequencies are
computed as usual), and only the embedding, then one layer at a time, are read from the safetensors files.

Each family's exact layer inputs (Gemma's scaled embeddings, rotary cos/sin, masks per attention type) come
from transformers itself, as GPTQ-style tools get them: the base model's forward runs with every decoder
layer replaced by a catcher that records its arguments and passes the hidden states on, stopping at the
last layer. Each real layer is then called with the arguments its catcher recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from attnconv import finite
from attnconv.calibration.collectors import Collector
from attnconv.calibration.memory import BATCH_TOKENS, release_freed_memory
from attnconv.errors import AttnconvError, Cancelled, first_line
from attnconv.families import ROPE_FAMILIES
from attnconv.loading import check_layers, load_config, read_config, resolve_source, weight_files
from attnconv.tensor_io import CheckpointReader

PROGRESS_AFTER_S = 2.0  # a progress bar appears once a run has taken this long


class _Stop(Exception):
    """Raised by the last catcher (and in the last layer after its attention input): nothing after is needed."""


class LayerwiseModel:
    """A checkpoint's model skeleton on the meta device, whose modules are filled from its files on demand."""

    def __init__(self, source: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 allow_pickle: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        folder = resolve_source(source, allow_pickle)
        self.path = folder.path
        files, fmt = weight_files(folder, allow_pickle)
        model_type = read_config(folder)["model_type"]
        config = load_config(folder)
        try:
            # include_buffers=False: buffers computed at init (RoPE frequencies, Gemma's embedding scale) are real.
            with init_empty_weights(include_buffers=False):
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        except (ValueError, KeyError, OSError) as e:
            raise AttnconvError(f"{source}: transformers cannot build a {model_type} model from its config "
                                f"({first_line(e)}); calibration supports {', '.join(ROPE_FAMILIES)}") from None
        self.device, self.dtype = torch.device(device), dtype
        self.config = config
        self.base = self.model.base_model
        self.layers = getattr(self.base, "layers", None)
        if self.layers is None or not all(hasattr(layer, "self_attn") for layer in self.layers):
            raise AttnconvError(f"{source}: calibration needs decoder layers with self_attn "
                                f"({', '.join(ROPE_FAMILIES)}), not {model_type}")
        names = {id(m): n for n, m in self.model.named_modules()}
        self.layer_prefix = [names[id(layer)] + "." for layer in self.layers]
        self.embedding = self.model.get_input_embeddings()
        self.embedding_prefix = names[id(self.embedding)] + "."
        self.reader = CheckpointReader(files, fmt)
        check_layers(read_config(folder), list(self.reader.tensors), self.path)
        for module in self.model.modules():  # the real buffers go where the layers run
            for key, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[key] = buf.to(self.device)

    @property
    def inv_freq(self) -> torch.Tensor:
        """The source's RoPE frequencies (its rotary embedding's, scaling included): [rotary_dim / 2]."""
        return self.base.rotary_emb.inv_freq.float().cpu()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden(self) -> int:
        return self.embedding.embedding_dim

    def load(self, module: torch.nn.Module, prefix: str) -> None:
        """Read MODULE's parameters (named PREFIX + their name in the checkpoint) onto the device."""
        state = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if prefix + name not in self.reader.tensors:
                if not tensor.is_meta:
                    continue  # a persistent buffer the checkpoint does not store: keep the computed one
                raise AttnconvError(f"{self.path} has no tensor {prefix + name}; the weights do not match "
                                    f"its config.json ({self.config.model_type})")
            t = self._read(prefix + name)
            state[name] = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
        module.load_state_dict(state, strict=False, assign=True)

    def _read(self, name: str) -> torch.Tensor:
        """One tensor, read straight into its own memory (CheckpointReader.get holds a second copy while reading)."""
        meta = self.reader.tensors[name]
        if self.reader.format != "safetensors" or not meta.nbytes:
            return self.reader.get(name)
        out = torch.empty(meta.shape, dtype=meta.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(meta.file, "rb", buffering=0) as f:
            f.seek(meta.start)
            while view:  # raw reads may return less than asked
                n = f.readinto(view)
                if not n:
                    raise AttnconvError(f"{meta.file} is truncated ({name} is cut short); download or copy it again")
                view = view[n:]
        return finite.source_tensor(name, out, meta.file)

    @staticmethod
    def free(module: torch.nn.Module) -> None:
        module.to("meta")
        release_freed_memory()

    @torch.no_grad()
    def layer_inputs(self, tokens: torch.Tensor, batch: int, tick: Callable[[], None]):
        """The first layer's hidden states for all TOKENS ([n_seq, seq_len, hidden] float32 on the CPU) and the
        keyword arguments every layer receives, per batch size (positions, masks and rotary cos/sin do not
        depend on the tokens)."""
        n_seq, seq_len = tokens.shape
        states = torch.empty(n_seq, seq_len, self.hidden, dtype=torch.float32)
        kwargs_by_size: dict[int, list[dict]] = {}
        self.load(self.embedding, self.embedding_prefix)
        try:
            for start in range(0, n_seq, batch):
                ids = tokens[start:start + batch].to(self.device)
                first, kwargs = self._catch(ids)
                states[start:start + len(ids)] = first.to(torch.float32)
                kwargs_by_size.setdefault(len(ids), kwargs)
                tick()
        finally:
            self.free(self.embedding)
        return states, kwargs_by_size

    def _catch(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        calls: list[dict] = [{} for _ in self.layers]
        first: list[torch.Tensor] = []

        def catcher(i: int):
            def forward(*args, **kwargs):
                hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
                if args[1:]:
                    raise AttnconvError(f"{type(self.layers[i]).__name__} is called with positional arguments "
                                        "besides the hidden states, which calibration does not replay")
                calls[i] = kwargs
                if i == 0:
                    first.append(hidden)
                if i == self.n_layers - 1:
                    raise _Stop
                return hidden

            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = catcher(i)  # an instance attribute: nn.Module.__call__ calls it instead
        try:
            self.base(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for layer in self.layers:
                del layer.forward
        return first[0], calls

    @torch.no_grad()
    def run_layer(self, index: int, states: torch.Tensor, kwargs_by_size: dict[int, list[dict]], batch: int,
                  collectors: list[Collector], tick: Callable[[], None]) -> None:
        """Feed COLLECTORS the attention input of layer INDEX and replace STATES by the layer's output in place
        (not for the last layer: nothing reads its output)."""
        layer = self.layers[index]
        last = index == self.n_layers - 1

        def attention_input(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [b, s, hidden]
            b, s, hidden = x.shape
            flat = x.reshape(b * s, hidden).to(torch.float32)  # [n_tokens, hidden]
            positions = torch.arange(s, device=x.device).repeat(b)  # [n_tokens]: every row starts at 0
            for collector in collectors:
                collector.update(flat, positions)
            if last:
                raise _Stop

        self.load(layer, self.layer_prefix[index])
        handle = layer.self_attn.register_forward_pre_hook(attention_input, with_kwargs=True)
        try:
            for start in range(0, states.shape[0], batch):
                h = states[start:start + batch]
                try:
                    out = layer(h.to(self.device, self.dtype), **kwargs_by_size[len(h)][index])
                except _Stop:
                    tick()
                    continue
                h.copy_((out[0] if isinstance(out, tuple) else out).to(torch.float32))
                tick()
        finally:
            handle.remove()
            self.free(layer)


class _Progress:
    """A rich progress bar that appears only once the run has taken PROGRESS_AFTER_S."""

    def __init__(self, enabled: bool, total: int, n_layers: int):
        self.enabled, self.total, self.n_layers = enabled, total, n_layers
        self.t0, self.done, self.layer, self.bar, self.task = time.perf_counter(), 0, -1, None, None

    def tick(self) -> None:
        self.done += 1
        if self.bar is None and self.enabled and time.perf_counter() - self.t0 > PROGRESS_AFTER_S:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("calibrate"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("calibrate", total=self.total, info="")
            self.bar.start()
        if self.bar is not None:
            info = f"layer {self.layer + 1}/{self.n_layers}" if self.layer >= 0 else "embeddings"
            self.bar.update(self.task, completed=self.done, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def calibrate_layers(source: str | Path, tokens: torch.Tensor, make_collectors: Callable[[int], list[Collector]], *,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     batch_tokens: int = BATCH_TOKENS, progress: bool = True,
                     allow_pickle: bool = False) -> Iterator[tuple[int, list[Collector]]]:
    """Yield (layer_index, collectors) for every decoder layer of SOURCE, in order, after the collectors of that
    layer have seen the attention input of all TOKENS ([n_seq, seq_len] int64, rows starting at position 0).

    The layer is computed in DTYPE on DEVICE and freed before the yield; layer l + 1 is computed only when the
    consumer asks for it, so a conversion can use (and drop) layer l's statistics first. The source is opened
    (and checked) here, before the first `next`.
    """
    model = LayerwiseModel(source, device=device, dtype=dtype, allow_pickle=allow_pickle)
    return run_layers(model, tokens, make_collectors, batch_tokens=batch_tokens, progress=progress)


def run_layers(model: LayerwiseModel, tokens: torch.Tensor, make_collectors: Callable[[int], list[Collector]], *,
               batch_tokens: int = BATCH_TOKENS, progress: bool = True,
               stop: threading.Event | None = None) -> Iterator[tuple[int, list[Collector]]]:
    """calibrate_layers over a LayerwiseModel made by the caller (who may read its config or rotary first).

    stop: once set (the caller was interrupted), the run ends with Cancelled after the batch under way."""
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens must be [n_seq, seq_len] and non-empty, got {tuple(tokens.shape)}")
    return _run(model, tokens, make_collectors, max(1, batch_tokens // tokens.shape[1]), progress, stop)


def _run(model: LayerwiseModel, tokens: torch.Tensor, make_collectors, batch: int, progress: bool,
         stop: threading.Event | None = None):
    n_batches = -(-tokens.shape[0] // batch)
    bar = _Progress(progress, (model.n_layers + 1) * n_batches, model.n_layers)

    def tick() -> None:  # after every batch: a wanted stop is seen within one batch's time
        if stop is not None and stop.is_set():
            raise Cancelled("calibration stopped")
        bar.tick()

    try:
        states, kwargs_by_size = model.layer_inputs(tokens, batch, tick)
        for index in range(model.n_layers):
            bar.layer = index
            collectors = list(make_collectors(index))
            model.run_layer(index, states, kwargs_by_size, batch, collectors, tick)
            yield index, collectors
    finally:
        bar.close()
