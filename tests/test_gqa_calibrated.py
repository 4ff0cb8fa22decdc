"""Calibrated GQA/MQA methods (grouped, aligned, fit) on tiny real HF models, against transformers' own forward.

Lossless cases are built so that an exact answer exists (equal heads, rotated copies, shuffled groups) and
compared logit for logit; the least-squares objective is recomputed here from the weights, independently of
the Gram-matrix shortcuts the methods use.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnconv.convert.gqa.calibrated import arrange_layer, calibrated_steps, convert_layer
from attnconv.convert.gqa.calibration import InputMomentCollector, attended_collectors, collect_with_hooks
from attnconv.convert.gqa.grouping import best_grouping, count_groupings
from attnconv.convert.gqa.heads import AttentionWeights
from attnconv.convert.gqa.methods import parse_method
from attnconv.convert.gqa.pool import convert_kv_proj
from attnconv.convert.gqa.state_dict import attention_layers, with_attention_layers
from attnconv.errors import AttnconvError
from attnconv.families import ROPE_FAMILIES
from attnconv.model_shape import HeadLayout
from attnconv.testing import build_tiny_model

FAMILIES = ROPE_FAMILIES
IDS = torch.randint(0, 250, (2, 13), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 250, (4, 48), generator=torch.Generator().manual_seed(1))
RIDGE = 1e-3
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only synchronise


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa_cal")
    models = {f: build_tiny_model(f, root / f, seed=3, n_heads=8, hidden=64) for f in FAMILIES}
    models["llama-gqa"] = build_tiny_model("llama", root / "gqa", seed=4, n_heads=8, n_kv_heads=4, hidden=64)
    return models


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def moments(model) -> list[torch.Tensor]:
    hidden = model.config.hidden_size
    return [c.result() for c in collect_with_hooks(model, [CALIB], lambda i: InputMomentCollector(hidden))]


def attended(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(S, A) per layer: input and attended second moments."""
    return [c.result() for c in collect_with_hooks(model, [CALIB], attended_collectors(model))]


def with_layers(model, layers: list[AttentionWeights]):
    """A model of the same config (KV heads from the layers) holding the given attention layers."""
    config = copy.deepcopy(model.config)
    config.num_key_value_heads = layers[0].n_kv_heads
    new = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    new.load_state_dict(with_attention_layers(model.state_dict(), layers))
    return new


def convert_model(model, n_out, methods, stats=None, **kw):
    """stats: per layer S, or (S, A) to use the attended metric."""
    stats = [s if isinstance(s, tuple) else (s, None) for s in (moments(model) if stats is None else stats)]
    out = [convert_layer(layer, s, n_out, methods, attended_moment=a, ridge=RIDGE, **kw)
           for layer, (s, a) in zip(attention_layers(model.state_dict(), model.config), stats, strict=True)]
    return with_layers(model, [layer for layer, _ in out]), [r for _, r in out]


def max_diff(a, b) -> float:
    return (logits(a) - logits(b)).abs().max().item()


def pairs(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """[n * d, ...] -> [n, d/2, ...] complex rotate_half pairs."""
    w = w.double().reshape(n, d, *w.shape[1:])
    return torch.complex(w[:, :d // 2], w[:, d // 2:])


def unpairs(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=1).reshape(-1, *z.shape[2:]).float()


def restructure(model, group: int, kind: str, seed: int = 0, perm: list[int] | None = None):
    """A source whose KV heads, in each contiguous group of `group`, are copies of the group's first head:
    equal ("equal") or rotated ("rotated": a random orthogonal map per value head, a random rotation per RoPE
    pair and key head, only on pairs whose rotation commutes with Qwen3's q/k norms). `perm` then reorders
    the KV heads with their query heads and o_proj columns, which leaves the function unchanged."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for layer in attention_layers(model.state_dict(), model.config):
        n, d, g = layer.n_kv_heads, layer.head_dim, layer.n_heads // layer.n_kv_heads
        rot_ok = torch.ones(d // 2, dtype=torch.bool)
        for norm in (layer.q_norm, layer.k_norm):
            if norm is not None:
                rot_ok &= norm[:d // 2] == norm[d // 2:]
        kc, vs = pairs(layer.k, n, d), layer.v.double().reshape(n, d, -1)
        kb = pairs(layer.k_bias, n, d) if layer.k_bias is not None else None
        vb = layer.v_bias.double().reshape(n, d) if layer.v_bias is not None else None
        for j in range(n):
            ref = j - j % group
            angle = torch.rand(d // 2, generator=gen, dtype=torch.float64) * 2 * math.pi * (kind == "rotated")
            phase = torch.polar(torch.ones_like(angle), angle * rot_ok)
            r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0] if kind == "rotated" \
                else torch.eye(d, dtype=torch.float64)
            kc[j], vs[j] = phase[:, None] * kc[ref], r @ vs[ref]
            if kb is not None:
                kb[j], vb[j] = phase * kb[ref], r @ vb[ref]
        perm = perm or list(range(n))
        q_perm = [j * g + i for j in perm for i in range(g)]
        heads_q = layer.q.reshape(layer.n_heads, d, -1)[q_perm].reshape(layer.q.shape)
        o = layer.o.reshape(layer.hidden, layer.n_heads, d)[:, q_perm].reshape(layer.o.shape)
        bias = {}
        if kb is not None:
            bias = dict(q_bias=layer.q_bias.reshape(layer.n_heads, d)[q_perm].reshape(-1),
                        k_bias=unpairs(kb[perm][..., None]).squeeze(-1), v_bias=vb[perm].reshape(-1).float())
        layers.append(AttentionWeights(replace(layer.shape, n_kv_heads=n), heads_q, unpairs(kc[perm]),
                                       vs[perm].reshape(n * d, -1).float(), o, q_norm=layer.q_norm,
                                       k_norm=layer.k_norm, **bias))
    return with_layers(model, layers)


def half_symmetric_norms(model):
    """Qwen3: make half of the RoPE pairs' q/k norm weights pair-symmetric (those pairs may rotate exactly)."""
    sd = model.state_dict()
    for name, t in sd.items():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            h = t.shape[0] // 2
            t[h:h + h // 2] = t[:h // 2]
    model.load_state_dict(sd)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_heads_convert_losslessly(sources, family):
    for n_out in (2, 1):
        src = restructure(load(sources[family]), 8 // n_out, "equal")
        stats = moments(src)
        for methods in ("mean", "grouped", "aligned", "fit", "grouped+aligned+fit"):
            got, _ = convert_model(src, n_out, methods, stats)
            assert max_diff(src, got) <= 1e-5, methods


@pytest.mark.parametrize("family", [*FAMILIES, "llama-gqa"])
def test_rotated_copies_convert_losslessly_with_aligned_and_fit_not_mean(sources, family):
    model = load(sources[family])
    if family == "qwen3":
        model = half_symmetric_norms(model)
    group = 2 if family == "llama-gqa" else 4  # GQA source: 4 KV heads of 2 query heads each
    src = restructure(model, group, "rotated", seed=5)
    stats, both = moments(src), attended(src)
    for methods in ("aligned", "fit", "aligned+fit"):
        got, records = convert_model(src, 2, methods, stats)
        assert max_diff(src, got) <= 1e-5, methods
    got, _ = convert_model(src, 2, "grouped+fit", both)  # the attended metric keeps exact cases exact
    assert max_diff(src, got) <= 1e-5
    mean, _ = convert_model(src, 2, "mean", stats)
    assert max_diff(src, mean) > 1e-2
    if family == "qwen3":
        assert records[0]["alignment"]["rotatable_pairs"] == 2  # of 4: the symmetric half only


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_unshuffles_shuffled_heads(sources, family):
    perm = [0, 4, 1, 5, 2, 6, 3, 7]  # groups {0,1},{2,3},.. land on positions {0,2},{4,6},{1,3},{5,7}
    src = restructure(load(sources[family]), 2, "equal", perm=perm)
    stats = moments(src)
    got, records = convert_model(src, 4, "grouped", stats)
    assert records[0]["groups"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert records[0]["grouping"]["cost_chosen"] < 1e-9 < records[0]["grouping"]["cost_contiguous"]
    assert max_diff(src, got) <= 1e-5
    mean, _ = convert_model(src, 4, "mean", stats)
    assert max_diff(src, mean) > 1e-2


@pytest.mark.parametrize("family", [*FAMILIES, "llama-gqa"])
def test_arranging_heads_keeps_the_function(sources, family):
    """grouped + aligned before the merge only permute and rotate: every family's logits stay (Qwen3 with
    asymmetric norms rotates only its values; with half-symmetric norms half of its key pairs too)."""
    model = load(sources[family])
    variants = [model, half_symmetric_norms(load(sources[family]))] if family == "qwen3" else [model]
    for src in variants:
        stats = moments(src)
        for n_out in (src.config.num_key_value_heads // 2, 1):  # groups of 2, then one (groups of 4: 20x slower)
            out = [arrange_layer(layer, s, n_out, "grouped+aligned", ridge=RIDGE)
                   for layer, s in zip(attention_layers(src.state_dict(), src.config), stats, strict=True)]
            angles = max(abs(a) for _, r in out for head in r["alignment"]["key_angles"] for a in head)
            assert angles > 0.1 if out[0][1]["alignment"]["rotatable_pairs"] else angles == 0
            assert max_diff(src, with_layers(src, [layer for layer, _ in out])) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-gqa"])
def test_keeping_every_kv_head_is_lossless(sources, family):
    src = load(sources[family])
    n_kv = src.config.num_key_value_heads
    stats = attended(src)
    for methods in ("grouped+aligned+fit", "aligned", "fit"):
        got, records = convert_model(src, n_kv, methods, stats)
        assert max_diff(src, got) <= 1e-5, methods
        assert records[0]["groups"] == [[j] for j in range(n_kv)]


def objectives(src: AttentionWeights, new: AttentionWeights, s: torch.Tensor, query_order: list[int],
               s_kv: torch.Tensor | None = None):
    """Relative key/value objectives from the weights, by the definition: per query head and RoPE pair the
    rotation-averaged squared logit error with query and key tokens drawn independently, and per query head
    the squared output error through o_proj: queries under the second moment s of x~ = [x; 1], keys and values
    under s_kv (default s)."""
    def ridged(m):
        return (m + RIDGE * m.diagonal().mean() * torch.eye(len(m), dtype=m.dtype)).to(torch.complex128)

    s, s_kv = ridged(s), ridged(s if s_kv is None else s_kv)
    d, g_src, g_new = src.head_dim, src.n_heads // src.n_kv_heads, new.n_heads // new.n_kv_heads

    def aug(w, b, n):
        b = torch.zeros(w.shape[0]) if b is None else b
        return torch.cat([w, b[:, None]], 1).double().reshape(n, d, -1)

    def inner(a, b, m=s):  # E[(a x~) conj(b x~)] per pair
        return torch.einsum("pa,ab,pb->p", a, m, b.conj())

    qs, ks, vs = (aug(src.q, src.q_bias, src.n_heads), aug(src.k, src.k_bias, src.n_kv_heads),
                  aug(src.v, src.v_bias, src.n_kv_heads))
    qn, kn, vn = (aug(new.q, new.q_bias, new.n_heads), aug(new.k, new.k_bias, new.n_kv_heads),
                  aug(new.v, new.v_bias, new.n_kv_heads))
    os_ = src.o.double().reshape(-1, src.n_heads, d)
    on = new.o.double().reshape(-1, new.n_heads, d)
    key_err = key_energy = value_err = value_energy = 0.0
    for h_new, h in enumerate(query_order):
        zq, zk = torch.complex(qs[h, :d // 2], qs[h, d // 2:]), torch.complex(ks[h // g_src, :d // 2],
                                                                            ks[h // g_src, d // 2:])
        wq, wk = torch.complex(qn[h_new, :d // 2], qn[h_new, d // 2:]), torch.complex(kn[h_new // g_new, :d // 2],
                                                                                    kn[h_new // g_new, d // 2:])
        ref = inner(zq, zq) * inner(zk, zk, s_kv)
        key_err += (ref + inner(wq, wq) * inner(wk, wk, s_kv) - 2 * inner(zq, wq) * inner(wk, zk, s_kv)).real.sum()
        key_energy += ref.real.sum()
        m_src = (os_[:, h] @ vs[h // g_src]).to(s.dtype)
        m_new = (on[:, h_new] @ vn[h_new // g_new]).to(s.dtype)
        value_err += torch.trace((m_src - m_new) @ s_kv @ (m_src - m_new).T).real
        value_energy += torch.trace(m_src @ s_kv @ m_src.T).real
    return float(key_err / key_energy), float(value_err / value_energy)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fit_never_ends_above_its_start_on_its_objective(sources, family):
    src = load(sources[family])
    stats = moments(src)
    for n_out in (4, 2, 1):
        for layer, s in zip(attention_layers(src.state_dict(), src.config), stats, strict=True):
            mean, _ = convert_layer(layer, s, n_out, "mean")
            aligned, rec_a = convert_layer(layer, s, n_out, "aligned", ridge=RIDGE)
            fit, rec_f = convert_layer(layer, s, n_out, "aligned+fit", ridge=RIDGE)
            order = list(range(layer.n_heads))
            k_mean, v_mean = objectives(layer, mean, s, order)
            k_al, v_al = objectives(layer, aligned, s, order)
            k_fit, v_fit = objectives(layer, fit, s, order)
            assert rec_f["objective"]["mean"] == pytest.approx({"keys": k_mean, "values": v_mean}, rel=1e-6)
            assert rec_f["objective"]["final"] == pytest.approx({"keys": k_fit, "values": v_fit}, rel=1e-6)
            assert rec_a["objective"]["final"] == pytest.approx({"keys": k_al, "values": v_al}, rel=1e-6)
            assert k_fit <= k_al * (1 + 1e-9) and v_fit <= v_al * (1 + 1e-9)
            assert k_al <= k_mean * (1 + 1e-9) and v_al <= v_mean * (1 + 1e-9)


def test_grouped_objective_with_the_attended_metric_matches_the_definition(sources):
    src = load(sources["llama"])
    layer, (s, a) = attention_layers(src.state_dict(), src.config)[0], attended(src)[0]
    new, rec = convert_layer(layer, s, 2, "grouped+fit", attended_moment=a, ridge=RIDGE)
    assert rec["key_value_metric"] == "attended"
    keys, values = objectives(layer, new, s, rec["query_order"], a)
    assert rec["objective"]["final"] == pytest.approx({"keys": keys, "values": values}, rel=1e-6)


def test_deterministic_for_a_seed(sources):
    src = load(sources["qwen2"])
    stats = moments(src)
    runs = [convert_model(src, 2, "grouped+aligned+fit", stats, seed=7) for _ in range(2)]
    assert json.dumps(runs[0][1]) == json.dumps(runs[1][1])
    for a, b in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_mean_is_gqa_mean_and_contiguous_grouping_is_exactly_the_mean(sources):
    src = load(sources["qwen2"])
    layer = attention_layers(src.state_dict(), src.config)[0]
    layout = HeadLayout(8, 8, 8, 64, 2)
    new, rec = convert_layer(layer, None, 2, "mean")
    assert rec["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    torch.testing.assert_close(new.k, convert_kv_proj(layer.k, layout, 2, parse_method("mean")), rtol=0, atol=1e-7)
    torch.testing.assert_close(new.v_bias, convert_kv_proj(layer.v_bias, layout, 2, parse_method("mean")), rtol=0,
                               atol=1e-7)
    equal = restructure(src, 4, "equal")  # contiguous groups are then free: grouping keeps them
    layer = attention_layers(equal.state_dict(), equal.config)[0]
    grouped, rec = convert_layer(layer, moments(equal)[0], 2, "grouped")
    mean, _ = convert_layer(layer, None, 2, "mean")
    assert rec["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for a, b in zip((grouped.q, grouped.k, grouped.v, grouped.o), (mean.q, mean.k, mean.v, mean.o), strict=True):
        assert torch.equal(a, b)


def test_grouping_search_finds_planted_groups():
    """Enumeration (8 heads) and local search (16 heads in 4s: 2.6M groupings) find planted clusters of heads."""
    gen = torch.Generator().manual_seed(0)
    for n, size in ((8, 2), (16, 4)):
        planted = torch.randperm(n, generator=gen).tolist()
        centres = torch.randn(n // size, 3, generator=gen, dtype=torch.float64) * 10
        points = torch.empty(n, 3, dtype=torch.float64)
        for i, h in enumerate(planted):
            points[h] = centres[i // size] + torch.randn(3, generator=gen, dtype=torch.float64)

        def spread(group, points=points):
            x = points[list(group)]
            return float(((x - x.mean(0)) ** 2).sum())

        groups, rec = best_grouping(n, size, spread, seed=0)
        assert sorted(map(sorted, groups)) == sorted(sorted(planted[i:i + size]) for i in range(0, n, size))
        assert rec["search"].startswith("exhaustive" if count_groupings(n, size) <= 20_000 else "local")
        assert rec["cost_chosen"] < rec["cost_contiguous"]


def test_collector_and_hooks_see_the_attention_input(sources):
    model = load(sources["llama"])
    (collector, *_) = collect_with_hooks(model, [CALIB], lambda i: InputMomentCollector(64))
    with torch.no_grad():
        h0 = model(CALIB, output_hidden_states=True).hidden_states[0]
        x = model.model.layers[0].input_layernorm(h0).reshape(-1, 64).double()
    xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    assert collector.n_tokens == CALIB.numel()
    torch.testing.assert_close(collector.result(), xs.T @ xs / len(xs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", [*FAMILIES, "llama-gqa"])
def test_attended_moment_matches_transformers_attention(sources, family):
    """A = sum over heads, queries and keys of p_hmn x~_n x~_n^T / (heads x queries), from transformers' own eager
    attention weights; Mistral with a sliding window shorter than the sequence."""
    model = AutoModelForCausalLM.from_pretrained(sources[family], dtype=torch.float32, attn_implementation="eager")
    if family == "mistral":
        model.config.sliding_window = 8
    got = attended(model.eval())
    with torch.no_grad():
        out = model(CALIB, output_hidden_states=True, output_attentions=True)
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            x = layer.input_layernorm(out.hidden_states[i]).double()  # [b, t, hidden]
        xs = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=x.dtype)], -1)
        received = out.attentions[i].double().sum((1, 2))  # [b, t]
        want = torch.einsum("bn,bnk,bnl->kl", received, xs, xs) / out.attentions[i][:, :, :, 0].numel()
        torch.testing.assert_close(got[i][1], want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got[i][0], torch.einsum("bnk,bnl->kl", xs, xs) / CALIB.numel(), rtol=1e-5,
                                   atol=1e-6)


def test_bad_method_names_and_missing_statistics_are_refused(sources):
    for bad in ("mean+fit", "fit+fit", "pca", ""):  # the one grammar of --method
        with pytest.raises(AttnconvError, match="is not a method"):
            calibrated_steps(bad)
    assert calibrated_steps("fit+grouped") == ("grouped", "fit") == parse_method("grouped+fit").steps
    with pytest.raises(AttnconvError, match="one tensor at a time"):
        calibrated_steps("first")
    layer = attention_layers(load(sources["llama"]).state_dict(), load(sources["llama"]).config)[0]
    with pytest.raises(AttnconvError, match="calibration statistics"):
        convert_layer(layer, None, 2, "fit")
    with pytest.raises(AttnconvError, match="do not divide"):
        convert_layer(layer, None, 3, "mean")
