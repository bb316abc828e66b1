import torch

from adamw import AdamW


def _run(wd, steps=100):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    init = torch.randn(8, generator=g, dtype=torch.float64)
    p1, p2 = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    o1, o2 = AdamW([p1], lr=0.01, weight_decay=wd), torch.optim.AdamW([p2], lr=0.01, weight_decay=wd)
    for _ in range(steps):
        for p, o in ((p1, o1), (p2, o2)):
            p.grad = A.t() @ (A @ p.detach() - y) / 30
            o.step()
    return p1.detach(), p2.detach()


def test_matches_torch_without_decay():
    a, b = _run(0.0)
    assert (a - b).abs().max() < 1e-10


def test_matches_torch_with_decoupled_decay():
    a, b = _run(0.1)
    assert (a - b).abs().max() < 1e-10


def test_first_step_is_lr_sized():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.tensor([1e-6, 5.0, -300.0], dtype=torch.float64)
    AdamW([p], lr=0.1, weight_decay=0.0).step()
    assert torch.allclose(p.detach().abs(), torch.full((3,), 0.1, dtype=torch.float64), rtol=2e-2)
