#!/usr/bin/env python3
"""GPU decode peers for `tqkv bench decode --device cuda`, on the same shapes.

Runs tqkv's fused decode (through the CLI, JSON), then in this process PyTorch's
scaled_dot_product_attention decode on a bfloat16 cache, and a dequantize-then-SDPA fallback
(unpack the codes, look up the codebook, inverse Hadamard, scale by the norm, to bfloat16, then
SDPA) that an engine without fused kernels would run every step. Each is captured as a CUDA
graph and timed over replays (median). PyTorch is a benchmark peer here, not a dependency.

  python3 bench/gpu_peers.py --tqkv build/tqkv --batch 1,8,32 --context 4096,32768,131072 \
      --bits 4,3.5,3,2 [--compare other-build/tqkv]

--compare runs a second tqkv build (an earlier version, say) on the same shapes in the same run
and adds its fused time and the speedup of --tqkv over it.
"""
import argparse
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F


def graph_us(fn, repeats=20, inner=20):
    """Median over `repeats` of the mean time of `inner` graph replays, in microseconds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / inner)
    times.sort()
    return times[len(times) // 2]


def field_widths(bits):
    return [w for w in (8, 4, 2, 1) if bits & w]


def fallback_step(codes, norms, centroids, signs, q, bits, out_dtype=torch.bfloat16):
    """Dequantize a whole MSE cache (one integer bit width, one group) and run SDPA.

    codes: uint8 [B, H, T, packed_bytes]; norms: float16 [B, H, T]."""
    B, H, T, _ = codes.shape
    d = signs.numel()
    idx = torch.zeros(B, H, T, d, dtype=torch.int32, device=codes.device)
    at, shift = 0, 0
    for w in field_widths(bits):
        nbytes = d * w // 8
        field = codes[..., at:at + nbytes].to(torch.int32)
        per = 8 // w
        parts = [(field >> (w * c)) & ((1 << w) - 1) for c in range(per)]
        idx |= torch.stack(parts, dim=-1).reshape(B, H, T, d) << shift
        at += nbytes
        shift += w
    y = centroids[idx]  # rotated, unit-norm coordinates
    hadamard = hadamard_matrix(d, y.device)
    x = (y @ hadamard) * (signs / math.sqrt(d))
    x = (x * norms.float().unsqueeze(-1)).to(out_dtype)
    return x


_HADAMARD = {}


def hadamard_matrix(d, device):
    if (d, device) not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[(d, device)] = h.to(device)
    return _HADAMARD[(d, device)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tqkv", default="build/tqkv")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--context", default="4096,32768,131072")
    ap.add_argument("--bits", default="4,3.5,3,2")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", help="also write all rows here")
    ap.add_argument("--compare", help="another tqkv build to time on the same shapes")
    a = ap.parse_args()

    def bench(tqkv):
        cmd = [tqkv, "bench", "decode", "--device", "cuda", "--batch", a.batch, "--context",
               a.context, "--bits", a.bits, "--q-heads", str(a.q_heads), "--kv-heads",
               str(a.kv_heads), "--dim", str(a.dim), "--repeats", str(a.repeats), "--json"]
        print("$", " ".join(cmd), flush=True)
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    rows = bench(a.tqkv)
    other = {}
    if a.compare:
        for r in bench(a.compare):
            other[(r["batch"], r["context"], r["key_bits"])] = r["fused_us"]

    torch.manual_seed(0)
    dev = torch.device("cuda")
    Hq, H, d = a.q_heads, a.kv_heads, a.dim
    sdpa_cache = {}
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"H_q {Hq}, H_kv {H}, d {d}; CUDA graph replays, median")
    print("batch  context  bits  tqkv us  sdpa bf16 us  fallback us  vs sdpa  vs fallback"
          "  tqkv GB/s  fused/memcpy" + ("  other us  vs other" if other else ""))
    for r in rows:
        B, T, bits = r["batch"], r["context"], r["key_bits"]
        if (B, T) not in sdpa_cache:
            sdpa_cache.clear()
            torch.cuda.empty_cache()
            q = torch.randn(B, Hq, 1, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)
            o = torch.empty_like(q)

            def sdpa():
                o.copy_(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))

            sdpa_cache[(B, T)] = graph_us(sdpa, a.repeats)
            del k, v
            torch.cuda.empty_cache()
        sdpa_us = sdpa_cache[(B, T)]
        fallback_us = None
        # The fallback's float32 intermediates take ~16 B·T·H_kv·d bytes: only where that fits.
        if float(bits).is_integer() and 16 * B * T * H * d < 24e9:
            b = int(bits)
            nbytes = sum(d * w // 8 for w in field_widths(b))
            levels = 1 << b
            codes_k = torch.randint(0, 256, (B, H, T, nbytes), device=dev, dtype=torch.uint8)
            codes_v = torch.randint(0, 256, (B, H, T, nbytes), device=dev, dtype=torch.uint8)
            norms = torch.rand(B, H, T, device=dev, dtype=torch.float16) + 0.5
            centroids = torch.linspace(-2.5, 2.5, levels, device=dev) / math.sqrt(d)
            signs = torch.randint(0, 2, (d,), device=dev).float() * 2 - 1
            q = torch.randn(B, Hq, 1, d, device=dev, dtype=torch.bfloat16)
            o = torch.empty_like(q)
            try:
                def fallback():
                    k = fallback_step(codes_k, norms, centroids, signs, q, b)
                    v = fallback_step(codes_v, norms, centroids, signs, q, b)
                    o.copy_(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))

                fallback_us = graph_us(fallback, max(3, a.repeats // 4), 2)
            except torch.OutOfMemoryError:
                fallback_us = None
            del codes_k, codes_v, norms
            torch.cuda.empty_cache()
        r["sdpa_bf16_us"] = sdpa_us
        r["fallback_us"] = fallback_us
        r["speedup_vs_sdpa"] = sdpa_us / r["fused_us"]
        r["speedup_vs_fallback"] = fallback_us / r["fused_us"] if fallback_us else None
        fb = f"{fallback_us:11.1f}" if fallback_us else "        n/a"
        vf = f"{r['speedup_vs_fallback']:10.1f}x" if fallback_us else "        n/a"
        vo = ""
        if other:
            r["other_us"] = other.get((B, T, bits))
            vo = (f"  {r['other_us']:8.1f}  {r['other_us'] / r['fused_us']:7.2f}x"
                  if r["other_us"] else "       n/a      n/a")
        print(f"{B:5d}  {T:7d}  {bits:4.3g}  {r['fused_us']:7.1f}  {sdpa_us:12.1f}  {fb}  "
              f"{r['speedup_vs_sdpa']:6.2f}x  {vf}  {r['fused_gbps']:9.0f}  "
              f"{r['fused_vs_memcpy']:12.2f}{vo}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
