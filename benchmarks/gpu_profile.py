"""Where a training step's GPU time goes: torch.profiler over a few steps of the bench's model step
(BertForSequenceClassification, B=32, T=128, random lengths), transformers and minift fused side by side.

    python benchmarks/gpu_profile.py [--shape minilm|bert-base] [--precision fp32|bf16] [--rows 25]
"""
import argparse

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import minift
from minift import optim
from minift.bench import SHAPES


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="minilm", choices=sorted(SHAPES))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dev, cfg_kw, B, T = torch.device("cuda"), SHAPES[args.shape], 32, 128
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        **cfg_kw, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa")).to(dev)
    ours = minift.BertForSequenceClassification(minift.BertConfig(
        **cfg_kw, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).to(dev)
    ours.load_state_dict(hf.state_dict(), strict=False)
    ours.set_impl("fused")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (B, T), generator=g).to(dev)
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long().to(dev)
    labels = torch.randint(0, 2, (B,), generator=g).to(dev)
    amp = args.precision == "bf16"
    for name, model, opt in [("transformers", hf, torch.optim.AdamW(hf.parameters(), lr=1e-5)),
                             ("minift fused", ours, optim.AdamW(ours.parameters(), lr=1e-5, fused=True))]:
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        print(f"\n=== {name}, {args.shape} {args.precision}, {args.steps} steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
