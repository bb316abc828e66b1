"""Assignment part "layer_norm_backward": the backward pass of layer normalisation, by hand."""
import torch


def layer_norm_forward(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return (x - mu) * rstd * weight + bias


def layer_norm_backward(dy, x, weight, eps=1e-5):
    """Given dL/dy for y = layer_norm_forward(x, weight, bias), return (dx, dweight, dbias).

    x, dy: (N, H); weight: (H,). Do not call autograd: derive it.
    """
    # BEGIN SOLUTION hint="xhat = (x - mu) * rstd; g = dy * weight; dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); dweight = sum(dy * xhat); dbias = sum(dy)"
    mu = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    xhat = (x - mu) * rstd
    g = dy * weight
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, (dy * xhat).sum(0), dy.sum(0)
    # END SOLUTION
