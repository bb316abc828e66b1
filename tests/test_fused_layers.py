"""The fused CPU kernels of the encoder layer's elementwise parts: residual add + dropout + layer norm
(BertSelfOutput, BertOutput) and bias + GELU (BertIntermediate), each against PyTorch's autograd as
the oracle, with its hand-derived reference in minift.functional. Seeded, irregular shapes."""
import pytest
import torch
import torch.nn.functional as F

from minift import functional as RF
from minift import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="minift._C is not built")

SHAPES = [(3, 7, 45), (2, 5, 384), (1, 1, 8), (13, 33)]        # (..., H): H off the vector width, and MiniLM's


def rnd(*shape, seed=0, dtype=torch.float64, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def keep_mask(shape, p, seed):
    """The keep mask the kernels draw for (seed, offset 0): the bits of dropout_fwd's stream."""
    return torch.ops.minift.dropout_fwd(torch.zeros(shape), p, seed, 0)[1]


def ln_inputs(shape, dtype):
    H = shape[-1]
    return [rnd(*shape, seed=1, dtype=dtype), rnd(*shape, seed=2, dtype=dtype, shift=0.5),
            rnd(H, seed=3, dtype=dtype, scale=0.3, shift=1.0), rnd(H, seed=4, dtype=dtype)]


def oracle_add_layer_norm(y, x, w, b, keep, p, eps=1e-12):
    z = (torch.where(keep, y / (1 - p), torch.zeros_like(y)) if p > 0 else y) + x
    return F.layer_norm(z, (y.shape[-1],), w, b, eps)


def compiled_add_layer_norm(y, x, w, b, p, seed, eps=1e-12):
    return torch.ops.minift.add_layer_norm_fwd(y, x, w, b, eps, p, seed, 0)[0]


def out_and_grads(fn, inputs, dout):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    return [out.detach()] + list(torch.autograd.grad(out, inputs, dout))


# ------------------------------------------------------------------------------------------
# residual add + dropout + layer norm
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_add_layer_norm_fp32_equals_torch(shape, p):
    inputs = ln_inputs(shape, torch.float32)
    keep = keep_mask(shape, p, seed=11)
    dout = rnd(*shape, seed=5, dtype=torch.float32)
    ours = out_and_grads(lambda y, x, w, b: compiled_add_layer_norm(y, x, w, b, p, 11), inputs, dout)
    want = out_and_grads(lambda y, x, w, b: oracle_add_layer_norm(y, x, w, b, keep, p), inputs, dout)
    for name, a, e in zip(["out", "dy", "dx", "dweight", "dbias"], ours, want):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_add_layer_norm_gradcheck_float64(p):
    y, x, w, b = (t.requires_grad_() for t in ln_inputs((2, 3, 7), torch.float64))
    keep = keep_mask((2, 3, 7), p, seed=5) if p > 0 else None
    assert torch.autograd.gradcheck(lambda *a: compiled_add_layer_norm(*a, p, 5, eps=1e-5), (y, x, w, b))
    assert torch.autograd.gradcheck(lambda *a: RF.AddLayerNorm.apply(*a, keep, p, 1e-5), (y, x, w, b))
    assert torch.autograd.gradgradcheck(lambda *a: RF.AddLayerNorm.apply(*a, keep, p, 1e-5), (y, x, w, b))


def test_add_layer_norm_reference_equals_torch():
    inputs, p = ln_inputs((4, 9, 21), torch.float64), 0.25
    keep, dout = keep_mask((4, 9, 21), p, seed=3), rnd(4, 9, 21, seed=6)
    ours = out_and_grads(lambda *a: RF.AddLayerNorm.apply(*a, keep, p, 1e-12), inputs, dout)
    want = out_and_grads(lambda *a: oracle_add_layer_norm(*a, keep, p), inputs, dout)
    for a, e in zip(ours, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_add_layer_norm_draws_the_dropout_stream():
    """The fused dropout is dropout_fwd's: the same keep mask for the same seed; about 1 - p kept."""
    y, x, w, b = ln_inputs((6, 10, 384), torch.float32)
    _, z, mean, rstd, keep = torch.ops.minift.add_layer_norm_fwd(y, x, w, b, 1e-12, 0.1, 42, 0)
    assert torch.equal(keep, keep_mask(y.shape, 0.1, seed=42))
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    torch.testing.assert_close(z, torch.where(keep, y / 0.9, 0.0) + x)
    assert mean.shape == rstd.shape == (6, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_layer_norm_within_2x_torch(dtype):
    """Output and gradients against float64: at most twice the error of PyTorch's own ops in dtype
    (float32 too: its forward computed in float32 carried 1.5x PyTorch's error, 2.2x with a float16 y)."""
    shape, p = (3, 11, 384), 0.1
    inputs, keep, dout = ln_inputs(shape, torch.float64), keep_mask(shape, p, seed=8), rnd(*shape, seed=9)
    want = out_and_grads(lambda *a: oracle_add_layer_norm(*a, keep, p), inputs, dout)
    low = [t.to(dtype) for t in inputs]
    ours = out_and_grads(lambda *a: compiled_add_layer_norm(*a, p, 8), low, dout.to(dtype))
    theirs = out_and_grads(lambda *a: oracle_add_layer_norm(*a, keep, p), low, dout.to(dtype))
    for name, a, t, e in zip(["out", "dy", "dx", "dweight", "dbias"], ours, theirs, want):
        assert a.dtype == dtype, name
        err, base = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * base, (name, err, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_add_layer_norm_autocast_dtypes_within_2x_torch(dtype, p):
    """As autocast hands them over: y from a bf16/fp16 matmul, the float32 residual x and parameters.
    The kernel reads y's row in float32; out is float32 (the promoted dtype, as PyTorch's ops give),
    dy in y's dtype, the rest float32, each within twice the error of PyTorch's ops on the same mixed
    inputs, against float64 from those same (already rounded) inputs."""
    shape = (3, 11, 384)
    y, x, w, b = ln_inputs(shape, torch.float64)
    mixed = [y.to(dtype), x.float(), w.float(), b.float()]
    keep, dout = keep_mask(shape, p, seed=8), rnd(*shape, seed=9, dtype=torch.float32)
    want = out_and_grads(lambda *a: oracle_add_layer_norm(*a, keep, p), [t.double() for t in mixed], dout.double())
    ours = out_and_grads(lambda *a: compiled_add_layer_norm(*a, p, 8), mixed, dout)
    theirs = out_and_grads(lambda *a: oracle_add_layer_norm(*a, keep, p), mixed, dout)
    for name, a, t, e, dt in zip(["out", "dy", "dx", "dweight", "dbias"], ours, theirs, want,
                                 [torch.float32, dtype, torch.float32, torch.float32, torch.float32]):
        assert a.dtype == t.dtype == dt, (name, a.dtype, t.dtype)
        err, base = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * base, (name, err, base)


# ------------------------------------------------------------------------------------------
# bias + GELU
# ------------------------------------------------------------------------------------------

def gelu_inputs(shape, dtype):
    return [rnd(*shape, seed=1, dtype=dtype, scale=2.0), rnd(shape[-1], seed=2, dtype=dtype)]


def compiled_bias_gelu(h, b):
    return torch.ops.minift.bias_gelu_fwd(h, b)[0]


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 1536)])
def test_bias_gelu_fp32_equals_torch(shape):
    inputs, dout = gelu_inputs(shape, torch.float32), rnd(*shape, seed=3, dtype=torch.float32)
    ours = out_and_grads(compiled_bias_gelu, inputs, dout)
    want = out_and_grads(lambda h, b: F.gelu(h + b), inputs, dout)
    for name, a, e in zip(["out", "dh", "dbias"], ours, want):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)


def test_bias_gelu_gradcheck_float64():
    h, b = (t.requires_grad_() for t in gelu_inputs((3, 4, 9), torch.float64))
    assert torch.autograd.gradcheck(compiled_bias_gelu, (h, b))
    assert torch.autograd.gradcheck(RF.bias_gelu, (h, b))
    assert torch.autograd.gradgradcheck(RF.bias_gelu, (h, b))


def test_bias_gelu_reference_equals_torch():
    inputs, dout = gelu_inputs((5, 17), torch.float64), rnd(5, 17, seed=4)
    ours = out_and_grads(RF.bias_gelu, inputs, dout)
    want = out_and_grads(lambda h, b: F.gelu(h + b), inputs, dout)
    for a, e in zip(ours, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bias_gelu_within_2x_torch(dtype):
    """Against float64: each output no further than twice PyTorch's own result in the same dtype
    (float32 too: the backward's erf polynomial shares its exponential with the density)."""
    shape = (3, 11, 1536)
    inputs, dout = gelu_inputs(shape, torch.float64), rnd(*shape, seed=5)
    want = out_and_grads(lambda h, b: F.gelu(h + b), inputs, dout)
    low = [t.to(dtype) for t in inputs]
    ours = out_and_grads(compiled_bias_gelu, low, dout.to(dtype))
    theirs = out_and_grads(lambda h, b: F.gelu(h + b), low, dout.to(dtype))
    for name, a, t, e in zip(["out", "dh", "dbias"], ours, theirs, want):
        assert a.dtype == dtype, name
        err, base = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * base, (name, err, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_gelu_autocast_dtypes_within_2x_torch(dtype):
    """h from a bf16/fp16 matmul, a float32 bias (as autocast hands them over): out and dh in h's
    dtype, dbias float32, each within twice the error of the PyTorch ops it replaces
    (F.gelu(h + bias) in float32, rounded to h's dtype), against float64 from the same inputs."""
    shape = (3, 11, 1536)
    h, b = gelu_inputs(shape, torch.float64)
    mixed, dout = [h.to(dtype), b.float()], rnd(*shape, seed=5, dtype=dtype)
    want = out_and_grads(lambda h, b: F.gelu(h + b), [t.double() for t in mixed], dout.double())
    ours = out_and_grads(compiled_bias_gelu, mixed, dout)
    theirs = out_and_grads(lambda h, b: F.gelu(h + b).to(h.dtype), mixed, dout)
    for name, a, t, e, dt in zip(["out", "dh", "dbias"], ours, theirs, want, [dtype, dtype, torch.float32]):
        assert a.dtype == t.dtype == dt, (name, a.dtype, t.dtype)
        err, base = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * base, (name, err, base)


def test_float64_with_float32_computes_in_float64():
    """One float64 input makes the kernels compute in float64 (the fake says the same dtypes)."""
    y, x, w, b = ln_inputs((2, 5, 24), torch.float64)
    out, z, mean, _, _ = torch.ops.minift.add_layer_norm_fwd(y.float(), x, w.float(), b.float(), 1e-12, 0.0, 0, 0)
    assert out.dtype == z.dtype == mean.dtype == torch.float64
    torch.testing.assert_close(out, F.layer_norm(y.float().double() + x, (24,), w.float().double(),
                                                 b.float().double(), 1e-12), rtol=1e-12, atol=1e-12)
    h, bias = gelu_inputs((2, 5, 24), torch.float64)
    out, pre = torch.ops.minift.bias_gelu_fwd(h.float(), bias)
    assert out.dtype == torch.float32 and pre.dtype == torch.float64
    torch.testing.assert_close(pre, h.float().double() + bias, rtol=0, atol=0)


def test_model_under_bf16_autocast_runs_the_fused_layers():
    """Under autocast the fused layers get a bf16 y/h and float32 parameters: they must run (not the
    PyTorch fallback, as they did when they required one dtype), and the model's loss and gradients
    stay as close to float64 as impl="torch"'s under the same autocast (2x its error at most)."""
    import minift
    from torch.profiler import ProfilerActivity, profile
    cfg = minift.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=160, max_position_embeddings=24, num_labels=3,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(4)
    model = minift.BertForSequenceClassification(cfg).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 60, (4, 13), generator=g)
    mask = (torch.arange(13)[None] < torch.tensor([[13], [7], [10], [4]])).long()
    labels = torch.tensor([0, 2, 1, 1])

    def loss_and_grads(impl, autocast, dtype=torch.float32):
        model.to(dtype).set_impl(impl)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return [loss.detach().double()] + [p.grad.double() for p in model.parameters()]

    truth = loss_and_grads("torch", False, torch.float64)
    torch_bf16 = loss_and_grads("torch", True)
    loss_and_grads("fused", True)                  # warm-up: the first call may run the kernels' self-check
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fused_bf16 = loss_and_grads("fused", True)
    ran = {e.name for e in prof.events()}
    assert {"minift::add_layer_norm_fwd", "minift::bias_gelu_fwd", "minift::add_layer_norm_bwd",
            "minift::bias_gelu_bwd"} <= ran, sorted(n for n in ran if "minift" in n)
    assert not {"aten::gelu", "aten::gelu_backward"} & ran, "the GELU ran in PyTorch ops"
    layer_norms = [e for e in prof.events() if e.name == "aten::native_layer_norm"]
    assert len(layer_norms) == 1, "PyTorch's layer norm ran for more than the embeddings' (no residual there)"

    def rel(a, e):
        return ((a - e).norm() / e.norm()).item()
    errs = [(rel(f, t), rel(b, t)) for f, b, t in zip(fused_bf16, torch_bf16, truth)]
    worst = max(range(len(errs)), key=lambda i: errs[i][0] / errs[i][1])
    assert errs[0][0] <= 2 * errs[0][1] + 1e-3, ("loss", errs[0])
    assert sum(f for f, _ in errs[1:]) <= 2 * sum(b for _, b in errs[1:]), errs
    assert errs[worst][0] <= 3 * errs[worst][1] + 1e-3, (worst, errs[worst])


# ------------------------------------------------------------------------------------------
# both: every element written, opcheck, the public wrappers
# ------------------------------------------------------------------------------------------

def test_every_output_element_is_written(monkeypatch):
    monkeypatch.setenv("MINIFT_POISON_OUTPUTS", "1")
    for p in (0.0, 0.2):
        inputs = [t.requires_grad_() for t in ln_inputs((3, 5, 37), torch.float32)]
        out = compiled_add_layer_norm(*inputs, p, 3)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        assert all(torch.isfinite(t).all() for t in (out, *grads))
    h, b = (t.requires_grad_() for t in gelu_inputs((3, 5, 37), torch.float32))
    out = compiled_bias_gelu(h, b)
    assert all(torch.isfinite(t).all() for t in (out, *torch.autograd.grad(out, (h, b), torch.ones_like(out))))
    # autocast's dtypes: the bf16 rows are read a row at a time (and GELU's written back so)
    y, x, w, b = ln_inputs((3, 5, 37), torch.float32)
    inputs = [t.requires_grad_() for t in (y.bfloat16(), x, w, b)]
    out = compiled_add_layer_norm(*inputs, 0.2, 3)
    assert all(torch.isfinite(t).all() for t in (out, *torch.autograd.grad(out, inputs, torch.ones_like(out))))
    h, b = (t.requires_grad_() for t in (gelu_inputs((3, 5, 37), torch.bfloat16)[0], gelu_inputs((3, 5, 37),
                                                                                                  torch.float32)[1]))
    out = compiled_bias_gelu(h, b)
    assert all(torch.isfinite(t).all() for t in (out, *torch.autograd.grad(out, (h, b), torch.ones_like(out))))


def test_opcheck():
    y, x, w, b = (t.requires_grad_() for t in ln_inputs((2, 3, 10), torch.float32))
    torch.library.opcheck(torch.ops.minift.add_layer_norm_fwd.default, (y, x, w, b, 1e-12, 0.0, 0, 0))
    torch.library.opcheck(torch.ops.minift.add_layer_norm_fwd.default, (y, x, w, b, 1e-12, 0.2, 7, 0))
    h, bias = (t.requires_grad_() for t in gelu_inputs((2, 3, 10), torch.float32))
    torch.library.opcheck(torch.ops.minift.bias_gelu_fwd.default, (h, bias))
    # autocast's dtypes: the fakes must say what the kernels return for mixed inputs too
    torch.library.opcheck(torch.ops.minift.add_layer_norm_fwd.default,
                          (y.detach().bfloat16().requires_grad_(), x, w, b, 1e-12, 0.2, 7, 0))
    torch.library.opcheck(torch.ops.minift.bias_gelu_fwd.default, (h.detach().bfloat16().requires_grad_(), bias))


def test_public_wrappers_and_their_fallback():
    """ops.add_layer_norm / ops.bias_gelu run the kernels; without dropout they equal PyTorch."""
    y, x, w, b = ln_inputs((2, 3, 10), torch.float32)
    torch.testing.assert_close(ops.add_layer_norm(y, x, w, b, 1e-12, 0.1, training=False),
                               F.layer_norm(y + x, (10,), w, b, 1e-12))
    torch.manual_seed(0)
    a = ops.add_layer_norm(y, x, w, b, 1e-12, 0.5)
    torch.manual_seed(0)
    assert torch.equal(a, ops.add_layer_norm(y, x, w, b, 1e-12, 0.5))       # torch.manual_seed reproduces it
    h, bias = gelu_inputs((2, 3, 10), torch.float32)
    torch.testing.assert_close(ops.bias_gelu(h, bias), F.gelu(h + bias))


def test_backward_makes_no_zero_gradients_for_the_saved_outputs():
    """The fused ops also return what their backward needs (GELU's pre-activation, the attention's
    row log-sum-exp, layer norm's statistics, dropout's keep mask). No loss depends on those, so
    the autograd engine must not build a zero gradient for each of them every step (it did: one
    (B, T, I) tensor filled per layer, 5% of a step at T = 128). The gradients themselves against
    impl="torch" are the other tests' work; here: no zero tensor made by a fused op's node."""
    import minift
    from torch.profiler import ProfilerActivity, profile
    cfg = minift.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=72, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = minift.BertForSequenceClassification(cfg).set_impl("fused").train()
    ids = torch.randint(1, 50, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(11)[None] < torch.tensor([[11], [6], [9]])).long()
    loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1])).loss
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()

    def made_by(event):                     # the nearest caller that is not an aten op, and the aten ops between
        parent, between = event.cpu_parent, []
        while parent is not None and parent.name.startswith("aten::"):
            between.append(parent.name)
            parent = parent.cpu_parent
        return ("" if parent is None else parent.name), between

    # a zero gradient the engine materialises runs under the node itself (CppNode<minift::...> ->
    # aten::zeros -> aten::zero_); the kernels' own writes run under minift::*_bwd, and a sum's
    # starting zero (the linear layer's bias gradient, aten::sum -> aten::fill_) is no gradient
    filled = [(made_by(e)[0], e.input_shapes[0]) for e in prof.events()
              if e.name in ("aten::zero_", "aten::fill_") and made_by(e)[0].startswith("torch::autograd::CppNode<minift::")
              and "aten::sum" not in made_by(e)[1]]
    assert not filled, f"zero gradients built in the backward (node, shape): {filled}"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _refuses(op, args, *phrases):
    """op(*args) raises a RuntimeError whose message holds every phrase, and leaves every tensor
    argument as it was."""
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError) as err:
        op(*args)
    for phrase in phrases:
        assert phrase in str(err.value), (phrase, str(err.value))
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), "an input was changed by a refused call"


def test_bad_input_is_refused_with_what_was_expected_and_what_came():
    """The mixed-dtype checks of the fused layers: each refusal names the argument, what was expected
    and what came."""
    fwd, bwd = torch.ops.minift.add_layer_norm_fwd, torch.ops.minift.add_layer_norm_bwd
    y, x, w, b = ln_inputs((2, 3, 8), torch.float32)
    _refuses(fwd, (y, x[:, :2], w, b, 1e-12, 0.0, 0, 0), "expected a contiguous x of y's shape", "[2, 3, 8]",
             "got [2, 2, 8]")
    _refuses(fwd, (y, x.transpose(0, 1).contiguous().transpose(0, 1), w, b, 1e-12, 0.0, 0, 0), "(not contiguous)")
    _refuses(fwd, (y, x.long(), w, b, 1e-12, 0.0, 0, 0), "add_layer_norm x: expected float32, float64", "Long")
    _refuses(fwd, (y, x, w[:5], b, 1e-12, 0.0, 0, 0), "weight of shape (8,)", "got [5]")
    _refuses(fwd, (y, x, w, b.double(), 1e-12, 0.0, 0, 0), "weight and bias in one dtype", "Double")
    _refuses(fwd, (y, x, w, b, 1e-12, 1.0, 0, 0), "expected 0 <= dropout_p < 1, got 1")
    _, z, mean, rstd, keep = fwd(y, x, w, b, 1e-12, 0.0, 0, 0)
    _refuses(bwd, (y, z.bfloat16(), w, mean, rstd, keep, 0.0), "expected z in float32 or float64", "BFloat16")
    _refuses(bwd, (y[:1], z, w, mean, rstd, keep, 0.0), "dout of shape [2, 3, 8]", "got [1, 3, 8]")
    _refuses(bwd, (y, z, w[:4], mean, rstd, keep, 0.0), "weight of shape (8,)", "got [4]")
    h, bias = gelu_inputs((2, 3, 8), torch.float32)
    _refuses(torch.ops.minift.bias_gelu_fwd, (h, bias[:3]), "floating bias of shape (8,)", "got [3]")
    _refuses(torch.ops.minift.bias_gelu_fwd, (h, bias.long()), "floating bias of shape (8,)", "Long")
    _, pre = torch.ops.minift.bias_gelu_fwd(h, bias)
    _refuses(torch.ops.minift.bias_gelu_bwd, (h, pre.bfloat16()), "pre in float32 or float64", "BFloat16")
