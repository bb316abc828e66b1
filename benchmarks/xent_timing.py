"""Forward + backward of minift's fused softmax cross-entropy next to F.cross_entropy on the CPU.

One process, the same inputs for both; each case runs in rounds that alternate the two (so that a
busy machine slows both alike), and reports the median of the rounds' medians. The last column is
F.cross_entropy's time over minift's: above 1 means minift is faster.

    python benchmarks/xent_timing.py [--rounds 5] [--threads 1] [--weighted]

--weighted gives both the same class weights (F.cross_entropy's weight=).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minift import ops

CASES = [(4096, 2, 0.0, 400), (4096, 2, 0.1, 400), (4096, 9, 0.0, 300), (512, 30522, 0.0, 30),
         (512, 30522, 0.1, 30)]  # N, C, label smoothing, repeats per round


def median_time(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's own)")
    parser.add_argument("--weighted", action="store_true", help="with per-class weights")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, minift._C: {ops.extension_available()}"
          f"{', class weights' if args.weighted else ''}")
    print(f"{'N':>5} {'C':>6} {'eps':>4} {'F.cross_entropy us':>19} {'minift us':>10} {'ratio':>6}")
    for N, C, eps, repeats in CASES:
        z = (torch.randn(N, C) * 3).requires_grad_()
        t = torch.randint(0, C, (N,))
        w = torch.rand(C) + 0.5 if args.weighted else None
        fns = {"torch": lambda: F.cross_entropy(z, t, weight=w, label_smoothing=eps).backward(),
               "minift": lambda: ops.softmax_cross_entropy(z, t, weight=w, label_smoothing=eps).backward()}
        rounds = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                rounds[name].append(median_time(fn, repeats))
        theirs, ours = statistics.median(rounds["torch"]), statistics.median(rounds["minift"])
        print(f"{N:>5} {C:>6} {eps:>4} {theirs * 1e6:>19.1f} {ours * 1e6:>10.1f} {theirs / ours:>5.2f}x")


if __name__ == "__main__":
    main()
