"""Side-by-side timings: minift's kernels and training step against PyTorch's and transformers'.

Everything in one process, on the same random inputs, with warm-up and the median of many repeats;
CUDA events on the GPU, perf_counter on the CPU. ``minift bench`` runs it and appends the table,
with the device, versions and date, to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .functional import naive_attention


@dataclass
class Row:
    case: str
    impl: str
    ms: float
    extra: str = ""


def timeit(fn, device, warmup=3, repeats=20) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def peak_mb(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench_attention(device, shapes, dtypes, repeats) -> list[Row]:
    rows = []
    for (B, T, H, D) in shapes:
        for dtype in dtypes:
            for masked in (False, True):
                g = torch.Generator(device="cpu").manual_seed(0)
                q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
                dO = torch.randn(B, H, T, D, generator=g).to(device, dtype)
                mask = None
                if masked:
                    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
                    mask = (torch.arange(T)[None] < lengths[:, None]).to(device)
                sdpa_mask = None if mask is None else mask[:, None, None, :]
                impls = {
                    "naive": lambda: torch.autograd.backward(naive_attention(q, k, v, mask), dO),
                    "sdpa": lambda: torch.autograd.backward(
                        F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask), dO),
                    "minift": lambda: torch.autograd.backward(ops.fused_attention(q, k, v, mask), dO),
                }
                flops = 3.5 * 4 * B * H * T * T * D
                unit, per = ("TFLOP/s", 1e9) if device.type == "cuda" else ("GFLOP/s", 1e6)
                name = f"attention B={B} T={T} H={H} D={D} {str(dtype).replace('torch.', '')}{' mask' if masked else ''}"
                for impl, fn in impls.items():
                    ms = timeit(fn, device, repeats=repeats)
                    mem = peak_mb(fn, device)
                    rows.append(Row(name, impl, ms, f"{flops / ms / per:.1f} {unit}" +
                                    ("" if mem != mem else f", peak {mem:.0f} MiB")))
    return rows


def bench_xent(device, sizes, dtypes, repeats) -> list[Row]:
    rows = []
    for N, V in sizes:
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            z = torch.randn(N, V, generator=g).to(device, dtype).requires_grad_()
            t = torch.randint(0, V, (N,), generator=g).to(device)
            nbytes = 2 * z.numel() * z.element_size()               # logits read once + gradient written once
            name = f"xent N={N} V={V} {str(dtype).replace('torch.', '')}"
            reps = repeats if z.numel() >= 2 ** 20 else max(repeats, 100)  # sub-millisecond: more repeats
            # torch.autograd.grad: the loss's forward and backward alone (.backward() would also add
            # each gradient into z.grad, one more read and write of N x V per repeat)
            for impl, fn in {"F.cross_entropy": lambda: torch.autograd.grad(F.cross_entropy(z, t), z),
                             "minift": lambda: torch.autograd.grad(ops.softmax_cross_entropy(z, t), z)}.items():
                ms = timeit(fn, device, repeats=reps)
                rows.append(Row(name, impl, ms, f"{nbytes / ms / 1e6:.0f} GB/s"))
            if device.type == "cuda":       # the two passes (forward, then backward) the one-pass path replaces
                one = torch.ones((), device=device)

                def two_pass():
                    with torch.no_grad():
                        _, stats = torch.ops.minift.xent_fwd(z, t, None, -100, 0.0, 1)
                        torch.ops.minift.xent_bwd(one, z, t, None, stats, -100, 0.0, 1)
                ms = timeit(two_pass, device, repeats=reps)
                rows.append(Row(name, "minift two-pass", ms, f"{nbytes / ms / 1e6:.0f} GB/s"))
                buf = torch.empty_like(z)
                ms = timeit(lambda: buf.copy_(z), device, repeats=reps)
                rows.append(Row(name, "device copy", ms, f"{nbytes / ms / 1e6:.0f} GB/s"))
    return rows


def bench_layers(sizes, repeats) -> list[Row]:
    """The fused layers of BertIntermediate and BertSelfOutput/BertOutput (CPU kernels), forward and
    backward, against the same in PyTorch ops with autograd: bias + GELU on (N, I), and
    LayerNorm(dropout(y) + x) on (N, H) with p = 0.1. The notes give the bytes the fused kernels must
    move at least (every input read once, every output and saved tensor written once, forward and
    backward), per millisecond; "copy" is a plain copy of the same bytes, the machine's pace."""
    rows = []
    g = torch.Generator().manual_seed(0)

    def against_copy(name, nbytes, impls):
        src, dst = torch.randn(nbytes // 8, generator=g), torch.empty(nbytes // 8)   # nbytes read + written
        for impl, fn in {**impls, "copy": lambda: dst.copy_(src)}.items():
            ms = timeit(fn, torch.device("cpu"), repeats=repeats)
            rows.append(Row(name, impl, ms, f"{nbytes / ms / 1e6:.1f} GB/s"))

    for N, H, I in sizes:
        h = torch.randn(N, I, generator=g, requires_grad=True)
        b = (0.1 * torch.randn(I, generator=g)).requires_grad_()
        dh = torch.randn(N, I, generator=g)
        # forward: read h, write out and pre; backward: read dout and pre, write dh
        against_copy(f"bias+GELU fwd+bwd N={N} I={I} float32", 6 * N * I * 4, {
            "PyTorch": lambda: torch.autograd.backward(F.gelu(h + b), dh),
            "minift": lambda: torch.autograd.backward(ops.bias_gelu(h, b), dh)})
        y, x = (torch.randn(N, H, generator=g, requires_grad=True) for _ in range(2))
        w = (1 + 0.1 * torch.randn(H, generator=g)).requires_grad_()
        beta = (0.1 * torch.randn(H, generator=g)).requires_grad_()
        dz = torch.randn(N, H, generator=g)
        # forward: read y and x, write out and z (the 1-byte keep mask and the row statistics aside);
        # backward: read dout and z, write dy and dx
        against_copy(f"add+dropout+LayerNorm fwd+bwd N={N} H={H} p=0.1 float32", 8 * N * H * 4, {
            "PyTorch": lambda: torch.autograd.backward(F.layer_norm(F.dropout(y, 0.1) + x, (H,), w, beta, 1e-12),
                                                      dz),
            "minift": lambda: torch.autograd.backward(ops.add_layer_norm(y, x, w, beta, 1e-12, 0.1, training=True),
                                                     dz)})
    return rows


def bench_model(device, shapes, precisions, repeats) -> list[Row]:
    """One training step (forward, backward, AdamW) of BertForSequenceClassification, and one
    inference forward (eval mode, no gradient) of the same batch."""
    rows = []
    try:
        import transformers
    except ImportError:
        return [Row("model step", "transformers", float("nan"), "transformers not installed")]
    import minift
    from . import optim
    for name, cfg_kw in shapes:
        for precision in precisions:
            B, T = 32, 128
            hf_cfg = transformers.BertConfig(**cfg_kw, num_labels=2, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
            torch.manual_seed(0)
            hf = transformers.BertForSequenceClassification(hf_cfg).to(device)
            ours = minift.BertForSequenceClassification(minift.BertConfig(
                **cfg_kw, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).to(device)
            missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
            assert not missing, f"transformers' weights do not cover minift's model: {missing}"
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(1000, 20000, (B, T), generator=g).to(device)
            lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
            mask = (torch.arange(T)[None] < lengths[:, None]).long().to(device)
            labels = torch.randint(0, 2, (B,), generator=g).to(device)
            amp = precision == "bf16"
            for impl, model in [("transformers", hf), ("minift torch", ours), ("minift fused", ours)]:
                if model is ours:       # each with its own AdamW: the Python loop, or the compiled update
                    ours.set_impl(impl.split()[1])
                    opt = optim.AdamW(ours.parameters(), lr=1e-5, fused=impl == "minift fused")
                else:
                    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)

                def step(model=model, opt=opt):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                ms = timeit(step, device, warmup=2, repeats=repeats)
                rows.append(Row(f"train step {name} B={B} T={T} {precision}", impl, ms))
            for impl, model in [("transformers", hf), ("minift torch", ours), ("minift fused", ours)]:
                if model is ours:
                    ours.set_impl(impl.split()[1])

                @torch.no_grad()
                def forward(model=model):
                    model.eval()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        model(input_ids=ids, attention_mask=mask)
                ms = timeit(forward, device, warmup=2, repeats=repeats)
                rows.append(Row(f"forward {name} B={B} T={T} {precision}", impl, ms))
            hf.train()
            ours.train()
    return rows


def real_lengths_batch(B: int = 32):
    """Token ids and mask of B real review snippets of similar length: the batch the trainer's
    length buckets make on the default task (about 28 tokens). Random ids of random lengths
    (12-40) where the corpus or the tokenizer is not installed."""
    try:
        import minift
        from . import tasks
        tok = minift.Tokenizer.from_pretrained("minilm")
        texts = [e.text for e in tasks.rotten_tomatoes().train[:2000]]
        lengths = [len(tok([t])["input_ids"][0]) for t in texts]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        mid = len(order) // 2
        enc = tok([texts[i] for i in order[mid - B // 2: mid - B // 2 + B]])
        return enc["input_ids"], enc["attention_mask"], "real snippets"
    except Exception as e:      # the weights' or the corpus' package missing: say so in the table
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(12, 41, (B,), generator=g)
        T = int(lengths.max())
        mask = (torch.arange(T)[None] < lengths[:, None]).long()
        ids = torch.randint(1000, 20000, (B, T), generator=g) * mask
        return ids, mask, f"random lengths 12-40 ({type(e).__name__})"


def bench_step_cpu(repeats: int = 9, profile_steps: int = 3, shape: str | dict = "minilm", batch: int = 32,
                   padded_lengths: tuple[int, ...] = (64, 128),
                   full_lengths: tuple[int, ...] = (128,)) -> tuple[list[Row], str, str]:
    """One fine-tuning step (forward, backward, AdamW) of BertForSequenceClassification, fp32:
    transformers (sdpa, torch.optim.AdamW) against minift's impl="torch" and impl="fused" (its fused
    AdamW), and fused under bf16 autocast where ``--precision auto`` picks bf16 on this CPU, on
    ``batch`` real snippets at their bucketed lengths, padded to each of ``padded_lengths``, and
    with no padding at each of ``full_lengths`` (each row's tokens repeated to fill it). Wherever
    a batch has padding (the real lengths' too: rows shorter than the longest), minift fused
    computes the real tokens only (BertModel packs the batch; the row's note says so); the full
    rows show the step where there is no padding to leave out.
    ``shape``: a name in SHAPES (MiniLM's by default) or a dict of BertConfig sizes. The
    implementations take turns step by step (the median of each), so a machine that
    slows down during the run slows all three alike.

    Before any timing the three compute the first batch from the same weights, without dropout: an
    encoder output that differs beyond float32 rounding (1e-4) is an error (a fast step that
    computes something else is no result). Returns the rows, a line with that check and the three
    losses, and a profile of minift fused's step at the real lengths (the operators that take the
    time)."""
    import transformers

    import minift
    from . import optim
    cfg_kw = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    hf_cfg = transformers.BertConfig(**cfg_kw, num_labels=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_cfg)
    ours = minift.BertForSequenceClassification(minift.BertConfig(**cfg_kw, num_labels=2))
    missing, _ = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing, f"transformers' weights do not cover minift's model: {missing}"
    ids, mask, source = real_lengths_batch(batch)
    labels = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(1))

    def padded(T):
        if T is None:
            return ids, mask
        if T < ids.shape[1]:
            raise ValueError(f"padded length {T} is shorter than the real batch's {ids.shape[1]} tokens")
        out_ids, out_mask = torch.zeros(batch, T, dtype=ids.dtype), torch.zeros(batch, T, dtype=mask.dtype)
        out_ids[:, :ids.shape[1]], out_mask[:, :ids.shape[1]] = ids, mask
        return out_ids, out_mask

    def full(T):                      # each row's real tokens over and over, T of them, no padding
        lengths = mask.sum(1)
        cols = torch.arange(T)[None, :] % lengths[:, None]
        return ids.gather(1, cols), torch.ones(batch, T, dtype=mask.dtype)

    # where --precision auto picks bf16 on this CPU, fused's step under bf16 autocast too (as minift
    # finetune runs it there)
    from .trainer import choose_precision
    auto_dtype, auto_why = choose_precision("auto", "cpu")

    # the same function first: the encoder's output at the real tokens (a random head makes every
    # loss about log 2, whatever the encoder computes) and the loss, same weights, no dropout
    hf.eval()
    ours.eval()
    real = mask.bool()
    with torch.no_grad():
        hidden = {"transformers": hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state[real]}
        first = {"transformers": hf(input_ids=ids, attention_mask=mask, labels=labels).loss.item()}
        for impl in ("torch", "fused"):
            ours.set_impl(impl)
            hidden[impl] = ours.bert(ids, mask).last_hidden_state[real]
            first[impl] = ours(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        if auto_dtype is not None:
            with torch.autocast("cpu", dtype=auto_dtype):
                bf16 = ours(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    worst = max((h - hidden["transformers"]).abs().max().item() for h in hidden.values())
    if worst > 1e-4:
        raise RuntimeError(f"the implementations disagree before any step: the encoder outputs differ by up to "
                           f"{worst:.2e} (losses {first}): nothing to time")
    checked = (f"encoder outputs within {worst:.1e} of transformers'; loss of the first batch from the same "
               f"weights, no dropout: " + ", ".join(f"{k} {v:.6f}" for k, v in first.items()))
    if auto_dtype is not None:
        checked += f" (fused under bf16 autocast: {bf16:.6f}); --precision auto here: {auto_why}"

    hf.train()
    ours.train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    ours_opts = {"torch": optim.AdamW(ours.parameters(), lr=1e-5),
                 "fused": optim.AdamW(ours.parameters(), lr=1e-5, fused=True)}

    def step(impl, x, m):
        if impl == "transformers":
            model, opt = hf, hf_opt
        else:
            kernels = impl.split()[0]                       # "fused bf16": the fused kernels
            ours.set_impl(kernels)
            model, opt = ours, ours_opts[kernels]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=impl.endswith("bf16")):
            loss = model(input_ids=x, attention_mask=m, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    impls = ["transformers", "torch", "fused"] + (["fused bf16"] if auto_dtype is not None else [])
    size = shape if isinstance(shape, str) else "H={hidden_size} L={num_hidden_layers}".format(**cfg_kw)
    cases = ([(None, "real lengths")] + [(T, "padded") for T in padded_lengths]
             + [(T, "no padding") for T in full_lengths])
    for T, kind in cases:
        x, m = full(T) if kind == "no padding" else padded(T)
        name = f"train step {size} B={batch} T={x.shape[1]} ({kind}) fp32"
        for impl in impls:
            step(impl, x, m)                                   # warm-up
        times = {impl: [] for impl in impls}
        for _ in range(repeats):
            for impl in impls:
                t0 = time.perf_counter()
                step(impl, x, m)
                times[impl].append((time.perf_counter() - t0) * 1e3)
        for impl in impls:
            label = {"transformers": impl, "fused bf16": "minift fused, bf16 autocast (--precision auto)"}.get(
                impl, f"minift {impl}")
            note = source if T is None and impl == "transformers" else ""
            if impl.startswith("fused") and ours.config.pack_padding and not bool(m.bool().all()):
                note = f"packed: {int(m.sum())} real tokens of {m.numel()}"
            rows.append(Row(name, label, statistics.median(times[impl]), note))

    from torch.profiler import ProfilerActivity, profile
    x, m = padded(None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profile_steps):
            step("fused", x, m)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return rows, checked, table


SHAPES = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}


def run(quick: bool = False) -> tuple[list[Row], str]:
    cuda = torch.cuda.is_available() and ops.extension_status()["cuda"]
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        attn_shapes = [(32, 128, 12, 64), (8, 512, 12, 64), (2, 2048, 12, 64), (32, 128, 12, 32)]
        dtypes, repeats = [torch.float32, torch.float16, torch.bfloat16], 30
        xent_sizes, xent_dtypes = [(4096, 30522), (16384, 30522), (4096, 2), (16384, 2)], [torch.float32, torch.bfloat16]
        model_shapes, precisions = [("bert-base", SHAPES["bert-base"]), ("minilm", SHAPES["minilm"])], ["fp32", "bf16"]
    else:
        attn_shapes = [(8, 128, 12, 32)] if quick else [(32, 32, 12, 32), (8, 128, 12, 32), (2, 512, 12, 64)]
        dtypes, repeats = [torch.float32], 3 if quick else 7
        xent_sizes, xent_dtypes = ([(256, 30522)] if quick else [(512, 30522), (4096, 2)]), [torch.float32]
        model_shapes, precisions = [("minilm", SHAPES["minilm"])], ["fp32"]
    rows = bench_attention(device, attn_shapes, dtypes, repeats)
    rows += bench_xent(device, xent_sizes, xent_dtypes, repeats)
    if device.type == "cpu":       # the fused layers are CPU kernels (PyTorch ops on the GPU)
        # MiniLM (H=384, I=1536) and bert-base (768, 3072) at B=32 x T=28 tokens, the default task's
        rows += bench_layers([(896, 384, 1536)] if quick else [(896, 384, 1536), (896, 768, 3072)],
                             20 if quick else 50)
    if not quick:
        rows += bench_model(device, model_shapes, precisions, 9 if device.type == "cpu" else repeats)
    return rows, run_header(device)


def run_header(device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{platform.processor() or 'CPU'}, {torch.backends.cpu.get_cpu_capability()}"
    return (f"{datetime.date.today().isoformat()}, device {device.type} ({name}), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, {torch.get_num_threads()} CPU threads")


def format_rows(rows: list[Row]) -> str:
    """A markdown table; each case's times also as a ratio to its first implementation."""
    lines = ["| case | impl | ms | vs first | notes |", "|---|---|---|---|---|"]
    first: dict[str, float] = {}
    for r in rows:
        first.setdefault(r.case, r.ms)
        ratio = first[r.case] / r.ms if r.ms == r.ms and r.ms > 0 else float("nan")
        lines.append(f"| {r.case} | {r.impl} | {r.ms:.3f} | {ratio:.2f}x | {r.extra} |")
    return "\n".join(lines)
