//! The integer inference path on an NVIDIA GPU (`--features cuda`, `--device cuda`).
//!
//! The kernels (`cuda/int_kernels.cu`) are compiled to PTX at build time by
//! `scripts/build-cuda.sh` (NVRTC from PyPI's wheel, no CUDA toolkit) and embedded; at run time
//! the driver library (`libcuda.so.1`) is opened by `cudarc` (its `dynamic-loading` mode) and the
//! PTX is JIT-compiled for the GPU by the driver. Nothing CUDA is needed to build or run the CPU
//! binary.
//!
//! Scope: the quantized linears of a site run on the GPU — upload the site input, fused online
//! transform + per-token quantization (`transform_quantize`), int8 tensor-core GEMM with the
//! scales in the epilogue (`int_gemm`), download the outputs. The rest of the decoder stays on
//! the CPU.
//!
//! The driver API comes from `cudarc::driver` (as in candle) in its dynamic-loading mode, so no
//! CUDA toolkit is needed at build time. cudarc resolves each driver symbol lazily and *panics*
//! when the library or a symbol is missing, so [`Cuda::new`] checks both first and returns an
//! error instead.

use super::int_gemm::{PackedWeights, QuantizedActs};
use super::transform_quant::FusedTransform;
use crate::error::{Error, Result};
use crate::quant::{QuantSpec, SymScale};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::ffi::c_int;
use std::sync::Arc;

const PTX: &str = include_str!(env!(
    "AFFQ_CUDA_PTX",
    "the cuda feature embeds PTX compiled by scripts/build-cuda.sh, which sets AFFQ_CUDA_PTX"
));

/// k padding of the GPU layouts (the GEMM's k tile).
pub const KP_ALIGN: usize = 32;

/// Every driver entry point cudarc's safe API reaches on the paths used here (context on the
/// default stream, module load, function attribute, stream-ordered or plain alloc/free, copies,
/// launch, synchronize, error strings). Checked up front: a missing one would panic in cudarc.
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuStreamSynchronize",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunction",
    "cuFuncSetAttribute",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuLaunchKernel",
    "cuGetErrorString",
    "cuGetErrorName",
];

/// A GPU with the kernels loaded (device 0, its primary context, the default stream).
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    transform_quantize: CudaFunction,
    int_gemm: CudaFunction,
    pub name: String,
}

fn err(what: &str) -> Error {
    Error::Runtime(format!("cuda: {what}"))
}

/// `what: <the driver's error string>`, as the hand-written version printed it.
fn drv(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| {
        let msg = match e.error_string() {
            Ok(s) => s.to_string_lossy().into_owned(),
            Err(_) => format!("error {:?}", e.0),
        };
        err(&format!("{what}: {msg}"))
    }
}

/// Fails (instead of cudarc panicking later) when the driver library or one of the symbols
/// cudarc will resolve is absent.
fn check_driver() -> Result<()> {
    // SAFETY: opens (and closes) the candidate driver libraries, calls nothing in them.
    if !unsafe { sys::is_culib_present() } {
        return Err(err(
            "libcuda.so.1 not found: no NVIDIA driver on this machine (--device cpu runs the same model)",
        ));
    }
    // SAFETY: present, so `culib` loads it rather than panicking; symbols are only looked up.
    let lib = unsafe { sys::culib() };
    for name in SYMBOLS {
        // SAFETY: a lookup only; the symbol is never called through this type.
        if unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err() {
            return Err(err(&format!("driver lacks {name}")));
        }
    }
    Ok(())
}

/// Element types whose bytes go to and from device memory as they are: no padding, every bit
/// pattern valid.
pub trait Plain: Copy + sealed::Sealed {}
mod sealed {
    pub trait Sealed {}
}
macro_rules! plain {
    ($($t:ty),*) => {$(impl sealed::Sealed for $t {} impl Plain for $t {})*};
}
plain!(u8, i8, i32, u32, f32);

fn bytes_of<T: Plain>(v: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

fn bytes_of_mut<T: Plain>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid `Plain` value.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v)) }
}

impl Cuda {
    /// Opens the driver and loads the kernels; an error says what is missing.
    pub fn new() -> Result<Arc<Cuda>> {
        check_driver()?;
        let ctx = CudaContext::new(0).map_err(drv("opening device 0"))?;
        // SAFETY: one stream (the default one) only, so cudarc's per-buffer cross-stream events
        // are not needed; without this every allocation also creates two events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        if PTX.contains('\0') {
            return Err(err("the embedded PTX contains a NUL byte"));
        }
        let module = ctx
            .load_module(Ptx::from_src(PTX))
            .map_err(drv("loading the kernels' PTX"))?;
        let get = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| err(&format!("kernel {name:?} missing from the PTX ({e:?})")))
        };
        let (transform_quantize, int_gemm) = (get("transform_quantize")?, get("int_gemm")?);
        Ok(Arc::new(Cuda {
            ctx,
            stream,
            transform_quantize,
            int_gemm,
            name,
        }))
    }

    fn current(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv("cuCtxSetCurrent"))
    }

    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        // SAFETY: uninitialised device memory, as from cuMemAlloc; every kernel writes its
        // outputs in full before they are read.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(drv(&format!("allocating {bytes} bytes")))?;
        Ok(DeviceBuffer { slice, bytes })
    }

    pub fn upload<T: Plain>(self: &Arc<Self>, data: &[T]) -> Result<DeviceBuffer> {
        let mut b = self.alloc(std::mem::size_of_val(data))?;
        self.stream
            .memcpy_htod(bytes_of(data), &mut b.slice)
            .map_err(drv("copy to the GPU"))?;
        Ok(b)
    }

    pub fn download<T: Plain>(&self, b: &DeviceBuffer, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes > b.bytes {
            return Err(err("download larger than the buffer"));
        }
        // Into pageable memory the copy has completed when the call returns.
        self.stream
            .memcpy_dtoh(&b.slice.slice(..bytes), bytes_of_mut(out))
            .map_err(drv("copy from the GPU"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(drv("synchronize"))
    }
}

/// Device memory, freed on drop (stream-ordered where the device has memory pools).
pub struct DeviceBuffer {
    slice: CudaSlice<u8>,
    bytes: usize,
}

const NULL: sys::CUdeviceptr = 0;

/// Pushes `b`'s device pointer, or a null pointer (the kernels read null as "absent").
fn arg_opt<'a>(l: &mut LaunchArgs<'a>, b: Option<&'a DeviceBuffer>) {
    match b {
        Some(b) => l.arg(&b.slice),
        None => l.arg(&NULL),
    };
}

/// An online transform's factors on the GPU (absent factors are identities).
pub struct CudaTransform {
    n1: usize,
    n2: usize,
    p1: Option<DeviceBuffer>,
    p2: Option<DeviceBuffer>,
    scale: Option<DeviceBuffer>,
}

impl CudaTransform {
    pub fn new(cuda: &Arc<Cuda>, t: &FusedTransform) -> Result<Self> {
        let f = t.factors();
        Ok(CudaTransform {
            n1: f.n1,
            n2: f.n2,
            p1: Some(cuda.upload(f.p1)?),
            p2: Some(cuda.upload(f.p2)?),
            scale: f.scale.map(|s| cuda.upload(s)).transpose()?,
        })
    }
}

/// Per-token activation codes on the GPU, `[m, kp]` with `kp` a multiple of [`KP_ALIGN`].
pub struct DeviceActs {
    pub m: usize,
    pub kp: usize,
    q: DeviceBuffer,
    scale: DeviceBuffer,
    sum: DeviceBuffer,
}

impl DeviceActs {
    /// Copies the codes back (for tests: compare with the CPU quantizer).
    pub fn to_host(&self, cuda: &Cuda, k: usize) -> Result<QuantizedActs> {
        let mut q = vec![0i8; self.m * self.kp];
        let mut scale = vec![0f32; self.m];
        let mut sum = vec![0i32; self.m];
        cuda.download(&self.q, &mut q)?;
        cuda.download(&self.scale, &mut scale)?;
        cuda.download(&self.sum, &mut sum)?;
        let kp = k.div_ceil(super::int_gemm::KB) * super::int_gemm::KB;
        let mut qq = vec![0i8; self.m * kp];
        for r in 0..self.m {
            qq[r * kp..r * kp + k].copy_from_slice(&q[r * self.kp..r * self.kp + k]);
        }
        let max_abs = qq.iter().map(|&v| (v as i32).abs()).max().unwrap_or(0);
        Ok(QuantizedActs::new(self.m, kp, qq, scale, sum, max_abs))
    }
}

/// Whether the GPU kernel quantizes with `spec` (symmetric per token, ≤ 8 bits).
pub fn act_supported(spec: &QuantSpec) -> bool {
    spec.symmetric && spec.bits <= 8
}

/// Fused online transform + per-token quantization of `x` (`[m, k]` f32 on the GPU).
pub fn transform_quantize(
    cuda: &Arc<Cuda>,
    xd: &DeviceBuffer,
    m: usize,
    k: usize,
    t: Option<&CudaTransform>,
    spec: &QuantSpec,
) -> Result<DeviceActs> {
    if !act_supported(spec) {
        return Err(err(&format!("no GPU kernel for activation grid {spec:?}")));
    }
    let (n1, n2) = t.map_or((1, k), |t| (t.n1, t.n2));
    if n1 * n2 != k || xd.bytes < 4 * m * k {
        return Err(err(&format!(
            "transform {n1}×{n2} on {m} rows of {k} ({} bytes)",
            xd.bytes
        )));
    }
    let kp = k.div_ceil(KP_ALIGN) * KP_ALIGN;
    let mut acts = DeviceActs {
        m,
        kp,
        q: cuda.alloc(m * kp)?,
        scale: cuda.alloc(4 * m)?,
        sum: cuda.alloc(4 * m)?,
    };
    let half = (1u32 << (spec.bits - 1)) as f32;
    let div = match spec.sym_scale {
        SymScale::MaxPos => half - 1.0,
        SymScale::HalfRange => spec.qmax() as f32 / 2.0,
        SymScale::SignedMax => half,
    };
    let (m_, n1_, n2_, kp_) = (m as c_int, n1 as c_int, n2 as c_int, kp as c_int);
    let (chi, clo, zero, qmax) = (spec.clip, spec.clip_min, half, spec.qmax() as f32);
    let smem = 2 * k * 4;
    if smem > 48 * 1024 {
        cuda.current()?;
        cuda.transform_quantize
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as c_int,
            )
            .map_err(drv("shared memory for the transform"))?;
    }
    let cfg = LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    {
        let mut l = cuda.stream.launch_builder(&cuda.transform_quantize);
        l.arg(&xd.slice);
        arg_opt(&mut l, t.and_then(|t| t.p1.as_ref()));
        arg_opt(&mut l, t.and_then(|t| t.p2.as_ref()));
        arg_opt(&mut l, t.and_then(|t| t.scale.as_ref()));
        l.arg(&m_).arg(&n1_).arg(&n2_).arg(&kp_);
        l.arg(&chi).arg(&clo).arg(&div).arg(&zero).arg(&qmax);
        l.arg(&mut acts.q.slice)
            .arg(&mut acts.scale.slice)
            .arg(&mut acts.sum.slice);
        // SAFETY: parameters in the order and types of `transform_quantize` in int_kernels.cu.
        unsafe { l.launch(cfg) }.map_err(drv("transform_quantize"))?;
    }
    Ok(acts)
}

/// Weights on the GPU as signed int8 codes `c − z` (`[n, kp]`), scales and bias.
pub struct CudaWeights {
    pub n: usize,
    pub k: usize,
    kp: usize,
    w: DeviceBuffer,
    scale: DeviceBuffer,
    bias: Option<DeviceBuffer>,
}

impl CudaWeights {
    pub fn new(cuda: &Arc<Cuda>, p: &PackedWeights, bias: Option<&[f32]>) -> Result<Self> {
        let kp = p.k.div_ceil(KP_ALIGN) * KP_ALIGN;
        let mut w = vec![0i8; p.n * kp];
        for o in 0..p.n {
            for j in 0..p.k {
                let v = p.code(o, j) as i32 - p.zero[o];
                w[o * kp + j] = i8::try_from(v).map_err(|_| {
                    err(&format!(
                        "weight code {v} does not fit int8 (use ≤ 7-bit weights)"
                    ))
                })?;
            }
        }
        Ok(CudaWeights {
            n: p.n,
            k: p.k,
            kp,
            w: cuda.upload(&w)?,
            scale: cuda.upload(&p.scale)?,
            bias: bias.map(|b| cuda.upload(b)).transpose()?,
        })
    }
}

/// `y = dequant(a·wᵀ) + b` (`[m, n]` f32 on the GPU).
pub fn gemm(cuda: &Arc<Cuda>, a: &DeviceActs, w: &CudaWeights) -> Result<DeviceBuffer> {
    if a.kp != w.kp {
        return Err(err(&format!(
            "activations padded to {} against weights padded to {}",
            a.kp, w.kp
        )));
    }
    let mut out = cuda.alloc(4 * a.m * w.n)?;
    let (m_, n_, kp_) = (a.m as c_int, w.n as c_int, a.kp as c_int);
    let cfg = LaunchConfig {
        grid_dim: (w.n.div_ceil(64) as u32, a.m.div_ceil(64) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    {
        let mut l = cuda.stream.launch_builder(&cuda.int_gemm);
        l.arg(&a.q.slice)
            .arg(&a.scale.slice)
            .arg(&w.w.slice)
            .arg(&w.scale.slice);
        arg_opt(&mut l, w.bias.as_ref());
        l.arg(&m_).arg(&n_).arg(&kp_);
        l.arg(&mut out.slice);
        // SAFETY: parameters in the order and types of `int_gemm` in int_kernels.cu.
        unsafe { l.launch(cfg) }.map_err(drv("int_gemm"))?;
    }
    Ok(out)
}

/// The whole site on the GPU from host activations: upload, transform + quantize, one GEMM per
/// weight, download each output.
pub fn forward_site(
    cuda: &Arc<Cuda>,
    x: &[f32],
    k: usize,
    t: Option<&CudaTransform>,
    spec: &QuantSpec,
    weights: &[&CudaWeights],
) -> Result<Vec<Vec<f32>>> {
    let m = x.len() / k.max(1);
    let xd = cuda.upload(x)?;
    let acts = transform_quantize(cuda, &xd, m, k, t, spec)?;
    weights
        .iter()
        .map(|w| {
            let yd = gemm(cuda, &acts, w)?;
            let mut y = vec![0f32; m * w.n];
            cuda.download(&yd, &mut y)?;
            Ok(y)
        })
        .collect()
}
