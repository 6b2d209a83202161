#!/usr/bin/env python3
"""The exported graph's output `prob` (probability of token 2 after the last token) from
onnxruntime, for token sequences written by tools/model_prob.cpp, and its comparison with ours.

    python3 bench/onnx_check.py MODEL.onnx tokens.json [ours.json]

Prints one line per sequence (and prefix): tokens, onnxruntime's prob, ours, |difference|, and
onnxruntime's own prob with its graph optimizations off (other kernels and fusions, the same
model): how far two faithful runs of this int8 model drift apart (its activations are rounded
to uint8 on the fly, so a last-bit difference upstream can move a rounding and the output).
onnxruntime is a benchmark peer on the device machine, not a dependency of tqkv."""
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, tokens = sys.argv[1], sys.argv[2]
    ours = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess0 = ort.InferenceSession(model, plain, providers=["CPUExecutionProvider"])
    seqs = json.load(open(tokens))
    worst = 0.0
    print(f"onnxruntime {ort.__version__}")
    print("tokens  onnxruntime       tqkv      |diff|  ort unoptimized  |diff|")
    for i, s in enumerate(seqs):
        feed = {"input_ids": np.array([s], dtype=np.int64)}
        p = float(np.asarray(sess.run(["prob"], feed)[0]).reshape(-1)[-1])
        p0 = float(np.asarray(sess0.run(["prob"], feed)[0]).reshape(-1)[-1])
        if ours is None:
            print(f"{len(s):6d}  {p:11.6f}  {p0:15.6f}  {abs(p - p0):8.2e}")
            continue
        d = abs(p - ours[i])
        worst = max(worst, d)
        print(f"{len(s):6d}  {p:11.6f}  {ours[i]:9.6f}  {d:8.2e}  {p0:15.6f}  {abs(p - p0):8.2e}")
    if ours is not None:
        print(f"largest difference {worst:.2e} over {len(seqs)} sequences")


if __name__ == "__main__":
    main()
