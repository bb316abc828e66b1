"""The whole model on impl="reference" (hand-written backward passes) against impl="torch"."""
import copy

import pytest
import torch

import minift
from conftest import random_batch, small_config


def grads(model, ids, mask, types, labels):
    model.zero_grad()
    out = model(ids, mask, types, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head,num_labels", [("BertForSequenceClassification", 3),
                                             ("BertForTokenClassification", 4)])
def test_reference_equals_torch_float64(head, num_labels):
    torch.manual_seed(0)
    config = small_config(num_labels=num_labels)
    model = getattr(minift, head)(config).double().eval()
    ids, mask, types = random_batch(config, B=3, T=11)
    g = torch.Generator().manual_seed(1)
    if head == "BertForSequenceClassification":
        labels = torch.randint(0, num_labels, (3,), generator=g)
    else:
        labels = torch.randint(0, num_labels, (3, 11), generator=g).masked_fill(mask == 0, -100)
    out_t, g_t = grads(model.set_impl("torch"), ids, mask, types, labels)
    out_r, g_r = grads(model.set_impl("reference"), ids, mask, types, labels)
    assert set(g_t) == set(g_r) and len(g_t) == len(list(model.parameters()))
    torch.testing.assert_close(out_r.logits, out_t.logits, rtol=1e-10, atol=1e-12)
    for name in g_t:
        # key.bias has a true gradient of exactly 0 (q . b_k is the same for every key, and softmax
        # ignores a constant added to a row): both sides are rounding noise there, so the
        # denominator is floored at 1e-8 of the largest gradient norm of the model.
        floor = 1e-8 * max(g.norm() for g in g_t.values())
        rel = (g_r[name] - g_t[name]).norm() / torch.maximum(g_t[name].norm(), floor)
        assert rel <= 1e-10, (name, rel.item())


def test_reference_equals_torch_on_minilm_float32(batch):
    torch.manual_seed(0)
    model = minift.BertForSequenceClassification.from_pretrained("minilm", num_labels=2).eval()
    labels = torch.tensor([1, 0, 1, 0])
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels)
    out_t, g_t = grads(model.set_impl("torch"), *args)
    out_r, g_r = grads(model.set_impl("reference"), *args)
    _, g_64 = grads(copy.deepcopy(model).double().set_impl("torch"), *args)
    assert (out_r.logits - out_t.logits).abs().max() <= 1e-5
    scale = max(g.abs().max() for g in g_64.values())
    for n in g_64:
        ours = (g_r[n].double() - g_64[n]).abs().max()
        theirs = (g_t[n].double() - g_64[n]).abs().max()
        # PyTorch's own float32 gradients sit up to ~5e-5 (relative) from float64 on these
        # weights; ours must be no further from float64 than twice that, and within 1e-5 of
        # the largest gradient of the model in absolute terms.
        assert ours <= 2 * theirs + 1e-6 * scale, (n, ours.item(), theirs.item())
        assert (g_r[n] - g_t[n]).abs().max() <= 1e-5 * scale, n


def test_reference_dropout_trains_and_differs_from_eval():
    config = small_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = minift.BertForSequenceClassification(config).set_impl("reference").train()
    ids, mask, types = random_batch(config)
    out = model(ids, mask, types, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    a = model(ids, mask, types).logits
    b = model(ids, mask, types).logits
    assert torch.equal(a, b)


def _full_logits(model, ids, mask, types):
    """The classifier's logits with every row of the last layer computed (the oracle)."""
    pooled = model.bert(ids, mask, types, pooled_only=False).pooler_output
    return model.classifier(pooled)


@pytest.mark.parametrize("impl", ["torch", "reference", "fused"])
def test_classifier_computes_the_cls_row_alone_and_gets_the_same_function(impl):
    """BertForSequenceClassification computes only the [CLS] row of the last layer (what the pooler
    reads). Logits and every parameter's gradient must equal those of the full last layer."""
    torch.manual_seed(0)
    config = small_config(num_labels=3, num_hidden_layers=3)
    model = minift.BertForSequenceClassification(config).double().eval().set_impl(impl)
    ids, mask, types = random_batch(config, B=4, T=13, seed=5)
    labels = torch.tensor([2, 0, 1, 2])
    out, g_cls = grads(model, ids, mask, types, labels)
    h = model.bert(ids, mask, types, pooled_only=True).last_hidden_state
    assert h.shape == (4, 1, config.hidden_size)
    model.zero_grad()
    full = _full_logits(model, ids, mask, types)
    torch.nn.functional.cross_entropy(full, labels).backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out.logits, full, rtol=1e-12, atol=1e-13)
    assert set(g_cls) == set(g_full) and len(g_full) == len(list(model.parameters()))
    for n in g_full:
        torch.testing.assert_close(g_cls[n], g_full[n], rtol=1e-10, atol=1e-13, msg=n)


def test_cls_row_alone_saves_the_last_layers_matrix_work():
    """The linear layers' FLOPs, counted by torch's FlopCounterMode, drop by exactly what the
    last layer's query, output projection and feed-forward cost for the T - 1 rows left out."""
    from torch.utils.flop_counter import FlopCounterMode
    config = small_config(num_labels=2, num_hidden_layers=3)
    model = minift.BertForSequenceClassification(config).eval()
    B, T = 4, 13
    ids, mask, types = random_batch(config, B=B, T=T)

    def linear_flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        counts = counter.get_flop_counts()["Global"]
        return sum(v for k, v in counts.items() if str(k).split(".")[1] in ("mm", "addmm"))
    H, I = config.hidden_size, config.intermediate_size
    full = linear_flops(lambda: _full_logits(model, ids, mask, types))
    cls = linear_flops(lambda: model(ids, mask, types))
    per_row = 2 * (2 * H * H + 2 * H * I)              # query and output projection, the two FFN matrices
    assert full - cls == B * (T - 1) * per_row, (full, cls)
