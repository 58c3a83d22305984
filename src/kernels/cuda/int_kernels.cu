// CUDA kernels of the W4A4 / W4A8 / W8A8 inference path (the GPU twin of transform_quant.rs and
// int_gemm.rs), compiled to PTX ahead of time (scripts/build-cuda.sh, NVRTC) and loaded with the
// driver API, so neither the build nor the GPU machine needs a CUDA toolkit.
//
// transform_quantize: one thread block per token row x (n = n1·n2 values):
//   Y = P1ᵀ·(diag(c)·X)·P2   (the row form of x·diag(c)·(P1⊗P2), FlatQuant eq. 4)
//   s = clip·amax(Y) / div,  q = clamp(rint(Y/s + z), 0, qmax) − z   (per-token symmetric,
//   the simulated quantizer's grid and ties-to-even rounding), stored as int8 with Σq.
// int_gemm: C[m, n] = s_a[m]·s_w[n]·Σ_k q_a[m, k]·q_w[n, k] + b[n] with int8 tensor cores
//   (WMMA 16×16×16, s32 accumulators: exact), Hopper has no int4 MMA so 4-bit weight codes are
//   stored as int8 (q_w = c − z_w).

#include <mma.h>
using namespace nvcuda;

extern "C" __global__ void transform_quantize(
    const float* __restrict__ x,      // [m, n]
    const float* __restrict__ p1,     // [n1, n1] or null (identity)
    const float* __restrict__ p2,     // [n2, n2] or null
    const float* __restrict__ cscale, // [n] or null
    int m, int n1, int n2, int kp,
    float clip_hi, float clip_lo, float div, float zero, float qmax,
    signed char* __restrict__ q,      // [m, kp], zero padded
    float* __restrict__ scale,        // [m]
    int* __restrict__ sum)            // [m]
{
    extern __shared__ float smem[];
    const int n = n1 * n2;
    float* sx = smem;       // X, then Y
    float* st = smem + n;   // X·P2
    __shared__ float red_hi[32], red_lo[32];
    __shared__ int red_sum[32];
    const int row = blockIdx.x;
    if (row >= m) return;
    const float* xr = x + (size_t)row * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        sx[i] = cscale ? xr[i] * cscale[i] : xr[i];
    __syncthreads();
    // T = X·P2
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        int i = e / n2, j = e % n2;
        float acc = 0.f;
        if (p2) {
            for (int l = 0; l < n2; ++l) acc = fmaf(sx[i * n2 + l], p2[l * n2 + j], acc);
        } else {
            acc = sx[e];
        }
        st[e] = acc;
    }
    __syncthreads();
    // Y = P1ᵀ·T, row extremes
    float hi = -__int_as_float(0x7f800000), lo = __int_as_float(0x7f800000);
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        int i = e / n2, j = e % n2;
        float acc = 0.f;
        if (p1) {
            for (int r = 0; r < n1; ++r) acc = fmaf(p1[r * n1 + i], st[r * n2 + j], acc);
        } else {
            acc = st[e];
        }
        sx[e] = acc;
        hi = fmaxf(hi, acc);
        lo = fminf(lo, acc);
    }
    for (int o = 16; o > 0; o >>= 1) {
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffff, hi, o));
        lo = fminf(lo, __shfl_xor_sync(0xffffffff, lo, o));
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) { red_hi[warp] = hi; red_lo[warp] = lo; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < warps; ++w) { hi = fmaxf(hi, red_hi[w]); lo = fminf(lo, red_lo[w]); }
        red_hi[0] = hi; red_lo[0] = lo;
    }
    __syncthreads();
    hi = red_hi[0] * clip_hi;
    lo = red_lo[0] * clip_lo;
    float amax = fmaxf(fmaxf(hi, -lo), 0.f);
    float s = amax > 0.f ? __fdiv_rn(amax, div) : 1.f;
    signed char* qr = q + (size_t)row * kp;
    int acc = 0;
    for (int e = threadIdx.x; e < kp; e += blockDim.x) {
        int v = 0;
        if (e < n) {
            float c = rintf(__fadd_rn(__fdiv_rn(sx[e], s), zero));
            c = fminf(fmaxf(c, 0.f), qmax);
            v = (int)(c - zero);
        }
        qr[e] = (signed char)v;
        acc += v;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    __syncthreads();
    if (lane == 0) red_sum[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < warps; ++w) acc += red_sum[w];
        scale[row] = s;
        sum[row] = acc;
    }
}

// Block tile 64 (m) × 64 (n) × 32 (k), four warps each owning 32 × 32 (2 × 2 fragments).
#define BM 64
#define BN 64
#define BK 32

extern "C" __global__ void int_gemm(
    const signed char* __restrict__ a,   // [m, kp] activation codes
    const float* __restrict__ sa,        // [m]
    const signed char* __restrict__ w,   // [n, kp] weight codes minus zero
    const float* __restrict__ sw,        // [n]
    const float* __restrict__ bias,      // [n] or null
    int m, int n, int kp,                // kp: multiple of BK
    float* __restrict__ c)               // [m, n]
{
    // Shared tiles split by k half so every fragment starts on a 256-bit boundary:
    // [half][row][16].
    __shared__ __align__(128) signed char As[2][BM][16];
    __shared__ __align__(128) signed char Bs[2][BN][16];
    __shared__ __align__(128) int Cs[4][32 * 32];
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[2][2];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0);
    for (int k0 = 0; k0 < kp; k0 += BK) {
        // 128 threads load 64 rows × 32 bytes of A and of B as int4 (16-byte) words.
        for (int t = threadIdx.x; t < BM * 2; t += blockDim.x) {
            int r = t / 2, h = t % 2;
            int4 va = make_int4(0, 0, 0, 0), vb = make_int4(0, 0, 0, 0);
            if (m0 + r < m) va = *reinterpret_cast<const int4*>(a + (size_t)(m0 + r) * kp + k0 + 16 * h);
            if (n0 + r < n) vb = *reinterpret_cast<const int4*>(w + (size_t)(n0 + r) * kp + k0 + 16 * h);
            *reinterpret_cast<int4*>(&As[h][r][0]) = va;
            *reinterpret_cast<int4*>(&Bs[h][r][0]) = vb;
        }
        __syncthreads();
        for (int h = 0; h < 2; ++h) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[2];
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[h][wm + 16 * i][0], 16);
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[h][wn + 16 * j][0], 16);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    int* cw = Cs[warp];
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(cw + (16 * i) * 32 + 16 * j, acc[i][j], 32, wmma::mem_row_major);
    __syncwarp();
    const int lane = threadIdx.x % 32;
    for (int e = lane; e < 32 * 32; e += 32) {
        int r = m0 + wm + e / 32, col = n0 + wn + e % 32;
        if (r < m && col < n) {
            float y = sa[r] * sw[col] * (float)cw[e];
            c[(size_t)r * n + col] = bias ? y + bias[col] : y;
        }
    }
}
