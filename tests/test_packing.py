"""Packed sequences: a padded batch's real tokens one after another, no padding (BertModel under
impl="fused" on the CPU). The packed attention op against the padded one (same dropout bits) and
float64 gradcheck; the packed model against impl="torch" (float64, every parameter's gradient) and
against the unpacked fused model under attention dropout; when it packs and when it does not."""
import pytest
import torch

import minift
from minift import ops
from minift.model import pack_batch

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="minift._C is not built")


def rnd(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def right_padded(lengths, T):
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("T", [10, 16])                 # the longest row fills T, or none does
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_packed_attention_equals_padded(T, p):
    """Each packed row's output and gradients equal the padded op's at the real positions, and
    with dropout the two draw the same bits (they number them by padded position)."""
    B, H, D = 4, 3, 16
    mask = right_padded([10, 6, 1, 8], T)
    packing = pack_batch(mask)
    proj = [rnd(B, T, H * D, seed=s).requires_grad_() for s in range(3)]
    dy = rnd(B, T, H * D, seed=5) * mask[..., None]
    padded = ops.attention_with_lse(*[x.view(B, T, H, D).transpose(1, 2) for x in proj], mask.bool(),
                                    dropout_p=p, seed=11, offset=3)[0]
    padded = padded.transpose(1, 2).reshape(B * T, H * D)[packing.index]
    packed_in = [x.reshape(B * T, H, D)[packing.index] for x in proj]
    packed = torch.ops.minift.attention_packed_fwd(*packed_in, packing.cu, packing.cu, T, T, p, D ** -0.5, 11, 3)[0]
    torch.testing.assert_close(packed.reshape(-1, H * D), padded, rtol=0, atol=1e-13)
    g_padded = torch.autograd.grad((padded * dy.reshape(B * T, -1)[packing.index]).sum(), proj)
    g_packed = torch.autograd.grad((packed.reshape(-1, H * D) * dy.reshape(B * T, -1)[packing.index]).sum(), proj)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_packed_attention_gradcheck_float64():
    H, D = 2, 8
    mask = right_padded([5, 2, 4], 6)
    packing = pack_batch(mask)
    N = int(packing.cu[-1])
    q, k, v = (rnd(N, H, D, seed=s).requires_grad_() for s in range(3))
    cu_q = torch.arange(4)                                  # one query per row (the [CLS]-row layer)
    q1 = rnd(3, H, D, seed=7).requires_grad_()
    for fn, args in ((lambda q, k, v: ops.packed_attention(q, k, v, packing.cu, packing.cu, 6, 6), (q, k, v)),
                     (lambda q, k, v: torch.ops.minift.attention_packed_fwd(q, k, v, packing.cu, packing.cu, 6, 6,
                                                                           0.3, 0.4, 9, 1)[0], (q, k, v)),
                     (lambda q, k, v: ops.packed_attention(q, k, v, cu_q, packing.cu, 1, 6), (q1, k, v))):
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_packed_attention_opcheck():
    mask = right_padded([5, 2, 4], 6)
    packing = pack_batch(mask)
    q, k, v = (rnd(11, 2, 8, seed=s, dtype=torch.float32).requires_grad_() for s in range(3))
    torch.library.opcheck(torch.ops.minift.attention_packed_fwd.default,
                          (q, k, v, packing.cu, packing.cu, 6, 6, 0.1, 0.3, 7, 0))


@pytest.mark.parametrize("bad,msg", [
    (dict(cu_q=torch.tensor([1, 5, 11])), "expected cu_q from 0 to 11"),
    (dict(cu_q=torch.tensor([0, 9, 11])), "expected batch row 0 to have 0 to 6 rows"),
    (dict(cu_k=torch.tensor([0, 5, 11], dtype=torch.int32)), "int64 vector"),
    (dict(cu_k=torch.tensor([0, 11])), "cu_q and cu_k of one length"),
    (dict(q=rnd(11, 2, 4, dtype=torch.float32)), "expected k of shape \\(Nk, 2, 4\\)"),
    (dict(q=rnd(11, 2, 8, dtype=torch.float32).transpose(0, 2).contiguous().transpose(0, 2)), "last stride 1"),
])
def test_packed_attention_bad_input(bad, msg):
    args = dict(q=rnd(11, 2, 8, dtype=torch.float32), k=rnd(11, 2, 8, seed=1, dtype=torch.float32),
                v=rnd(11, 2, 8, seed=2, dtype=torch.float32), cu_q=torch.tensor([0, 5, 11]),
                cu_k=torch.tensor([0, 5, 11]))
    args.update(bad)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.minift.attention_packed_fwd(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], 6, 6,
                                              0.0, 1.0, 0, 0)


@pytest.mark.parametrize("bad,msg", [
    (dict(q=rnd(11, 16, dtype=torch.float32)), "expected q of shape \\(Nq, H, D\\)"),
    (dict(q=torch.zeros(11, 2, 8, dtype=torch.long)), "expected float32, float64, float16 or bfloat16"),
    (dict(v=rnd(11, 2, 4, dtype=torch.float32)), "expected v of k's shape"),
    (dict(k=rnd(11, 2, 8, dtype=torch.float64)), "expected q, k, v of one dtype"),
    (dict(p=1.0), "expected 0 <= dropout_p < 1, got 1"),
    (dict(Tq=0), "expected padded lengths Tq, Tk >= 1, got 0, 6"),
])
def test_packed_attention_bad_arguments_leave_the_inputs_alone(bad, msg):
    """Each refusal names what was expected and what came, and touches none of the inputs."""
    args = dict(q=rnd(11, 2, 8, dtype=torch.float32), k=rnd(11, 2, 8, seed=1, dtype=torch.float32),
                v=rnd(11, 2, 8, seed=2, dtype=torch.float32), cu=torch.tensor([0, 5, 11]), Tq=6, p=0.0)
    args.update(bad)
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.minift.attention_packed_fwd(args["q"], args["k"], args["v"], args["cu"], args["cu"], args["Tq"], 6,
                                              args["p"], 1.0, 0, 0)
    assert all(torch.equal(args[name], t) for name, t in before.items())


def test_packed_attention_backward_refuses_mismatched_saved_tensors():
    packing = pack_batch(right_padded([5, 6], 6))
    q, k, v = (rnd(11, 2, 8, seed=s, dtype=torch.float32) for s in range(3))
    out, lse = torch.ops.minift.attention_packed_fwd(q, k, v, packing.cu, packing.cu, 6, 6, 0.0, 1.0, 0, 0)
    kept = (out.clone(), lse.clone())
    bwd = torch.ops.minift.attention_packed_bwd
    with pytest.raises(RuntimeError, match="expected dout and out like q \\(\\[11, 2, 8\\], Float, rows of D "
                                           "contiguous\\), got \\[11, 2, 4\\]"):
        bwd(out[..., :4], q, k, v, out, lse, packing.cu, packing.cu, 6, 6, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="expected dout and out like q .*strides \\[1, 11, 22\\]"):
        bwd(out.transpose(0, 2).contiguous().transpose(0, 2), q, k, v, out, lse, packing.cu, packing.cu, 6, 6,
            0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="expected a contiguous Float lse of shape \\(2, 11\\), got Float \\[11, 2\\]"):
        bwd(out, q, k, v, out, lse.t().contiguous(), packing.cu, packing.cu, 6, 6, 0.0, 1.0, 0, 0)
    assert torch.equal(out, kept[0]) and torch.equal(lse, kept[1])


def test_padded_attention_refuses_rows_that_are_not_contiguous():
    """The CPU op reads any strides whose rows of D are contiguous; a transposed last dim is refused
    by name, and the backward's dout and out are checked against q alike."""
    q, k, v = (rnd(2, 2, 5, 8, seed=s, dtype=torch.float32) for s in range(3))
    with pytest.raises(RuntimeError, match="attention q: expected rows of D contiguous \\(last stride 1; call "
                                           "\\.contiguous\\(\\)\\), got strides \\[80, 40, 1, 5\\]"):
        torch.ops.minift.attention_fwd(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, None, 0.0, 1.0, 0, 0)
    out, lse = torch.ops.minift.attention_fwd(q, k, v, None, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="attention dout: expected shape \\[2, 2, 5, 8\\] like q, got \\[2, 2, 5, 4\\]"):
        torch.ops.minift.attention_bwd(out[..., :4], q, k, v, out, lse, None, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="attention out: expected dtype Float like q, got Double"):
        torch.ops.minift.attention_bwd(out, q, k, v, out.double(), lse, None, 0.0, 1.0, 0, 0)


def small_config(**kw):
    return minift.BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=96, max_position_embeddings=40, **kw)


def batch():
    ids = torch.randint(1, 100, (5, 17), generator=torch.Generator().manual_seed(3))
    mask = right_padded([17, 9, 3, 12, 1], 17)
    types = (torch.arange(17)[None] > 5).long().expand(5, 17).contiguous()
    return ids, mask, types


def count_packed_calls(monkeypatch):
    calls = []
    real = ops.packed_attention

    def spy(q, *args, **kw):
        calls.append(q.shape[0])
        return real(q, *args, **kw)
    monkeypatch.setattr(ops, "packed_attention", spy)
    from minift import backends
    monkeypatch.setattr(backends, "_cache", {})            # the fused namespace rebuilt with the spy, then restored
    return calls


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_packed_model_equals_torch_float64(head, monkeypatch):
    """impl="fused" packs this batch (42 real tokens of 85) and gives impl="torch"'s hidden states
    at the real tokens, pooled output, logits, loss and every parameter's gradient; 0 at the pad."""
    calls = count_packed_calls(monkeypatch)
    torch.manual_seed(0)
    cls = minift.BertForSequenceClassification if head == "sequence" else minift.BertForTokenClassification
    model = cls(small_config(num_labels=3)).double().eval()
    ids, mask, types = batch()
    labels = torch.tensor([0, 2, 1, 1, 0]) if head == "sequence" else torch.where(
        mask.bool(), torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(4)), -100)
    results = {}
    for impl in ("torch", "fused"):
        model.set_impl(impl)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out.loss.backward()
        hidden = model.bert(ids, mask, types).last_hidden_state
        results[impl] = (out.loss, out.logits if head == "sequence" else out.logits[mask.bool()],
                         hidden[mask.bool()], [p.grad.clone() for p in model.parameters()], hidden)
    assert calls and set(calls) <= {42, 5}, f"the fused model did not pack (packed rows per call: {calls})"
    for a, b in zip(results["fused"][:3], results["torch"][:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(results["fused"][3], results["torch"][3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (results["fused"][4][~mask.bool()] == 0).all()


def test_packed_training_draws_the_padded_attention_dropout():
    """With dropout on the attention probabilities only, one training step of the packed model
    equals the unpacked fused model's: the same bits, and the same loss and gradients."""
    model = minift.BertForSequenceClassification(small_config(num_labels=2, hidden_dropout_prob=0.0,
                                                              attention_probs_dropout_prob=0.3))
    model.set_impl("fused").double().train()
    ids, mask, types = batch()
    results = []
    for pack in (True, False):
        model.config.pack_padding = pack
        model.zero_grad()
        torch.manual_seed(123)
        loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 1, 1, 0, 1])).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-13)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    model.config.pack_padding = True
    torch.manual_seed(124)
    other = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 1, 1, 0, 1])).loss
    assert other.item() != results[0][0].item(), "another seed draws other bits"


def test_packed_model_with_holes_in_the_mask_equals_torch():
    """A mask with holes packs too (each row's kept tokens, in order, at their own positions)."""
    torch.manual_seed(1)
    model = minift.BertModel(small_config()).double().eval()
    ids, mask, types = batch()
    mask = mask.clone()
    mask[0, 3:6] = 0
    mask[3, 1::2] = 0
    ref = model.set_impl("torch")(ids, mask, types)
    out = model.set_impl("fused")(ids, mask, types)
    keep = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[keep], ref.last_hidden_state[keep], rtol=0, atol=1e-12)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=0, atol=1e-12)
    assert (out.last_hidden_state[~keep] == 0).all(), "packed: 0 at the positions the mask leaves out"


def test_packed_under_bf16_autocast_is_as_close_to_fp32_as_unpacked():
    """bf16 autocast (as --precision auto trains on CPUs with AVX512-BF16): the packed model's
    logits are as close to the fp32 ones as the unpacked model's (2x its error at most)."""
    torch.manual_seed(2)
    model = minift.BertForSequenceClassification(small_config(num_labels=2)).set_impl("fused").eval()
    ids, mask, types = batch()
    fp32 = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    errors = {}
    for pack in (True, False):
        model.config.pack_padding = pack
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        errors[pack] = (logits.float() - fp32).abs().max().item()
    assert 0 < errors[True] <= 2 * errors[False] + 1e-3, errors


def test_question_answering_does_not_pack(monkeypatch):
    """The QA loss is a softmax over every position, padded ones included (as in transformers):
    its encoder computes them, so fused gives torch's loss and logits at every position."""
    calls = count_packed_calls(monkeypatch)
    torch.manual_seed(3)
    model = minift.BertForQuestionAnswering(small_config()).double().eval()
    ids, mask, types = batch()
    start, end = torch.tensor([2, 1, 0, 5, 0]), torch.tensor([4, 3, 2, 9, 0])
    out = {impl: model.set_impl(impl)(ids, mask, types, start_positions=start, end_positions=end)
           for impl in ("torch", "fused")}
    assert not calls
    torch.testing.assert_close(out["fused"].loss, out["torch"].loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["fused"].start_logits, out["torch"].start_logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["no padding", "first token masked", "pack_padding off", "pack=False"])
def test_when_it_does_not_pack(case, monkeypatch):
    """No packed call, and where there is padding the padded positions are computed (not 0)."""
    calls = count_packed_calls(monkeypatch)
    model = minift.BertModel(small_config()).eval()
    ids, mask, types = batch()
    if case == "no padding":
        mask = torch.ones_like(mask)
    elif case == "first token masked":
        mask = mask.clone()
        mask[1, 0] = 0
    model.set_impl("fused")
    model.config.pack_padding = case != "pack_padding off"
    h = model(ids, mask, types, pack=case != "pack=False").last_hidden_state
    assert not calls
    pad = ~mask.bool()
    assert case == "no padding" or (h[pad] != 0).any(1).all(), "every padded position computed"
    ref = model.set_impl("torch")(ids, mask, types).last_hidden_state
    torch.testing.assert_close(h[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-5)
