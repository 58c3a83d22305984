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
    dims: (usize, usize, usize),
    dst: &mut [T],
    ld: usize,
    acc: bool,
    lhs: Operand<T>,
    rhs: Operand<T>,
    beta: T,
    parallelism: Parallelism,
) {
    // SAFETY: `dst` is a unique borrow of `dst.len()` initialised elements, so it aliases
    // neither operand.
    unsafe {
        gemm_into(
            dims,
            (dst.as_mut_ptr(), dst.len()),
            ld,
            acc,
            lhs,
            rhs,
            beta,
            parallelism,
        )
    }
}

/// `beta·lhs[m × k]·rhs[k × n]` as a new row-major `[m × n]` vector. The destination is not
/// cleared first: without `acc` the `gemm` crate never reads it (`read_dst = false` sets its
/// `alpha` to zero, and every kernel then stores without loading, `k = 0` included), and it
/// writes each of the `m·n` elements.
pub fn product<T: Scalar>(
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    beta: T,
    parallelism: Parallelism,
) -> Vec<T> {
    let len = m * n;
    let mut dst: Vec<T> = Vec::with_capacity(len);
    // SAFETY: the allocation holds `len` elements and is this function's alone; with
    // `acc = false` the product only stores into it (above), every element once, so all `len`
    // are initialised when the length is set.
    unsafe {
        gemm_into(
            (m, n, k),
            (dst.as_mut_ptr(), len),
            n,
            false,
            lhs,
            rhs,
            beta,
            parallelism,
        );
        dst.set_len(len);
    }
    dst
}

/// [`gemm`] into `dst`, `(pointer, elements)`. Panics when an operand is shorter than its extent.
///
/// # Safety
/// `dst` must be valid for writes of its `elements` (and for reads with `acc`), and must not
/// overlap either operand.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Scalar>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_len): (*mut T, usize),
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
        dst_len >= extent(m, n, 1, ld),
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
    // SAFETY: every element addressed lies inside its buffer (asserted above); the caller
    // guarantees `dst` is writable and apart from the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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
