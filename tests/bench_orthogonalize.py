"""Time the torch and Triton orthogonalisation paths at the short model's shapes (CUDA only).

    python tests/bench_orthogonalize.py [--compile]

Shapes: the 40 attention matrices (Q, K, V, O of 10 layers, 768x768) and the 22 MLP matrices
(768x3072) of the short model, as one GPU orthogonalises them (the whole stack) and as each of
8 ranks does (its chunk of the stack padded to a multiple of 8). Not collected by pytest.
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

SHAPES = [  # (label, batch, rows, cols)
    ("attention, 8 ranks", 5, 768, 768),
    ("attention, 1 GPU", 40, 768, 768),
    ("mlp, 8 ranks", 3, 768, 3072),
    ("mlp, 1 GPU", 22, 768, 3072),
]


def time_ms(fn, warmup: int = 10, repeats: int = 50) -> float:
    """Median time of one call in ms, each call timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(polar_express) on the Triton path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_orthogonalize: needs a CUDA GPU")
    if tg.triton is None:
        sys.exit("bench_orthogonalize: needs triton")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {tg.triton.__version__}")
    compiled = torch.compile(tg.polar_express) if args.compile else None
    header = f"{'shape':<22}{'op':<20}{'torch ms':>10}{'triton ms':>11}{'speed-up':>10}{'max diff':>10}"
    print(header)
    print("-" * len(header))
    for label, batch, rows, cols in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        G = torch.randn(batch, rows, cols, device="cuda", dtype=torch.bfloat16, generator=gen)
        X = G / G.norm(dim=(-2, -1), keepdim=True)
        A = tg.gram(X, use_triton=False)
        b, c = tg.POLAR_EXPRESS_COEFFS[1][1:]
        ops = {
            "gram": lambda use: tg.gram(X, use_triton=use),
            "gram_polynomial": lambda use: tg.gram_polynomial(A, b, c, use_triton=use),
            "polar_express": lambda use: tg.polar_express(G, 5, use_triton=use),
            "newton_schulz": lambda use: tg.newton_schulz(G, 5, use_triton=use),
        }
        for op, fn in ops.items():
            torch_ms = time_ms(lambda: fn(False))
            triton_ms = time_ms(lambda: fn(True))
            diff = max_difference(fn(False), fn(True))
            print(f"{label:<22}{op:<20}{torch_ms:>10.3f}{triton_ms:>11.3f}{torch_ms / triton_ms:>9.2f}x{diff:>10.4f}")
        if compiled is not None:
            compiled_ms = time_ms(lambda: compiled(G, 5, use_triton=True))
            diff = max_difference(compiled(G, 5, use_triton=True), tg.polar_express(G, 5, use_triton=True))
            print(f"{label:<22}{'compiled PE':<20}{'':>10}{compiled_ms:>11.3f}{'':>10}{diff:>10.4f}")


if __name__ == "__main__":
    main()
