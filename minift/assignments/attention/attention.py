"""Assignment part "attention": scaled dot-product attention with a key-padding mask."""
import math

import torch


def attention(q, k, v, key_padding_mask=None):
    """softmax(q k^T / sqrt(D) + mask) v.

    q, k, v: (B, H, T, D). key_padding_mask: (B, T) bool, True = a real token (keep).
    Masked keys get zero weight; a row whose keys are all masked must give 0, not NaN.
    Returns (B, H, T, D).
    """
    # BEGIN SOLUTION hint="scores = q k^T / sqrt(D); fill masked keys with -inf; softmax over keys; zero the rows with no kept key; multiply by v"
    D = q.shape[-1]
    s = q @ k.transpose(-2, -1) / math.sqrt(D)                          # (B, H, T, T)
    if key_padding_mask is None:
        return torch.softmax(s, -1) @ v
    keep = key_padding_mask[:, None, None, :]                          # (B, 1, 1, T)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return p @ v
    # END SOLUTION
