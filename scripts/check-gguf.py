#!/usr/bin/env python3
"""Reads GGUF files with llama.cpp's own Python reader (`pip install gguf`) and checks that a
quantized export dequantizes bit for bit to the F32 export of the same checkpoint (affq's
dequantized weights), tensor by tensor:

    check-gguf.py QUANT.gguf F32.gguf [--expect-type Q4_0]

Prints one line per tensor type and exits 1 at the first difference (naming the tensor, index
and both values). Also checks the metadata llama.cpp needs is present.
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def field(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def main():
    args = sys.argv[1:]
    expect = None
    if "--expect-type" in args:
        i = args.index("--expect-type")
        expect = args[i + 1]
        del args[i : i + 2]
    qpath, fpath = args
    q, f = GGUFReader(qpath), GGUFReader(fpath)
    arch = field(q, "general.architecture")
    need = [
        "general.architecture", "general.file_type", f"{arch}.block_count",
        f"{arch}.context_length", f"{arch}.embedding_length", f"{arch}.feed_forward_length",
        f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv",
        f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.rope.freq_base",
        "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    ]
    missing = [k for k in need if k not in q.fields]
    if missing:
        sys.exit(f"{qpath}: missing metadata {missing}")
    ft = {t.name: t for t in f.tensors}
    counts = {}
    for t in q.tensors:
        ref = ft.get(t.name)
        if ref is None:
            sys.exit(f"{qpath}: tensor {t.name} is not in {fpath}")
        a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        b = np.asarray(ref.data, dtype=np.float32).reshape(-1)
        if a.shape != b.shape:
            sys.exit(f"{t.name}: {a.shape} values vs {b.shape}")
        # Bit for bit (-0.0 and +0.0 are the same weight).
        diff = np.nonzero((a.view(np.uint32) != b.view(np.uint32)) & ~((a == 0) & (b == 0)))[0]
        if diff.size:
            i = diff[0]
            sys.exit(f"{t.name} ({t.tensor_type.name}): value {i} is {a[i]!r} in {qpath} and {b[i]!r} in {fpath}")
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    if expect and expect not in counts:
        sys.exit(f"{qpath}: no tensor of type {expect} ({counts})")
    print(f"{qpath}: {len(q.tensors)} tensors equal to {fpath} bit for bit: {counts}; architecture {arch}, tokenizer {field(q, 'tokenizer.ggml.model')}")


if __name__ == "__main__":
    main()
