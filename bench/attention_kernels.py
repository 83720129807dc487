"""Times the Triton paged-attention kernels against the PyTorch reference and the bytes-moved floor.

Decode for the rollout shape (default: batch 512, contexts uniform in 256-384, qwen2.5-0.5b heads,
block 16, bf16), measured beside a device-to-device copy in the same run; also prefill of the
rollout prompts and the fused elementwise kernels. Prints a table last and writes JSON to
``--out`` (default ``$OUT`` or the current folder).

    python3 -m bench.attention_kernels --model qwen2.5-0.5b qwen3-0.6b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform

import torch
import triton
import triton.testing

from flywheel.engine import attention, kernels

HEAD_SHAPES = {  # heads, kv heads, head_dim, hidden, intermediate
    "qwen2.5-0.5b": (14, 2, 64, 896, 4864),
    "qwen2.5-7b": (28, 4, 128, 3584, 18944),
    "qwen3-0.6b": (16, 8, 128, 1024, 3072),
}
INPUT_SETS = 3  # rotated between calls so that repeated calls do not run from L2 (50 MB on an H100)
L2_ROTATION_BYTES = 256 * 2**20


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def rotating(fns):
    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return call


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read plus written per second."""
    src = torch.randn(256 * 2**20, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def paged_inputs(seq_lens: torch.Tensor, block_size: int, kv_heads: int, head_dim: int, heads: int, dtype, device):
    blocks = (seq_lens + block_size - 1) // block_size
    num_blocks = int(blocks.sum())
    table = torch.full((len(seq_lens), int(blocks.max())), -1, dtype=torch.int32)
    ids = torch.randperm(num_blocks, dtype=torch.int32)
    start = 0
    for i, used in enumerate(blocks.tolist()):
        table[i, :used] = ids[start : start + used]
        start += used
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return {
        "q": torch.randn(len(seq_lens), heads, head_dim, device=device, dtype=dtype),
        "k_cache": torch.randn(shape, device=device, dtype=dtype),
        "v_cache": torch.randn(shape, device=device, dtype=dtype),
        "seq_lens": seq_lens.to(device=device, dtype=torch.int32),
        "block_tables": table.to(device),
    }


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def graph_replays(fns) -> list:
    """Each call captured in its own CUDA graph, as the engine replays decode."""
    replays = []
    for fn in fns:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replays.append(graph.replay)
    return replays


def back_to_back_ms(fns, iters: int = 120) -> float:
    """Mean time per call of calls queued back to back over rotating inputs (no cache flush between)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fns[i % len(fns)]()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_decode(args, model: str, batch: int, bandwidth: float, device: torch.device) -> list[dict]:
    heads, kv_heads, head_dim, _, _ = HEAD_SHAPES[model]
    dtype = getattr(torch, args.dtype)
    scale = 1 / math.sqrt(head_dim)
    elem = torch.tensor([], dtype=dtype).element_size()
    set_bytes = batch * (args.min_context + args.max_context) * kv_heads * head_dim * elem  # K and V
    sets = []
    for _ in range(min(64, max(INPUT_SETS, -(-L2_ROTATION_BYTES // set_bytes)))):
        seq_lens = torch.randint(args.min_context, args.max_context + 1, (batch,))
        sets.append(paged_inputs(seq_lens, args.block_size, kv_heads, head_dim, heads, dtype, device))
    first = sets[0]
    kv_bytes = int(first["seq_lens"].sum()) * kv_heads * head_dim * 2 * elem
    io_bytes = 2 * first["q"].numel() * elem + first["block_tables"].numel() * 4 + first["seq_lens"].numel() * 4
    floor_ms = (kv_bytes + io_bytes) / bandwidth * 1e3
    reference = attention.decode_attention(
        first["q"].float(), first["k_cache"].float(), first["v_cache"].float(),
        first["seq_lens"], first["block_tables"], scale,
    )
    auto_splits = kernels.decode_num_splits(
        batch, kv_heads, head_dim, first["block_tables"].shape[1], args.block_size, dtype, device
    )

    def torch_decode(s, **_):
        return lambda: attention.decode_attention(s["q"], s["k_cache"], s["v_cache"], s["seq_lens"], s["block_tables"], scale)

    def triton_decode(s, **kw):
        return lambda: kernels.decode_attention(
            s["q"], s["k_cache"], s["v_cache"], s["seq_lens"], s["block_tables"], scale, **kw
        )

    variants = [("torch reference", torch_decode, {}), (f"triton auto ({auto_splits} split)", triton_decode, {})]
    variants += [(f"triton {n} split", triton_decode, {"num_splits": n}) for n in args.splits if n != auto_splits]
    rows = []
    for name, make, kw in variants:
        fns = [make(s, **kw) for s in sets]
        err = relative_error(fns[0](), reference)
        # The reference reads seq_lens on the host, so it cannot be captured: it runs eagerly.
        queued = fns if make is torch_decode else graph_replays(fns)
        rows.append({
            "kernel": f"decode {model} b{batch}", "variant": name, "ms": median_ms(rotating(fns)),
            "queued_ms": back_to_back_ms(queued), "floor_ms": floor_ms, "rel_err": err,
        })
    return rows


def bench_prefill(args, model: str, bandwidth: float, device: torch.device) -> list[dict]:
    heads, kv_heads, head_dim, _, _ = HEAD_SHAPES[model]
    dtype = getattr(torch, args.dtype)
    scale = 1 / math.sqrt(head_dim)
    q_len = args.prompt_len
    seq_lens = torch.full((args.prompts,), q_len)
    s = paged_inputs(seq_lens, args.block_size, kv_heads, head_dim, heads, dtype, device)
    q = torch.randn(args.prompts * q_len, heads, head_dim, device=device, dtype=dtype)
    cu = torch.arange(0, args.prompts + 1, device=device, dtype=torch.int32) * q_len
    triton_fn = lambda: kernels.prefill_attention(  # noqa: E731
        q, s["k_cache"], s["v_cache"], cu, s["seq_lens"], s["block_tables"], scale, max_q_len=q_len
    )
    torch_fn = lambda: attention.prefill_attention(  # noqa: E731
        q, s["k_cache"], s["v_cache"], cu, s["seq_lens"], s["block_tables"], scale
    )
    ref = attention.prefill_attention(q.float(), s["k_cache"].float(), s["v_cache"].float(), cu, s["seq_lens"],
                                      s["block_tables"], scale)
    q_bytes = q.numel() * q.element_size()
    floor_ms = (2 * q_bytes + 2 * q_bytes * kv_heads / heads) / bandwidth * 1e3  # q, out; K and V
    return [
        {"kernel": f"prefill {model} {args.prompts}x{q_len}", "variant": name, "ms": median_ms(fn),
         "queued_ms": None, "floor_ms": floor_ms, "rel_err": relative_error(fn(), ref)}
        for name, fn in (("torch reference", torch_fn), ("triton", triton_fn))
    ]


def bench_fused(args, model: str, bandwidth: float, device: torch.device) -> list[dict]:
    _, _, _, hidden, intermediate = HEAD_SHAPES[model]
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch, hidden, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device=device, dtype=dtype)
    gate_up = torch.randn(args.batch, 2 * intermediate, device=device, dtype=dtype)

    def torch_add_norm():
        summed = x + residual
        s32 = summed.float()
        return (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * weight, summed

    def torch_silu():
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    elem = x.element_size()
    cases = [
        ("fused_add_rms_norm", 4 * x.numel() * elem, torch_add_norm, lambda: kernels.fused_add_rms_norm(x, residual, weight, 1e-6)),
        ("silu_and_mul", 1.5 * gate_up.numel() * elem, torch_silu, lambda: kernels.silu_and_mul(gate_up)),
    ]
    rows = []
    for name, nbytes, torch_fn, triton_fn in cases:
        for variant, fn in (("torch", torch_fn), ("triton", triton_fn)):
            rows.append({"kernel": f"{name} {args.batch}x{hidden if 'norm' in name else intermediate}",
                         "variant": variant, "ms": median_ms(fn), "queued_ms": None,
                         "floor_ms": nbytes / bandwidth * 1e3, "rel_err": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["qwen2.5-0.5b"], choices=sorted(HEAD_SHAPES))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--small-batch", type=int, default=16, help="a batch that leaves the GPU idle without split-KV")
    parser.add_argument("--min-context", type=int, default=256)
    parser.add_argument("--max-context", type=int, default=384)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)

    bandwidth = copy_bandwidth(device)
    rows = []
    for model in args.model:
        for batch in (args.batch, args.small_batch):
            rows += bench_decode(args, model, batch, bandwidth, device)
        rows += bench_prefill(args, model, bandwidth, device)
        rows += bench_fused(args, model, bandwidth, device)

    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "args": vars(args),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=2)

    print(f"\n{result['device']}, copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); "
          f"context {args.min_context}-{args.max_context}, block {args.block_size}, {args.dtype}")
    print("flushed: one eager call after do_bench's L2 flush (its dirty lines are written back during the call);")
    print("queued: calls back to back over rotating inputs, from CUDA graphs where capturable. x floor uses queued.")
    print(f"{'kernel':<30} {'variant':<24} {'flushed us':>10} {'queued us':>10} {'floor us':>9} {'x floor':>8} {'rel err':>8}")
    for r in rows:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        queued = r["queued_ms"] if r["queued_ms"] is not None else r["ms"]
        queued_text = "" if r["queued_ms"] is None else f"{r['queued_ms'] * 1e3:.1f}"
        print(f"{r['kernel']:<30} {r['variant']:<24} {r['ms'] * 1e3:>10.1f} {queued_text:>10} "
              f"{r['floor_ms'] * 1e3:>9.1f} {queued / r['floor_ms']:>8.2f} {err:>8}")


if __name__ == "__main__":
    main()
