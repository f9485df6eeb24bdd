"""Train-step speed of the ~160M benchmark decoder, as a fraction of this machine's matmul rate.

    python benchmarks/train_step.py [--steps N] [key=value ...]

Runs configs/bench.yaml (seq 1024, batch 4) in float32 and bfloat16 compute and prints, for each,
tokens/s, model FLOP/s / matmul FLOP/s of the same dtype (measured in this process), and the
compiled step's memory against parameters + optimizer state. Reference point on the 2-core CPU
of our dev machines: MaxText on this config reaches ~0.9 of the matmul rate (~90 tokens/s fp32).
"""

import argparse
import os
import sys

from tpt_jax.bench import benchmark_train_step, format_result
from tpt_jax.config import load_config

CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench.yaml"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    for dtype in args.dtypes.split(","):
        cfg = load_config(CONFIG, [f"model.dtype={dtype}", *args.overrides])
        print(format_result(benchmark_train_step(cfg, steps=args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
