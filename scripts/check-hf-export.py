#!/usr/bin/env python3
"""Checks affq's compressed-tensors and GPTQ exports with readers that are not affq's.

  check-hf-export.py decode CKPT EXPORT
      An independent decoder (numpy, written from the formats' documented packing: formats.md
      §1–2) dequantizes every linear of EXPORT and compares it bit for bit (in f32) with the
      same linear decoded from the affq checkpoint CKPT.
  check-hf-export.py transformers EXPORT AFFQ_JSON [--windows N] [--seqlen L] [--data FILE | --ids JSON] [--tol T] [--spread K]
      Loads EXPORT with transformers (compressed-tensors decompresses it) in float32 on the CPU
      and scores llama.cpp-protocol windows of FILE (default WikiText-2 test); compares each
      window's PPL with `affq eval --protocol llamacpp --json` output AFFQ_JSON: the PPL over the
      windows must agree within relative T (default 1e-3). --ids: score these token ids (a JSON
      list, e.g. affq's own stream, where the model's Python tokenizer is not llama.cpp's). With quantized activations, every
      linear's input in the first window is also quantized by compressed-tensors' own
      forward_quantize and by the documented grid (formats.md §1.5), which must agree but for
      rounding-boundary ties. Such models are chaotic at the PPL level (SmolLM2 W8A8: scaling
      every activation scale by 1 ± 1e-6 moves a window's PPL by up to 3 %, the 8-window PPL by
      up to 0.6 %): with --spread K transformers also scores the model with every scale × (1 ±
      k·1e-6), k = 1..K, and affq's PPL must lie within the range of those PPLs widened by T.
"""
import json
import os
import struct
import sys

import numpy as np

DT = {"F32": np.float32, "F16": np.float16, "BF16": None, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "I8": np.int8}


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


def ct_int_linear(t, prefix, symmetric):
    """int-quantized: signed codes in an I8 `weight`, I8 zero points [out, groups] (formats.md §1.5)."""
    q = t[f"{prefix}.weight"].astype(np.float32)
    inp = q.shape[1]
    s = t[f"{prefix}.weight_scale"].astype(np.float32)
    ng = s.shape[1]
    zp = np.zeros_like(s) if symmetric else t[f"{prefix}.weight_zero_point"].astype(np.float32)
    rep = lambda a: np.repeat(a, inp // ng, axis=1)
    return (rep(s) * (q - rep(zp))).astype(np.float32)


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
            if qb["format"] == "int-quantized":
                got = ct_int_linear(b, p, w["symmetric"])
            else:
                got = ct_linear(b, p, w["num_bits"], w["symmetric"])
        if got.shape != want.shape:
            sys.exit(f"{p}: shape {got.shape} vs {want.shape}")
        bad = np.nonzero((got.view(np.uint32) != want.view(np.uint32)) & ~((got == 0) & (want == 0)))
        if bad[0].size:
            r, c = bad[0][0], bad[1][0]
            sys.exit(f"{p}: [{r}, {c}] is {got[r, c]!r} in {export} and {want[r, c]!r} in {ckpt}")
        n += 1
    print(f"{export}: {n} {method} linears decode bit for bit to the affq checkpoint's weights")


def documented_fake_quant(x, bits, symmetric):
    """The dynamic per-token grid of formats.md §1.5 in numpy (float32): what affq's half-range /
    integer-zero activation quantizer computes."""
    lo = np.minimum(x.min(axis=-1, keepdims=True), 0).astype(np.float32)
    hi = np.maximum(x.max(axis=-1, keepdims=True), 0).astype(np.float32)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        s = (np.maximum(-lo, hi) / np.float32((qmax - qmin) / 2)).astype(np.float32)
        s[s == 0] = 1
        return (np.clip(np.round(x / s), qmin, qmax) * s).astype(np.float32), s
    s = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
    s[s == 0] = 1
    zp = np.round(np.clip(qmin - lo / s, qmin, qmax))
    return ((np.clip(np.round(x / s + zp), qmin, qmax) - zp) * s).astype(np.float32), s


def transformers_check(export, affq_json, windows, seqlen, data, tol, spread, ids_file=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = json.load(open(affq_json))
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    model.eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    schemes = {n: getattr(getattr(m, "quantization_scheme", None), "input_activations", None) for n, m in linears.items()}
    quantized_inputs = [n for n, a in schemes.items() if a is not None]
    print(f"{export}: {len(quantized_inputs)} of {len(linears)} linears quantize their inputs on the fly")
    captured = {}
    hooks = []
    if quantized_inputs:
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        # Every linear's actual input in the first window, quantized by compressed-tensors' own
        # forward_quantize and by the documented rule: they must agree but for values that lie
        # within float rounding of a rounding boundary (one step apart).
        def hook(name):
            def f(m, args):
                if name not in captured:
                    x = args[0].detach()
                    got = forward_quantize(m, x, "input", schemes[name]).numpy()
                    want, s = documented_fake_quant(x.numpy(), schemes[name].num_bits, schemes[name].symmetric)
                    captured[name] = (got, want, s)
            return f

        hooks = [linears[n].register_forward_pre_hook(hook(n)) for n in quantized_inputs]
    if ids_file:
        ids = json.load(open(ids_file))
    else:
        text = open(data, encoding="utf-8").read()
        if text.endswith("\n"):
            text = text[:-1]
        ids = tok(text, add_special_tokens=True)["input_ids"]
    # llama-perplexity puts BOS first in every window when the tokenizer adds one.
    bos = tok.bos_token_id if tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id] else None
    first = seqlen // 2

    def score():
        ppls = []
        with torch.no_grad():
            for w in range(windows):
                x = torch.tensor([ids[w * seqlen : (w + 1) * seqlen]])
                if bos is not None:
                    x[0, 0] = bos
                logits = model(x).logits[0].double()
                lp = torch.log_softmax(logits, dim=-1)
                tgt = x[0, first + 1 :]
                nll = -lp[first : seqlen - 1].gather(1, tgt[:, None]).squeeze(1)
                ppls.append(float(torch.exp(nll.mean())))
        return ppls

    ppls = score()
    for h in hooks:
        h.remove()
    geo = lambda p: float(np.exp(np.mean([np.log(v) for v in p])))
    envelope = [geo(ppls)]
    if quantized_inputs and spread > 0:
        # The same model with every dynamic activation scale multiplied by 1 + k·1e-6 (float
        # rounding level): the PPLs it gives are what float-level differences alone produce.
        import compressed_tensors.quantization.lifecycle.forward as ctf

        orig = ctf.compute_dynamic_scales_and_zp
        for k in [k for j in range(1, spread + 1) for k in (j, -j)]:
            def scaled(*args, k=k, **kw):
                sc, zp = orig(*args, **kw)
                return sc * (1 + k * 1e-6), zp
            ctf.compute_dynamic_scales_and_zp = scaled
            envelope.append(geo(score()))
        ctf.compute_dynamic_scales_and_zp = orig
        print(f"PPL with activation scales × (1 ± k·1e-6), k ≤ {spread}: {[round(e, 4) for e in envelope]}")
    if quantized_inputs:
        n = moved = 0
        for name, (got, want, s) in captured.items():
            d = got != want
            n += got.size
            moved += int(d.sum())
            step = np.abs(got - want) / np.broadcast_to(s, got.shape)
            if d.any() and np.abs(step[d] - 1).max() > 1e-3:
                sys.exit(f"{export}: `{name}`: compressed-tensors quantizes an input value {step[d].max():.3f} steps away from the documented grid")
        print(f"input quantization: {moved} of {n} values one step apart from the documented grid (rounding-boundary ties), none further")
        if moved > 1e-4 * n:
            sys.exit(f"{export}: {moved} of {n} quantized inputs differ from the documented grid")
    total = envelope[0]
    want = geo(ref["window_ppl"][:windows])
    worst = max(abs(a - b) / b for a, b in zip(ppls, ref["window_ppl"]))
    print(f"{export}: transformers PPL per window {[round(p, 4) for p in ppls]}")
    print(f"affq            PPL per window {[round(p, 4) for p in ref['window_ppl'][:windows]]}")
    print(f"PPL over {windows} windows: transformers {total:.4f}, affq {want:.4f} ({total / want - 1:+.2e}); largest window difference {worst:.2e}")
    lo, hi = min(envelope) * (1 - tol), max(envelope) * (1 + tol)
    if not lo <= want <= hi:
        sys.exit(f"{export}: affq's PPL {want:.4f} lies outside transformers' [{lo:.4f}, {hi:.4f}] (tolerance {tol:.1e})")
    print(f"affq's PPL lies within transformers' {'envelope' if len(envelope) > 1 else 'value'} widened by {tol:.1e}: [{lo:.4f}, {hi:.4f}]")


def main():
    a = sys.argv[1:]
    if a[:1] == ["decode"]:
        decode(a[1], a[2])
    elif a[:1] == ["transformers"]:
        opt = lambda k, d: a[a.index(k) + 1] if k in a else d
        data = opt("--data", os.path.join(os.environ.get("AFFQ_DATA_DIR", "../shared/data"), "wikitext-2-raw/wiki.test.raw"))
        transformers_check(a[1], a[2], int(opt("--windows", 8)), int(opt("--seqlen", 512)), data, float(opt("--tol", 1e-3)), int(opt("--spread", 0)), opt("--ids", None))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
