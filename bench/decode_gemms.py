"""The decode step's matrix products alone: each projection of a shape at a decode batch, as `F.linear`
runs it, against the other ways to compute the same product (GPU only).

    python3 -m bench.decode_gemms --shape qwen2.5-0.5b [--autotune] --out $OUT/decode_gemms.json

Variants, each against `F.linear(x, W)` in the same run: `mm_wt` (the weight stored transposed),
`mm_out` (into a preallocated output), `split2` (the gate-up product as two), `rows N` (the product
for a batch padded to N rows: whether a larger batch would fill the GPU better), and with
`--autotune` inductor's Triton templates (`max-autotune-no-cudagraphs`). Each product runs 20 times back to back in a CUDA
graph, so its weights stay in L2 between runs: these are the products' best case, not their time in
a decode step, where the other layers' weights pass through the cache in between.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.shapes import SHAPES

REPLAYS_PER_GRAPH = 20


def microseconds(product: Callable[[], object], runs: int = 200) -> float:
    """Mean time of one call, from CUDA-graph replays of the call repeated back to back."""
    for _ in range(10):
        product()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPLAYS_PER_GRAPH):
            product()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs // REPLAYS_PER_GRAPH):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / runs


def projections(shape: str) -> dict[str, tuple[int, int, bool]]:
    """name: (input width, output width, bias) of each product of a decode step."""
    _, hidden, intermediate, _, heads, kv_heads, vocab, _, head_dim = SHAPES[shape]
    head_dim = head_dim or hidden // heads
    return {"qkv": (hidden, (heads + 2 * kv_heads) * head_dim, True), "o": (heads * head_dim, hidden, False),
            "gate_up": (hidden, 2 * intermediate, False), "down": (intermediate, hidden, False),
            "lm_head": (hidden, vocab, False)}


def variants(rows: int, width: int, out_width: int, bias: bool, padded_rows: int | None,
             split: bool) -> dict[str, Callable[[], object]]:
    """The forms of one product x @ Wᵀ (+ bias) by name; `mm_out` and `split2` leave the bias out."""
    device, dtype = "cuda", torch.bfloat16
    x = torch.randn(rows, width, device=device, dtype=dtype)
    weight = torch.randn(out_width, width, device=device, dtype=dtype) * 0.02
    bias_vector = torch.randn(out_width, device=device, dtype=dtype) if bias else None
    transposed = weight.t().contiguous()
    out = torch.empty(rows, out_width, device=device, dtype=dtype)
    products = {
        "linear": lambda: F.linear(x, weight, bias_vector),
        "mm_wt": (lambda: torch.addmm(bias_vector, x, transposed)) if bias else (lambda: torch.mm(x, transposed)),
        "mm_out": lambda: torch.mm(x, weight.t(), out=out),
    }
    if split:
        halves = weight.chunk(2)
        products["split2"] = lambda: [F.linear(x, half) for half in halves]
    if padded_rows is not None:
        padded = torch.randn(padded_rows, width, device=device, dtype=dtype)
        products[f"rows {padded_rows}"] = lambda: F.linear(padded, weight, bias_vector)
    return products


def autotuned(rows: int, width: int, out_width: int) -> Callable[[], object]:
    """The product as inductor's autotuning compiles it (Triton templates; cuBLAS when it is faster)."""
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "TRITON,CUBLAS"
    x = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(out_width, width, device="cuda", dtype=torch.bfloat16) * 0.02
    compiled = torch.compile(lambda a: F.linear(a, weight), mode="max-autotune-no-cudagraphs", dynamic=False)
    return lambda: compiled(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512], help="decode batch sizes")
    parser.add_argument("--padded-rows", type=int, default=640, help="the larger batch timed for the largest --rows")
    parser.add_argument("--autotune", action="store_true",
                        help="also inductor's autotuned products (qkv, gate_up, down) at the largest --rows")
    parser.add_argument("--out", default="decode_gemms.json")
    options = parser.parse_args()
    torch.manual_seed(0)
    shapes = projections(options.shape)
    largest = max(options.rows)
    results = []

    def record(rows: int, name: str, variant: str, product: Callable[[], object]) -> None:
        width, out_width, _ = shapes[name]
        results.append({"rows": rows, "product": name, "variant": variant, "us": microseconds(product),
                        "flop": 2 * rows * width * out_width})

    for rows in sorted(options.rows):
        for name, (width, out_width, bias) in shapes.items():
            padded = options.padded_rows if rows == largest else None
            for variant, product in variants(rows, width, out_width, bias, padded, split=name == "gate_up").items():
                record(rows, name, variant, product)
    if options.autotune:
        for name in ("gate_up", "down", "qkv"):
            width, out_width, _ = shapes[name]
            record(largest, name, "autotune", autotuned(largest, width, out_width))
    Path(options.out).write_text(json.dumps({"shape": options.shape, "gpu": torch.cuda.get_device_name(0),
                                             "results": results}, indent=2))
    baseline = {(r["rows"], r["product"]): r["us"] for r in results if r["variant"] == "linear"}
    print(f"\n{options.shape}: decode products, µs per call (weights L2-resident), F.linear's time ÷ the variant's")
    for r in results:
        print(f"rows {r['rows']:4d}  {r['product']:8s} {r['variant']:9s} {r['us']:8.1f} µs "
              f"{r['flop'] / r['us'] / 1e6:5.0f} TFLOP/s  {baseline[r['rows'], r['product']] / r['us']:5.2f}×")


if __name__ == "__main__":
    main()
