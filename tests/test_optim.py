"""minift.optim against torch.optim, torch's LambdaLR and clip_grad_norm_."""
import copy

import pytest
import torch

import minift
from minift import optim

# one worker computes the 200-step trajectories that every test here reads
pytestmark = pytest.mark.xdist_group("optim")


def _with_decoupled_decay(torch_sgd_cls, lr, wd, **kw):
    """torch.optim.SGD has only L2 (coupled) decay; decoupled decay is theta *= 1 - lr*wd first."""
    class SGDW(torch_sgd_cls):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - group["lr"] * wd)
            return super().step(closure)
    return lambda params: SGDW(params, lr=lr, weight_decay=0.0, **kw)


PAIRS = {
    "adamw_wd": (lambda ps: optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)),
    "adamw_no_wd": (lambda ps: optim.AdamW(ps, lr=2e-3, weight_decay=0.0),
                    lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.0)),
    # the compiled one-pass update (csrc/elementwise.cpp), same hyperparameters
    "adamw_fused_wd": (lambda ps: optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True),
                       lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)),
    "adamw_fused_no_wd": (lambda ps: optim.AdamW(ps, lr=2e-3, weight_decay=0.0, fused=True),
                          lambda ps: torch.optim.AdamW(ps, lr=2e-3, weight_decay=0.0)),
    "sgd_wd": (lambda ps: optim.SGD(ps, lr=0.05, weight_decay=0.1),
               lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=0.1)),   # equal without momentum
    "sgd_momentum": (lambda ps: optim.SGD(ps, lr=0.02, momentum=0.9),
                     lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9)),
    "sgd_momentum_decoupled_wd": (lambda ps: optim.SGD(ps, lr=0.02, momentum=0.9, weight_decay=0.1),
                                  _with_decoupled_decay(torch.optim.SGD, 0.02, 0.1, momentum=0.9)),
}


@pytest.fixture(scope="module")
def trajectories(tokenizer):
    """200 steps of every optimizer pair on the same stream of real gradients (MiniLM cut to one
    encoder layer, which has every kind of parameter the full model has: 2 million weights, 14
    optimizers, 200 steps take about half a minute on one core)."""
    torch.manual_seed(0)
    source = minift.BertForSequenceClassification.from_pretrained(
        "minilm", num_labels=2, num_hidden_layers=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    source.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    texts = ["a gripping, funny film", "tedious and overlong", "the cast is superb", "not worth the ticket",
             "an instant classic", "I walked out", "sharp writing throughout", "flat, lifeless direction"]
    enc = tokenizer(texts)
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    copies = {name: (copy.deepcopy(source), copy.deepcopy(source)) for name in PAIRS}
    # L2 decay without momentum equals decoupled decay only in exact arithmetic: the two round
    # differently (2e-6 apart after 200 float32 steps), so that pair runs in float64.
    copies["sgd_wd"] = tuple(m.double() for m in copies["sgd_wd"])
    opts = {}
    for name, (mk_ours, mk_torch) in PAIRS.items():
        a, b = copies[name]
        opts[name] = (mk_ours([p for p in a.parameters() if p.requires_grad]),
                      mk_torch([p for p in b.parameters() if p.requires_grad]))
    driver = optim.AdamW([p for p in source.parameters() if p.requires_grad], lr=5e-4)
    g = torch.Generator().manual_seed(1)
    for step in range(200):
        idx = torch.randperm(8, generator=g)[:4]
        source.zero_grad()
        source(enc["input_ids"][idx], enc["attention_mask"][idx], labels=labels[idx]).loss.backward()
        grads = [p.grad for p in source.parameters() if p.requires_grad]
        for name, (a, b) in copies.items():
            for m in (a, b):
                for p, gsrc in zip((p for p in m.parameters() if p.requires_grad), grads):
                    p.grad = gsrc.to(p.dtype)
            opts[name][0].step()
            opts[name][1].step()
        driver.step()
    return copies


@pytest.mark.parametrize("name", list(PAIRS))
def test_optimizer_matches_torch_after_200_steps(trajectories, name):
    a, b = trajectories[name]
    moved = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert moved <= 1e-6, moved
    start = minift.BertForSequenceClassification.from_pretrained("minilm", num_labels=2, num_hidden_layers=1)
    travelled = max((pa.float() - ps).abs().max().item() for (n, pa), (_, ps) in
                    zip(a.bert.named_parameters(), start.bert.named_parameters()))
    assert travelled > 1e-3, "the parameters must actually have moved"


def test_fused_adamw_equals_the_python_loop(trajectories):
    """Same stream of gradients: the compiled update and the loop agree to float32 rounding."""
    fused, _ = trajectories["adamw_fused_wd"]
    loop, _ = trajectories["adamw_wd"]
    diff = max((pa - pb).abs().max().item() for pa, pb in zip(fused.parameters(), loop.parameters()))
    assert diff <= 1e-6, diff


def test_fused_adamw_float64_and_bad_input():
    g = torch.Generator().manual_seed(5)
    p1 = torch.nn.Parameter(torch.randn(37, 11, generator=g, dtype=torch.float64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = optim.AdamW([p1], lr=1e-2, fused=True), torch.optim.AdamW([p2], lr=1e-2)
    for _ in range(50):
        grad = torch.randn(37, 11, generator=g, dtype=torch.float64)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    assert (p1 - p2).abs().max().item() <= 1e-12
    p = torch.zeros(4)
    with pytest.raises(RuntimeError, match="expected shape"):
        torch.ops.minift.adamw_step_(p, torch.zeros(5), torch.zeros(4), torch.zeros(4), 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(RuntimeError, match="step >= 1"):
        torch.ops.minift.adamw_step_(p, torch.zeros(4), torch.zeros(4), torch.zeros(4), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)


def _cuda_adamw_kernel() -> bool:
    if not torch.cuda.is_available():
        return False
    from minift.ops import why_not_compiled
    return why_not_compiled("adamw_step_", torch.zeros(1, device="cuda")) is None


@pytest.mark.skipif(not _cuda_adamw_kernel(), reason="needs a GPU and the CUDA kernels")
def test_fused_adamw_on_cuda_equals_torch():
    """The CUDA kernel (csrc/cuda/elementwise.cu) against torch.optim.AdamW on the same GPU, both
    against torch.optim.AdamW in float64: after 100 steps the kernel's error is at most 2x torch's
    float32 error (the two round differently: 1.2e-5 apart here, on a GPU, where the CPU loop and
    kernel agree to the bit), and the compiled step is the one that ran (the loop would pass too)."""
    g = torch.Generator().manual_seed(6)
    p1 = torch.nn.Parameter(torch.randn(1031, 7, generator=g).cuda())
    p2 = torch.nn.Parameter(p1.detach().clone())
    p64 = torch.nn.Parameter(p1.detach().double())
    kw = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    opts = [optim.AdamW([p1], fused=True, **kw), torch.optim.AdamW([p2], **kw), torch.optim.AdamW([p64], **kw)]
    from minift.ops import why_not_compiled
    assert why_not_compiled("adamw_step_", p1) is None
    for _ in range(100):
        grad = torch.randn(1031, 7, generator=g, dtype=torch.float64).cuda()
        p1.grad, p2.grad, p64.grad = grad.float(), grad.float(), grad.clone()
        for o in opts:
            o.step()
    ours, theirs = ((p - p64).abs().max().item() for p in (p1, p2))
    assert 0 < theirs < 1e-4, theirs
    assert ours <= 2 * theirs, (ours, theirs)
    assert (p1 - p2).abs().max().item() <= 1e-4


def test_coupled_and_decoupled_decay_differ_with_momentum():
    """With momentum, L2 decay (torch's SGD) and decoupled decay are different algorithms."""
    p1 = torch.nn.Parameter(torch.ones(3))
    p2 = torch.nn.Parameter(torch.ones(3))
    ours, theirs = optim.SGD([p1], lr=0.1, momentum=0.9, weight_decay=0.5), \
        torch.optim.SGD([p2], lr=0.1, momentum=0.9, weight_decay=0.5)
    for _ in range(3):
        p1.grad, p2.grad = torch.full((3,), 0.2), torch.full((3,), 0.2)
        ours.step(), theirs.step()
    # decoupled by hand: b = 0.2 * (1 + 0.9 + 0.81) after 3 steps; theta *= (1 - 0.05) each step
    theta = 1.0
    b = 0.0
    for _ in range(3):
        b = 0.9 * b + 0.2
        theta = theta - 0.1 * b - 0.1 * 0.5 * theta
    assert abs(p1[0].item() - theta) < 1e-6
    assert abs(p2[0].item() - theta) > 1e-3


def test_schedule_matches_lambdalr():
    factor = optim.linear_warmup_decay(warmup_steps=7, total_steps=40)
    w1, w2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    o1, o2 = optim.AdamW([w1], lr=3e-4), torch.optim.AdamW([w2], lr=3e-4)
    ours, theirs = optim.LRSchedule(o1, factor), torch.optim.lr_scheduler.LambdaLR(o2, factor)
    seen = []
    for _ in range(45):
        assert abs(ours.get_last_lr()[0] - theirs.get_last_lr()[0]) <= 1e-15
        seen.append(ours.get_last_lr()[0])
        o1.step(), o2.step(), ours.step(), theirs.step()
    assert seen[0] == 0.0 and max(seen) == pytest.approx(3e-4) and seen[40] == 0.0
    restored = optim.LRSchedule(optim.AdamW([w1], lr=3e-4), factor)
    restored.load_state_dict(ours.state_dict())
    assert restored.get_last_lr() == ours.get_last_lr()


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_matches_torch(max_norm):
    g = torch.Generator().manual_seed(0)
    ps1 = [torch.nn.Parameter(torch.zeros(s)) for s in [(5, 3), (7,), (2, 2, 2)]]
    ps2 = [torch.nn.Parameter(torch.zeros(s)) for s in [(5, 3), (7,), (2, 2, 2)]]
    for a, b in zip(ps1, ps2):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    n1 = optim.clip_grad_norm(ps1, max_norm)
    n2 = torch.nn.utils.clip_grad_norm_(ps2, max_norm)
    assert abs(n1.item() - n2.item()) <= 1e-6
    for a, b in zip(ps1, ps2):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)


def test_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="betas"):
        optim.AdamW(p, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="SGD"):
        optim.SGD(p, lr=-1)


def test_param_groups_exclude_biases_and_layernorm():
    model = minift.BertForSequenceClassification(minift.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    decay, no_decay = optim.param_groups(model, 0.01)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
