#!/usr/bin/env python3
"""Compiles a CUDA source to PTX with NVRTC (from the nvidia-cuda-nvrtc-cu12 wheel), so the
`cuda` feature builds without a CUDA toolkit. Usage: nvrtc-ptx.py SRC OUT.ptx WHEELS_ROOT ARCH"""
import ctypes, sys, os

src_path, out_path, root, arch = sys.argv[1:5]
nvrtc = ctypes.CDLL(os.path.join(root, "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
src = open(src_path, "rb").read()
prog = ctypes.c_void_p()
def check(rc, what):
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"{what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")
check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(src_path).encode(), 0, None, None), "create")
opts = [f"--gpu-architecture={arch}", "--std=c++17",
        "-I" + os.path.join(root, "nvidia/cuda_nvcc/include"),
        "-I" + os.path.join(root, "nvidia/cuda_runtime/include")]
arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode(), file=sys.stderr)
check(rc, f"compile {src_path}")
nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
check(nvrtc.nvrtcGetPTX(prog, ptx), "ptx")
tmp = out_path + ".tmp"
with open(tmp, "wb") as f:
    f.write(ptx.value)
os.replace(tmp, out_path)
