"""Peak memory and time of per-token log-probs, forward + backward: molting.chunked vs the unchunked path.

Each measurement runs in a fresh subprocess, so its peak RSS (``resource.getrusage``)
is its own; the figure reported is the peak minus the RSS once the inputs exist.

    python benchmarks/chunked_logps.py                      # 16 x 200 positions, Qwen2.5-0.5B's head
    python benchmarks/chunked_logps.py --mode lora --repeats 1 --positions 800
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    import torch

    from molting.chunked import token_logps

    torch.manual_seed(0)
    hidden = torch.randn(args.positions, args.hidden, requires_grad=True)
    weight = torch.randn(args.vocab, args.hidden).mul_(0.02).requires_grad_(args.mode == "full")  # no temporary
    labels = torch.randint(args.vocab, (args.positions,))
    if args.mode == "full":  # the weight's gradient exists before the step, as in training
        weight.grad = torch.zeros_like(weight)
    hidden.grad = torch.zeros_like(hidden)
    base = rss_mb()
    start = time.perf_counter()
    if args.path == "chunked":
        logps = token_logps(hidden, weight, labels, chunk_size=args.chunk_size).logps
    else:  # what the stages do today: logits for every position, then log-softmax
        logits = (hidden @ weight.T).float()
        logps = torch.gather(logits, 1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    logps.sum().backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "extra_mb": rss_mb() - base}))


def measure(args: argparse.Namespace, path: str) -> dict[str, float]:
    runs = []
    for _ in range(args.repeats):
        command = [sys.executable, __file__, "--child", path, "--mode", args.mode, "--positions", str(args.positions),
                   "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
        if args.chunk_size:
            command += ["--chunk-size", str(args.chunk_size)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=16 * 200)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--mode", choices=["full", "lora"], default="full",
                        help="full: the output weight is trained; lora: it is frozen")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the module's rule)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["chunked", "unchunked"], dest="path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return child(args)
    from molting.chunked import default_chunk_size

    chunk = args.chunk_size or default_chunk_size(args.vocab)
    print(f"N={args.positions} H={args.hidden} V={args.vocab} fp32, mode={args.mode}, chunk={chunk} rows, "
          f"medians of {args.repeats} fresh processes (forward + backward)")
    results = {path: measure(args, path) for path in ("unchunked", "chunked")}
    for path, r in results.items():
        print(f"  {path:9s}  {r['seconds']:7.2f} s   peak RSS above inputs {r['extra_mb']:8.0f} MB")
    u, c = results["unchunked"], results["chunked"]
    print(f"  chunked / unchunked: time x{c['seconds'] / u['seconds']:.2f}, "
          f"memory x{c['extra_mb'] / max(u['extra_mb'], 1):.3f}")


if __name__ == "__main__":
    main()
