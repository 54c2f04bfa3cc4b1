"""Each registered backbone's CPU throughput: images/s of a training step and of inference.

``python -m covid_tune.bench.backbones [--size 128] [--batch 16] [--iterations 3]``
prints a Markdown table (the one in ``docs/benchmarks.md``). Every backbone is built
with ``pretrained="none"``, nothing frozen, the usual head (256 hidden units), and timed
at 1 and at 2 torch threads: one warm-up step, then the median of ``iterations`` steps.
A training step is forward, cross-entropy, backward and an SGD update; inference is a
forward pass in eval mode without autograd.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from covid_tune.nn.models import BACKBONES, build_model


def seconds_per_step(step, iterations: int) -> float:
    """Median wall seconds of ``step()`` after one untimed warm-up call."""
    step()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def backbone_throughput(backbone: str, size: int, batch: int, threads: int,
                        iterations: int) -> dict[str, float]:
    """``{"train": images/s, "infer": images/s}`` of one backbone at ``threads`` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(backbone, outputs=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))

    def train_step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step():
        model(x)

    model.train()
    train = seconds_per_step(train_step, iterations)
    model.eval()
    infer = seconds_per_step(infer_step, iterations)
    return {"train": batch / train, "infer": batch / infer}


def throughput_table(size: int, batch: int, iterations: int, threads=(1, 2)) -> list[str]:
    """A Markdown table, printed line by line as it is measured: one row per backbone,
    images/s per phase and thread count."""
    columns = [f"{phase} {t} thr" for phase in ("train", "infer") for t in threads]
    lines = ["| backbone | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    print("\n".join(lines), flush=True)
    for backbone in BACKBONES:
        runs = {t: backbone_throughput(backbone, size, batch, t, iterations) for t in threads}
        cells = [f"{runs[t][phase]:.1f}" for phase in ("train", "infer") for t in threads]
        lines.append(f"| {backbone} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3, help="timed steps after warm-up")
    args = parser.parse_args(argv)
    print(f"images/s, {args.size} px, batch {args.batch}, median of {args.iterations} steps",
          flush=True)
    throughput_table(args.size, args.batch, args.iterations)


if __name__ == "__main__":
    main()
