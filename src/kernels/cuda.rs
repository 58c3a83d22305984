//! The integer inference path on an NVIDIA GPU (`--features cuda`, `--device cuda`).
//!
//! The kernels (`cuda/int_kernels.cu`) are compiled to PTX at build time by
//! `scripts/build-cuda.sh` (NVRTC from PyPI's wheel, no CUDA toolkit) and embedded; at run time
//! the driver library `libcuda.so.1` is opened with `dlopen` and the PTX is JIT-compiled for the
//! GPU by the driver. Nothing CUDA is needed to build or run the CPU binary.
//!
//! Scope: the quantized linears of a site run on the GPU — upload the site input, fused online
//! transform + per-token quantization (`transform_quantize`), int8 tensor-core GEMM with the
//! scales in the epilogue (`int_gemm`), download the outputs. The rest of the decoder stays on
//! the CPU.

use super::int_gemm::{PackedWeights, QuantizedActs};
use super::transform_quant::FusedTransform;
use crate::error::{Error, Result};
use crate::quant::{QuantSpec, SymScale};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Arc;

const PTX: &str = concat!(
    include_str!(env!(
        "AFFQ_CUDA_PTX",
        "the cuda feature embeds PTX compiled by scripts/build-cuda.sh, which sets AFFQ_CUDA_PTX"
    )),
    "\0"
);

/// k padding of the GPU layouts (the GEMM's k tile).
pub const KP_ALIGN: usize = 32;
const CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: c_int = 8;

type CuResult = c_int;
type Ptr = u64;

/// Driver API entry points resolved with `dlsym`.
#[allow(non_snake_case)]
struct Api {
    cuInit: unsafe extern "C" fn(c_uint) -> CuResult,
    cuDeviceGet: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    cuDeviceGetName: unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult,
    cuDevicePrimaryCtxRetain: unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult,
    cuCtxSetCurrent: unsafe extern "C" fn(*mut c_void) -> CuResult,
    cuCtxSynchronize: unsafe extern "C" fn() -> CuResult,
    cuModuleLoadData: unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult,
    cuModuleGetFunction:
        unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult,
    cuFuncSetAttribute: unsafe extern "C" fn(*mut c_void, c_int, c_int) -> CuResult,
    cuMemAlloc_v2: unsafe extern "C" fn(*mut Ptr, usize) -> CuResult,
    cuMemFree_v2: unsafe extern "C" fn(Ptr) -> CuResult,
    cuMemcpyHtoD_v2: unsafe extern "C" fn(Ptr, *const c_void, usize) -> CuResult,
    cuMemcpyDtoH_v2: unsafe extern "C" fn(*mut c_void, Ptr, usize) -> CuResult,
    #[allow(clippy::type_complexity)]
    cuLaunchKernel: unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    cuGetErrorString: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
}

/// A GPU with the kernels loaded (device 0, its primary context).
pub struct Cuda {
    api: Api,
    ctx: *mut c_void,
    transform_quantize: *mut c_void,
    int_gemm: *mut c_void,
    pub name: String,
}

// SAFETY: the driver API is thread safe; every call first makes the primary context current.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

fn err(what: &str) -> Error {
    Error::Runtime(format!("cuda: {what}"))
}

impl Cuda {
    /// Opens the driver and loads the kernels; an error says what is missing.
    pub fn new() -> Result<Arc<Cuda>> {
        // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the documented
        // signature of that driver API function.
        unsafe {
            let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW);
            if lib.is_null() {
                return Err(err(
                    "libcuda.so.1 not found: no NVIDIA driver on this machine (--device cpu runs the same model)",
                ));
            }
            macro_rules! sym {
                ($name:ident) => {{
                    let p = libc::dlsym(lib, concat!(stringify!($name), "\0").as_ptr().cast());
                    if p.is_null() {
                        return Err(err(concat!("driver lacks ", stringify!($name))));
                    }
                    // The field's type is the function's signature; a fn pointer has the size
                    // of a data pointer.
                    std::mem::transmute_copy(&p)
                }};
            }
            let api = Api {
                cuInit: sym!(cuInit),
                cuDeviceGet: sym!(cuDeviceGet),
                cuDeviceGetName: sym!(cuDeviceGetName),
                cuDevicePrimaryCtxRetain: sym!(cuDevicePrimaryCtxRetain),
                cuCtxSetCurrent: sym!(cuCtxSetCurrent),
                cuCtxSynchronize: sym!(cuCtxSynchronize),
                cuModuleLoadData: sym!(cuModuleLoadData),
                cuModuleGetFunction: sym!(cuModuleGetFunction),
                cuFuncSetAttribute: sym!(cuFuncSetAttribute),
                cuMemAlloc_v2: sym!(cuMemAlloc_v2),
                cuMemFree_v2: sym!(cuMemFree_v2),
                cuMemcpyHtoD_v2: sym!(cuMemcpyHtoD_v2),
                cuMemcpyDtoH_v2: sym!(cuMemcpyDtoH_v2),
                cuLaunchKernel: sym!(cuLaunchKernel),
                cuGetErrorString: sym!(cuGetErrorString),
            };
            let mut cuda = Cuda {
                api,
                ctx: std::ptr::null_mut(),
                transform_quantize: std::ptr::null_mut(),
                int_gemm: std::ptr::null_mut(),
                name: String::new(),
            };
            cuda.check((cuda.api.cuInit)(0), "cuInit")?;
            let mut dev = 0;
            cuda.check((cuda.api.cuDeviceGet)(&mut dev, 0), "cuDeviceGet")?;
            let mut name = [0 as c_char; 256];
            cuda.check(
                (cuda.api.cuDeviceGetName)(name.as_mut_ptr(), 256, dev),
                "cuDeviceGetName",
            )?;
            cuda.name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            let mut ctx = std::ptr::null_mut();
            cuda.check(
                (cuda.api.cuDevicePrimaryCtxRetain)(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            cuda.ctx = ctx;
            cuda.check((cuda.api.cuCtxSetCurrent)(cuda.ctx), "cuCtxSetCurrent")?;
            let mut module = std::ptr::null_mut();
            cuda.check(
                (cuda.api.cuModuleLoadData)(&mut module, PTX.as_ptr().cast()),
                "loading the kernels' PTX",
            )?;
            let get = |name: &CStr| -> Result<*mut c_void> {
                let mut f = std::ptr::null_mut();
                let rc = (cuda.api.cuModuleGetFunction)(&mut f, module, name.as_ptr());
                if rc != 0 {
                    return Err(err(&format!("kernel {name:?} missing from the PTX ({rc})")));
                }
                Ok(f)
            };
            let (tq, gm) = (get(c"transform_quantize")?, get(c"int_gemm")?);
            cuda.transform_quantize = tq;
            cuda.int_gemm = gm;
            Ok(Arc::new(cuda))
        }
    }

    fn check(&self, rc: CuResult, what: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a static string pointer (or leaves it null).
        let msg = unsafe {
            (self.api.cuGetErrorString)(rc, &mut s);
            if s.is_null() {
                format!("error {rc}")
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        };
        Err(err(&format!("{what}: {msg}")))
    }

    fn current(&self) -> Result<()> {
        // SAFETY: the context is retained for the process lifetime.
        self.check(
            unsafe { (self.api.cuCtxSetCurrent)(self.ctx) },
            "cuCtxSetCurrent",
        )
    }

    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DeviceBuffer> {
        self.current()?;
        let mut ptr = 0;
        // SAFETY: out-pointer to a local.
        self.check(
            unsafe { (self.api.cuMemAlloc_v2)(&mut ptr, bytes.max(1)) },
            &format!("allocating {bytes} bytes"),
        )?;
        Ok(DeviceBuffer {
            ptr,
            bytes,
            cuda: self.clone(),
        })
    }

    pub fn upload<T: Copy>(self: &Arc<Self>, data: &[T]) -> Result<DeviceBuffer> {
        let b = self.alloc(std::mem::size_of_val(data))?;
        // SAFETY: the buffer holds exactly the bytes of `data`.
        self.check(
            unsafe { (self.api.cuMemcpyHtoD_v2)(b.ptr, data.as_ptr().cast(), b.bytes) },
            "copy to the GPU",
        )?;
        Ok(b)
    }

    pub fn download<T: Copy>(&self, b: &DeviceBuffer, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes > b.bytes {
            return Err(err("download larger than the buffer"));
        }
        self.current()?;
        // SAFETY: `out` has room for `bytes`, the buffer holds at least that many.
        self.check(
            unsafe { (self.api.cuMemcpyDtoH_v2)(out.as_mut_ptr().cast(), b.ptr, bytes) },
            "copy from the GPU",
        )
    }

    pub fn synchronize(&self) -> Result<()> {
        self.current()?;
        // SAFETY: no arguments.
        self.check(unsafe { (self.api.cuCtxSynchronize)() }, "synchronize")
    }

    /// # Safety
    /// `params` must match the kernel's parameter list in number, order and type.
    unsafe fn launch(
        &self,
        f: *mut c_void,
        grid: (u32, u32),
        block: u32,
        smem: u32,
        params: &mut [*mut c_void],
        what: &str,
    ) -> Result<()> {
        self.current()?;
        self.check(
            (self.api.cuLaunchKernel)(
                f,
                grid.0,
                grid.1,
                1,
                block,
                1,
                1,
                smem,
                std::ptr::null_mut(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            ),
            what,
        )
    }
}

/// Device memory, freed on drop.
pub struct DeviceBuffer {
    ptr: Ptr,
    bytes: usize,
    cuda: Arc<Cuda>,
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc in this context, freed once.
        unsafe { (self.cuda.api.cuMemFree_v2)(self.ptr) };
    }
}

fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
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
    let acts = DeviceActs {
        m,
        kp,
        q: cuda.alloc(m * kp)?,
        scale: cuda.alloc(4 * m)?,
        sum: cuda.alloc(4 * m)?,
    };
    let half = (1u32 << (spec.bits - 1)) as f32;
    let mut div = match spec.sym_scale {
        SymScale::MaxPos => half - 1.0,
        SymScale::HalfRange => spec.qmax() as f32 / 2.0,
    };
    let ptr = |b: Option<&DeviceBuffer>| b.map_or(0, |b| b.ptr);
    let (mut px, mut p1, mut p2, mut pc) = (
        xd.ptr,
        ptr(t.and_then(|t| t.p1.as_ref())),
        ptr(t.and_then(|t| t.p2.as_ref())),
        ptr(t.and_then(|t| t.scale.as_ref())),
    );
    let (mut m_, mut n1_, mut n2_, mut kp_) = (m as c_int, n1 as c_int, n2 as c_int, kp as c_int);
    let (mut chi, mut clo, mut zero, mut qmax) =
        (spec.clip, spec.clip_min, half, spec.qmax() as f32);
    let (mut pq, mut ps, mut psum) = (acts.q.ptr, acts.scale.ptr, acts.sum.ptr);
    let smem = 2 * k * 4;
    if smem > 48 * 1024 {
        // SAFETY: attribute set on a loaded function.
        cuda.check(
            unsafe {
                (cuda.api.cuFuncSetAttribute)(
                    cuda.transform_quantize,
                    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as c_int,
                )
            },
            "shared memory for the transform",
        )?;
    }
    let mut params = [
        arg(&mut px),
        arg(&mut p1),
        arg(&mut p2),
        arg(&mut pc),
        arg(&mut m_),
        arg(&mut n1_),
        arg(&mut n2_),
        arg(&mut kp_),
        arg(&mut chi),
        arg(&mut clo),
        arg(&mut div),
        arg(&mut zero),
        arg(&mut qmax),
        arg(&mut pq),
        arg(&mut ps),
        arg(&mut psum),
    ];
    // SAFETY: parameters in the order and types of `transform_quantize` in int_kernels.cu.
    unsafe {
        cuda.launch(
            cuda.transform_quantize,
            (m as u32, 1),
            256,
            smem as u32,
            &mut params,
            "transform_quantize",
        )?
    };
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
    let out = cuda.alloc(4 * a.m * w.n)?;
    let (mut pa, mut psa, mut pw, mut psw, mut pb, mut pc) = (
        a.q.ptr,
        a.scale.ptr,
        w.w.ptr,
        w.scale.ptr,
        w.bias.as_ref().map_or(0, |b| b.ptr),
        out.ptr,
    );
    let (mut m_, mut n_, mut kp_) = (a.m as c_int, w.n as c_int, a.kp as c_int);
    let mut params = [
        arg(&mut pa),
        arg(&mut psa),
        arg(&mut pw),
        arg(&mut psw),
        arg(&mut pb),
        arg(&mut m_),
        arg(&mut n_),
        arg(&mut kp_),
        arg(&mut pc),
    ];
    // SAFETY: parameters in the order and types of `int_gemm` in int_kernels.cu.
    unsafe {
        cuda.launch(
            cuda.int_gemm,
            (w.n.div_ceil(64) as u32, a.m.div_ceil(64) as u32),
            128,
            0,
            &mut params,
            "int_gemm",
        )?
    };
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
