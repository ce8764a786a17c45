"""Seconds per training epoch with Adam's three CPU implementations: the default
(for-loop over parameters), ``foreach=True`` and ``fused=True``; and whether they agree.

Usage: ``MNIST_ROOT=... python benchmarks/benchmark_adam.py [-c config.yaml]
[--batch-sizes 128 512] [--rounds N]``. It reports; it asserts nothing.

For each batch size, the three variants train the same model from the same weights on
the same batches, one epoch each in interleaved rounds (default, foreach, fused, back
to back), so that a change of the machine's load hits all three alike; each ratio is
the median of its per-round ratios. Correctness: after one epoch from the same weights
and batches, the largest absolute difference of any parameter from the default's.
"""

import argparse
import os
import statistics
import time

import torch

import vae_helpers as vh

VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def trainer(config, train_images, batch_size, options):
    """A function that trains one epoch with Adam(**options), from fixed weights."""
    torch.manual_seed(config["seed"])
    model = vh.model_from_config(config)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config["learning_rate"], **options
    )
    shuffle = torch.Generator().manual_seed(config["seed"])

    def epoch():
        torch.manual_seed(config["seed"])  # the same reparameterization noise
        vh.train_epoch(
            model, optimizer, train_images, batch_size, config["beta"], shuffle
        )
        return model

    return epoch


def largest_difference(config, train_images, batch_size, options):
    """Max |parameter − default's parameter| after one epoch from the same start."""
    models = [trainer(config, train_images, batch_size, o)() for o in ({}, options)]
    return max(
        (a - b).abs().max().item()
        for a, b in zip(models[0].parameters(), models[1].parameters())
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="config.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = vh.load_config(args.config)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average"
        f" at start {os.getloadavg()[0]:.2f}"
    )
    train_images = vh.mnist_splits(config, torch.device("cpu"))["train"][0]
    for batch_size in args.batch_sizes:
        epochs = {
            name: trainer(config, train_images, batch_size, options)
            for name, options in VARIANTS.items()
        }
        for epoch in epochs.values():
            epoch()  # warm-up
        rounds = []
        for _ in range(args.rounds):
            times = {}
            for name, epoch in epochs.items():
                began = time.perf_counter()
                epoch()
                times[name] = time.perf_counter() - began
            rounds.append(times)
        print(f"\nbatch {batch_size}, medians of {args.rounds} rounds:")
        for name, options in VARIANTS.items():
            seconds = statistics.median(r[name] for r in rounds)
            speedup = statistics.median(r["default"] / r[name] for r in rounds)
            low = min(r["default"] / r[name] for r in rounds)
            high = max(r["default"] / r[name] for r in rounds)
            difference = (
                largest_difference(config, train_images, batch_size, options)
                if options
                else 0.0
            )
            print(
                f"  {name:8} {seconds:6.3f} s/epoch   {speedup:4.2f}x the default"
                f" (rounds {low:.2f}-{high:.2f}x)   max |Δ parameter| after one"
                f" epoch {difference:.1e}"
            )
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
