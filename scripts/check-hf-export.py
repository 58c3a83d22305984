#!/usr/bin/env python3
"""Checks affq's compressed-tensors and GPTQ exports with readers that are not affq's.

  check-hf-export.py decode CKPT EXPORT
      An independent decoder (numpy, written from the formats' documented packing: formats.md
      §1–2) dequantizes every linear of EXPORT and compares it bit for bit (in f32) with the
      same linear decoded from the affq checkpoint CKPT.
  check-hf-export.py transformers EXPORT AFFQ_JSON [--windows N] [--seqlen L] [--data FILE]
      Loads EXPORT with transformers (compressed-tensors decompresses it) in float32 on the CPU
      and scores llama.cpp-protocol windows of FILE (default WikiText-2 test); compares each
      window's PPL with `affq eval --protocol llamacpp --json` output AFFQ_JSON.
"""
import json
import os
import struct
import sys

import numpy as np

DT = {"F32": np.float32, "F16": np.float16, "BF16": None, "I32": np.int32, "I64": np.int64, "U8": np.uint8}


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = data[b:e]
        if info["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=DT[info["dtype"]])
        out[name] = a.reshape(info["shape"])
    return out


def unpack(words, n, bits):
    """Rows of 32-bit words → rows of n codes, low bits first (32/bits codes per word)."""
    w = words.astype(np.uint32)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    codes = (w[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(w.shape[0], -1)[:, :n].astype(np.float32)


def affq_linear(t, prefix, bits, symmetric):
    out, inp = (int(x) for x in t[f"{prefix}.weight_shape"])
    c = unpack(t[f"{prefix}.weight_packed"].view(np.uint32), inp, bits)
    s = t[f"{prefix}.weight_scale"].astype(np.float32)
    ng = s.shape[1]
    g = inp // ng
    if f"{prefix}.weight_zero" in t:
        z = t[f"{prefix}.weight_zero"].astype(np.float32)
    elif symmetric:
        z = np.full_like(s, float(1 << (bits - 1)))
    else:
        z = np.zeros_like(s)
    m = t[f"{prefix}.weight_offset"].astype(np.float32) if f"{prefix}.weight_offset" in t else np.zeros_like(s)
    rep = lambda a: np.repeat(a, g, axis=1)
    return (rep(s) * (c - rep(z)) + rep(m)).astype(np.float32)


def ct_linear(t, prefix, bits, symmetric):
    out, inp = (int(x) for x in t[f"{prefix}.weight_shape"])
    q = unpack(t[f"{prefix}.weight_packed"].view(np.uint32), inp, bits) - (1 << (bits - 1))
    s = t[f"{prefix}.weight_scale"].astype(np.float32)
    ng = s.shape[1]
    if symmetric:
        zp = np.zeros_like(s)
    else:
        zw = t[f"{prefix}.weight_zero_point"].view(np.uint32)  # [out*b/32, ng], packed along out
        zp = unpack(zw.T.copy(), out, bits).T - (1 << (bits - 1))
    rep = lambda a: np.repeat(a, inp // ng, axis=1)
    return (rep(s) * (q - rep(zp))).astype(np.float32)


def gptq_linear(t, prefix, bits):
    qw = t[f"{prefix}.qweight"].view(np.uint32)  # [in*b/32, out], packed along in
    s = t[f"{prefix}.scales"].astype(np.float32)  # [ng, out]
    g_idx = t[f"{prefix}.g_idx"].astype(np.int64)
    out = s.shape[1]
    inp = g_idx.shape[0]
    q = unpack(qw.T.copy(), inp, bits)  # [out, in]
    z = unpack(t[f"{prefix}.qzeros"].view(np.uint32), out, bits) + 1  # [ng, out]
    return (s[g_idx].T * (q - z[g_idx].T)).astype(np.float32)


def decode(ckpt, export):
    a = load_safetensors(os.path.join(ckpt, "model.safetensors"))
    b = load_safetensors(os.path.join(export, "model.safetensors"))
    qa = json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]
    qb = json.load(open(os.path.join(export, "config.json")))["quantization_config"]
    bits, sym = qa["weights"]["bits"], qa["weights"]["symmetric"]
    method = qb["quant_method"]
    n = 0
    for name in sorted(a):
        if not name.endswith(".weight_packed"):
            continue
        p = name[: -len(".weight_packed")]
        want = affq_linear(a, p, bits, sym)
        if method == "gptq":
            got = gptq_linear(b, p, qb["bits"])
        else:
            w = qb["config_groups"]["group_0"]["weights"]
            got = ct_linear(b, p, w["num_bits"], w["symmetric"])
        if got.shape != want.shape:
            sys.exit(f"{p}: shape {got.shape} vs {want.shape}")
        bad = np.nonzero((got.view(np.uint32) != want.view(np.uint32)) & ~((got == 0) & (want == 0)))
        if bad[0].size:
            r, c = bad[0][0], bad[1][0]
            sys.exit(f"{p}: [{r}, {c}] is {got[r, c]!r} in {export} and {want[r, c]!r} in {ckpt}")
        n += 1
    print(f"{export}: {n} {method} linears decode bit for bit to the affq checkpoint's weights")


def transformers_check(export, affq_json, windows, seqlen, data):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = json.load(open(affq_json))
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32)
    model.eval()
    text = open(data, encoding="utf-8").read()
    if text.endswith("\n"):
        text = text[:-1]
    ids = tok(text, add_special_tokens=True)["input_ids"]
    first = seqlen // 2
    ppls = []
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor([ids[w * seqlen : (w + 1) * seqlen]])
            logits = model(x).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)
            tgt = x[0, first + 1 :]
            nll = -lp[first : seqlen - 1].gather(1, tgt[:, None]).squeeze(1)
            ppls.append(float(torch.exp(nll.mean())))
    worst = max(abs(a - b) / b for a, b in zip(ppls, ref["window_ppl"]))
    total = float(np.exp(np.mean([np.log(p) for p in ppls])))
    print(f"{export}: transformers PPL per window {[round(p, 4) for p in ppls]}")
    print(f"affq            PPL per window {[round(p, 4) for p in ref['window_ppl'][:windows]]}")
    print(f"largest relative difference {worst:.2e}; affq PPL {ref['ppl']:.4f}")
    if worst > 1e-3:
        sys.exit(f"{export}: transformers and affq differ by {worst:.2e} in a window's PPL")


def main():
    a = sys.argv[1:]
    if a[:1] == ["decode"]:
        decode(a[1], a[2])
    elif a[:1] == ["transformers"]:
        opt = lambda k, d: a[a.index(k) + 1] if k in a else d
        data = opt("--data", os.path.join(os.environ.get("AFFQ_DATA_DIR", "../shared/data"), "wikitext-2-raw/wiki.test.raw"))
        transformers_check(a[1], a[2], int(opt("--windows", 8)), int(opt("--seqlen", 512)), data)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
