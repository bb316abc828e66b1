"""The textbook BCE derivation on real review snippets, and the sign error of the copied write-up."""
import pytest
import torch

from minift import gradcheck, tasks, textbook
from minift import functional as RF
from minift.cli import main


@pytest.fixture(scope="module")
def reviews():
    ds = tasks.rotten_tomatoes()
    train = ds.train[:400]
    x = textbook.bag_of_words([e.text for e in train])
    y = torch.tensor([1.0 if e.label == "fresh" else 0.0 for e in train], dtype=torch.float64)
    return x, y


def test_formula_equals_autograd_on_real_data(reviews):
    x, y = reviews
    p = textbook.init_params(x.shape[1], 8, seed=3)
    a, b = textbook.gradient_by_formula(x, y, p), textbook.gradient_by_autograd(x, y, p)
    for k in p:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


def test_correct_loss_learns_and_wrong_sign_does_not(reviews):
    x, y = reviews
    p0 = textbook.init_params(x.shape[1], 8, seed=3)
    good, hist = textbook.train(x, y, p0, textbook.bce, lr=2.0, steps=300)
    assert hist[-1] < hist[0] - 0.02
    assert textbook.accuracy(x, y, good) > max(y.mean().item(), 1 - y.mean().item()) + 0.02
    bad, bad_hist = textbook.train(x, y, p0, textbook.wrong_sign_bce, steps=10)
    assert all(torch.isfinite(torch.tensor(bad_hist)))
    # The "loss" keeps falling, because it rewards predicting 1 for every y = 0 example ...
    assert bad_hist[-1] < bad_hist[0]
    M_bad = textbook.forward(x, bad)[1]
    assert M_bad[y == 0].mean() > textbook.forward(x, p0)[1][y == 0].mean()
    # ... and the true loss of that model gets worse.
    assert textbook.bce(M_bad, y) > textbook.bce(textbook.forward(x, p0)[1], y)
    # It has no minimum: log(1 - M) -> -inf as M -> 1, and long enough training diverges.
    _, long_hist = textbook.train(x, y, p0, textbook.wrong_sign_bce, steps=300)
    assert not torch.isfinite(torch.tensor(long_hist[-1])) or long_hist[-1] < -5


def test_wrong_sign_prefers_the_wrong_answer():
    y = torch.tensor([0.0], dtype=torch.float64)
    right, wrong = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
    assert textbook.bce(right, y) < textbook.bce(wrong, y)
    assert textbook.wrong_sign_bce(right, y) > textbook.wrong_sign_bce(wrong, y)


def test_gradcheck_command_passes(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "attention+mask" in out and "FAIL" not in out


def test_gradcheck_catches_a_wrong_backward(monkeypatch):
    """Break GELU's derivative (drop the x*phi(x) term): the checker must say FAIL."""
    monkeypatch.setattr(RF, "gelu_backward", lambda dy, x: dy * 0.5 * (1.0 + torch.erf(x / 2 ** 0.5)))
    results = {r.op: r for r in gradcheck.run_all()}
    assert not results["gelu"].passed
    assert results["tanh"].passed
