//! The one door to the `gemm` crate for products on slices: each operand is given as (elements,
//! column stride, row stride), so a transpose is read through its strides, and every call checks
//! that the slices hold every element the shapes and strides address.

pub use gemm::Parallelism;

/// The parallelism candle's own matmul uses: its thread count, serial for one thread.
pub fn candle_parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        t if t > 1 => Parallelism::Rayon(t),
        _ => Parallelism::None,
    }
}

/// The element types the products run in.
pub trait Scalar: Copy + 'static {
    const ZERO: Self;
    const ONE: Self;
}

impl Scalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Scalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// An operand from its first addressed element: `(a, 1, ld)` is a row-major matrix of row stride
/// `ld`, `(a, ld, 1)` the transpose of one.
pub type Operand<'a, T> = (&'a [T], usize, usize);

/// Elements spanned by `rows × cols` at column stride `cs` and row stride `rs`.
fn extent(rows: usize, cols: usize, cs: usize, rs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst[m × n] = (dst if acc, else 0) + beta·lhs[m × k]·rhs[k × n]`, `dst` row-major with row
/// stride `ld`. Panics when a slice is shorter than its operand's extent.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Scalar>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    ld: usize,
    acc: bool,
    (lhs, lcs, lrs): Operand<T>,
    (rhs, rcs, rrs): Operand<T>,
    beta: T,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() >= extent(m, n, 1, ld),
        "gemm: destination too short"
    );
    assert!(
        lhs.len() >= extent(m, k, lcs, lrs),
        "gemm: left operand too short"
    );
    assert!(
        rhs.len() >= extent(k, n, rcs, rrs),
        "gemm: right operand too short"
    );
    // SAFETY: every element addressed lies inside its slice (asserted above); `dst` is a unique
    // borrow, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            acc,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            if acc { T::ONE } else { T::ZERO },
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}
