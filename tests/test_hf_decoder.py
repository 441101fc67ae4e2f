"""unimrg_fast.hf: the fused RMSNorm / SwiGLU / rotary dropped into Hugging Face decoders.

The fused model is compared with an unpatched copy of itself (same weights): outputs and
every parameter's gradient, in fp32 (tight) and under bf16 autocast (bf16 tolerance), for
Qwen2 and Llama, with and without activation checkpointing. impl="reference" must be the
unpatched model bit for bit, and models that were not fused must stay untouched although
the family's rotary function is wrapped process-wide.
"""
import copy
import importlib

import pytest
import torch

import unimrg_fast as uf
from numerics import assert_rel
from unimrg_fast import backends

LAYERS = 2


def tiny_decoder(family="qwen2", act="silu", seed=0, attention="sdpa"):
    torch.manual_seed(seed)
    if family == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2Model as Model
    else:
        from transformers import LlamaConfig as Config, LlamaModel as Model
    cfg = Config(vocab_size=50, hidden_size=48, intermediate_size=72, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                 max_position_embeddings=64, hidden_act=act, rms_norm_eps=1e-5)
    cfg._attn_implementation = attention
    model = Model(cfg)
    with torch.no_grad():   # norms away from 1, so a kernel that ignores the weight fails
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def run(model, ids, autocast=False):
    """(last hidden state, {name: grad}) of one forward + backward of a fixed gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids).last_hidden_state
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out.dtype))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def assert_same_run(got, want, tol, what):
    assert_rel(got[0].float(), want[0].float(), tol, f"{what}: output")
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert_rel(got[1][name].float(), want[1][name].float(), tol, f"{what}: d {name}")


@pytest.fixture
def ids():
    return torch.randint(0, 50, (1, 13))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_swaps_every_norm_mlp_and_attention_keeping_the_weights(family):
    model = tiny_decoder(family)
    keys = list(model.state_dict())
    counts = uf.hf.fuse_decoder_ops(model, impl="triton")
    assert counts == {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "rotary_embedding": LAYERS}
    assert list(model.state_dict()) == keys
    assert uf.hf.fuse_decoder_ops(model, impl="reference") == counts   # idempotent
    assert uf.hf.set_decoder_impl(model, "triton") == sum(counts.values())


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_reference_is_the_unpatched_model_bit_for_bit(family, ids):
    plain = tiny_decoder(family)
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="reference")
    got, want = run(fused, ids), run(plain, ids)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_triton_matches_the_model_in_fp32(family, ids):
    plain = tiny_decoder(family)
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    assert_same_run(run(fused, ids), run(plain, ids), 1e-5, family)


def test_triton_under_bf16_autocast_returns_bf16_and_matches(ids):
    """Under autocast the fused norm and rotary hand the next matmul bf16 directly."""
    plain = tiny_decoder()
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    seen = {}
    fused.layers[0].input_layernorm.register_forward_hook(
        lambda mod, args, out: seen.update(norm=out.dtype))   # None: keeps the output
    got, want = run(fused, ids, autocast=True), run(plain, ids, autocast=True)
    assert_same_run(got, want, 3e-2, "bf16 autocast")
    assert seen["norm"] == torch.bfloat16
    # the decoder's final norm gives the model's output: its dtype is the model's own
    assert got[0].dtype == want[0].dtype == torch.float32


def test_activation_checkpointing_recomputes_with_the_fused_ops(ids):
    plain = tiny_decoder()
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    enable = getattr(fused, "activation_checkpointing_enable", None) or \
        fused.gradient_checkpointing_enable   # transformers 5 renamed it
    enable({"use_reentrant": False})
    fused.train()
    plain.train()
    assert_same_run(run(fused, ids), run(plain, ids), 1e-5, "checkpointed")


def test_the_fused_kernels_run_and_only_in_fused_models(ids, monkeypatch):
    """Each op's Triton path runs as often as the decoder has such modules (q and k each
    take one rotary call), and never for a model that was not fused, although the
    family's rotary function is wrapped process-wide."""
    other = tiny_decoder(seed=3)
    before = run(other, ids)
    fused = tiny_decoder()
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    calls = {"rms_norm": 0, "swiglu": 0, "rotary": 0}
    for name in calls:
        module = importlib.import_module(f"unimrg_fast.ops.{name}")
        real = module._triton

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(module, "_triton", spy)
    monkeypatch.setattr(backends, "_loaded", {})   # resolve loads the spies, then forgets them
    after = run(other, ids)
    assert calls == {"rms_norm": 0, "swiglu": 0, "rotary": 0}
    assert torch.equal(after[0], before[0])
    run(fused, ids)
    assert calls == {"rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "rotary": 2 * LAYERS}


def test_set_impl_switches_back_and_forth(ids):
    plain = tiny_decoder()
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    want = run(plain, ids)
    uf.hf.set_decoder_impl(fused, "reference")
    assert torch.equal(run(fused, ids)[0], want[0])
    uf.hf.set_decoder_impl(fused, "triton")
    assert_same_run(run(fused, ids), want, 1e-5, "switched back")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_fused_model_pickles_and_loads_in_a_fresh_process(family, ids, tmp_path):
    """The fused classes are made at run time; pickle finds them by name in unimrg_fast.hf
    (torch.save of a whole model, multiprocessing). A fresh process that has fused
    nothing loads one and runs it with the fused kernels."""
    import pickle
    import subprocess
    import sys

    fused = tiny_decoder(family)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    want = run(fused, ids)[0]
    back = pickle.loads(pickle.dumps(fused))
    assert type(back.norm) is type(fused.norm)
    assert torch.equal(run(back, ids)[0], want)
    torch.save({"model": fused, "ids": ids, "want": want}, tmp_path / "model.pt")
    script = ("import torch, unimrg_fast.backends as b\n"
              f"d = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
              "m = d['model']\n"
              "assert type(m.norm).__name__.startswith('Fused'), type(m.norm)\n"
              "out = m(input_ids=d['ids']).last_hidden_state\n"
              "assert torch.equal(out.detach(), d['want']), (out - d['want']).abs().max()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(AttributeError, match="has no attribute 'FusedQwen2Nothing'"):
        uf.hf.FusedQwen2Nothing


def test_a_non_silu_mlp_keeps_its_own_code():
    model = tiny_decoder(act="gelu")
    counts = uf.hf.fuse_decoder_ops(model, impl="triton")
    assert counts["swiglu"] == 0 and counts["rms_norm"] == 2 * LAYERS + 1


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="found no RMSNorm, MLP or attention module of a "
                                         "qwen2 / llama decoder in Linear"):
        uf.hf.fuse_decoder_ops(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="impl must be one of auto, triton, reference"):
        uf.hf.fuse_decoder_ops(tiny_decoder(), impl="fast")
    with pytest.raises(ValueError, match="impl must be one of"):
        uf.hf.set_decoder_impl(tiny_decoder(), "flash")


def test_an_activation_swapped_or_hooked_after_fusing_is_honoured(ids):
    """The fused SwiGLU never calls act_fn: swapped after fusing (ReLU-fication, ablation)
    or hooked (steering, recording), the MLP must run the model's own code."""
    from transformers.activations import ACT2FN

    plain = tiny_decoder()
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    for model in (plain, fused):
        model.layers[0].mlp.act_fn = ACT2FN["relu"]
    assert_same_run(run(fused, ids), run(plain, ids), 1e-5, "relu swapped in")
    plain, fused = tiny_decoder(), tiny_decoder()
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    seen = []

    def halve(module, args, out):
        seen.append(module)
        return out * 0.5

    for model in (plain, fused):
        model.layers[1].mlp.act_fn.register_forward_hook(halve)
    assert_same_run(run(fused, ids), run(plain, ids), 1e-5, "act_fn hooked")
    assert len(seen) == 2
    plain, fused = tiny_decoder(), tiny_decoder()
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    grads = []
    for model in (plain, fused):
        model.layers[0].mlp.act_fn.register_full_backward_hook(
            lambda module, grad_in, grad_out: grads.append(module))
    run(plain, ids)
    run(fused, ids)
    assert len(grads) == 2, "a backward hook on act_fn must fire in the fused model too"


def test_one_dimensional_position_ids_keep_the_models_meaning():
    # 1-D position_ids give [T, D] tables, which HF broadcasts against the head axis; with
    # T == heads (4) the fused rotary read them per token instead, a different answer
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    plain = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4))   # HF's broadcast needs T == heads
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    ids, positions = torch.randint(0, 50, (1, 4)), torch.arange(4)
    with torch.no_grad():
        want = plain(input_ids=ids, position_ids=positions).last_hidden_state
        got = fused(input_ids=ids, position_ids=positions).last_hidden_state
    assert_rel(got, want, 1e-5, "1-D position_ids")


def test_a_graph_break_in_the_attention_keeps_the_fused_rotary_compiled(ids, monkeypatch):
    """A break inside the attention (a .item() in an unpadding, say) made Dynamo run the
    wrapper eagerly (it cannot resume inside a try / finally) and compile the inner
    forward as a frame of its own, which saw no fused impl: the HF rotary, silently."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def broken_attention(*args, **kwargs):
        torch._dynamo.graph_break()
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("unimrg_test_graph_break", broken_attention)
    rotary = importlib.import_module("unimrg_fast.ops.rotary")
    calls = []
    real = rotary._rotate
    monkeypatch.setattr(rotary, "_rotate", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = tiny_decoder()
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    for model in (plain, fused):
        model.config._attn_implementation = "unimrg_test_graph_break"
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = fused(input_ids=ids).last_hidden_state
            eager_calls, calls[:] = len(calls), []
            got = torch.compile(fused, backend="aot_eager")(input_ids=ids).last_hidden_state
            assert len(calls) == eager_calls == 2 * LAYERS, (len(calls), eager_calls)
            assert_rel(got, want, 1e-6, "compiled with a graph break")
            calls[:] = []   # the unfused model next to it keeps the HF rotary
            torch.compile(plain, backend="aot_eager")(input_ids=ids)
            assert calls == [] and uf.hf._traced_rotary_impls == []
    finally:
        torch._dynamo.reset()


def test_float64_calls_take_the_reference_under_auto():
    rms_norm = importlib.import_module("unimrg_fast.ops.rms_norm")
    assert backends.kernel_dtype(dtype=torch.float64) is not None
    assert backends.kernel_dtype(dtype=torch.float32) is None
    assert rms_norm.triton_accepts(hidden=64, dtype=torch.float64) is not None
    for op in ("swiglu", "rotary_embedding"):
        [triton] = [i for i in backends.implementations(op) if i.name == "triton"]
        assert triton.accepts(dtype=torch.float64) is not None, op


def test_fullgraph_compile_of_fused_and_unfused_models(ids):
    """The rotary wrapper is process-wide: it must stay traceable by Dynamo for every
    Qwen2 / Llama model once one is fused (a ContextVar is not)."""
    plain = tiny_decoder()
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="triton")
    with torch.no_grad():
        for model in (plain, fused):
            torch._dynamo.reset()
            want = model(input_ids=ids).last_hidden_state
            got = torch.compile(model, backend="aot_eager", fullgraph=True)(
                input_ids=ids).last_hidden_state
            assert_rel(got, want, 1e-6, type(model.norm).__name__)
    torch._dynamo.reset()


def test_forward_mode_derivatives_take_the_models_own_code(ids, monkeypatch):
    """torch.func.jvp through a fused model: auto (here made to prefer the kernels, as on
    a GPU) gives the unfused model's tangent, not a silent zero; an explicit triton
    refuses."""
    import dataclasses

    monkeypatch.setattr(backends, "_TABLE", [dataclasses.replace(i, prefer=None)
                                             for i in backends._TABLE])
    plain = tiny_decoder(attention="eager")   # SDPA on a CPU has no forward-mode rule
    fused = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(fused, impl="auto")
    embeds = plain.embed_tokens(ids).detach()
    tangent = torch.randn_like(embeds)
    _, want = torch.func.jvp(lambda e: plain(inputs_embeds=e).last_hidden_state,
                             (embeds,), (tangent,))
    _, got = torch.func.jvp(lambda e: fused(inputs_embeds=e).last_hidden_state,
                            (embeds,), (tangent,))
    assert_rel(got, want, 1e-5, "jvp")
    uf.hf.set_decoder_impl(fused, "triton")
    with pytest.raises(ValueError, match="torch.func derivative transform"):
        torch.func.jvp(lambda e: fused(inputs_embeds=e).last_hidden_state, (embeds,), (tangent,))


def _backwards_rotation(original):
    """A variant's rotary: the other way round."""
    return lambda q, k, cos, sin, unsqueeze_dim=1: original(q, k, cos, -sin, unsqueeze_dim)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_family_code_patched_before_or_after_fusing_runs(family, ids, monkeypatch):
    """A variant patched into the modeling file (its rotary, a class's forward) is what
    the model computes: fusing must neither replace it nor, fusing another model later,
    wrap it away."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    norm_cls = getattr(modeling, {"qwen2": "Qwen2", "llama": "Llama"}[family] + "RMSNorm")
    plain = tiny_decoder(family)
    before_patch = copy.deepcopy(plain)
    uf.hf.fuse_decoder_ops(before_patch, impl="triton")
    variant = _backwards_rotation(modeling.apply_rotary_pos_emb.unimrg_fast_original)
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", variant)
    own_norm = norm_cls.forward
    monkeypatch.setattr(norm_cls, "forward", lambda self, x: own_norm(self, x) * 2)
    want = run(plain, ids)
    fused = copy.deepcopy(plain)
    counts = uf.hf.fuse_decoder_ops(fused, impl="triton")   # patched before fusing
    assert counts == {"rms_norm": 0, "swiglu": LAYERS, "rotary_embedding": 0}
    assert modeling.apply_rotary_pos_emb is variant           # not wrapped
    assert_same_run(run(fused, ids), want, 1e-5, "patched before fusing")
    assert_same_run(run(before_patch, ids), want, 1e-5, "patched after fusing")
    counts = uf.hf.fuse_decoder_ops(before_patch, impl="triton")   # fused again: not counted
    assert counts == {"rms_norm": 0, "swiglu": LAYERS, "rotary_embedding": 0}
    monkeypatch.undo()   # the family's own code again: fused again
    assert uf.hf.fuse_decoder_ops(fused, impl="triton") == {
        "rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS, "rotary_embedding": LAYERS}
    assert_same_run(run(fused, ids), run(plain, ids), 1e-5, "unpatched")
