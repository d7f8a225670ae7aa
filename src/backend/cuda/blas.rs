//! Row-major GEMM over cuBLAS (`cublasGemmEx`, f32 compute: no TF32, no reduced-precision
//! accumulation), on raw device pointers so that sub-matrices (column blocks, slices with a
//! leading dimension) need no copies.

use super::{Cuda, DType, berr};
use crate::error::Result;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};

fn cu_type(d: DType) -> cudaDataType_t {
    match d {
        DType::F32 => cudaDataType_t::CUDA_R_32F,
        DType::F16 => cudaDataType_t::CUDA_R_16F,
        DType::BF16 => cudaDataType_t::CUDA_R_16BF,
    }
}

/// One row-major matrix operand: device pointer, leading (row) stride, transposed or not.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub ptr: u64,
    pub ld: usize,
    pub t: bool,
}

impl Mat {
    /// A plain (not transposed) operand with row stride `ld`.
    pub fn n(ptr: u64, ld: usize) -> Mat {
        Mat { ptr, ld, t: false }
    }
    /// A transposed operand: the stored matrix has row stride `ld` and is used as its transpose.
    pub fn t(ptr: u64, ld: usize) -> Mat {
        Mat { ptr, ld, t: true }
    }
}

impl Cuda {
    /// `C [m, n] = alpha op(A) [m, k] op(B) [k, n] + beta C`, all row-major; A and B of dtype
    /// `ab`, C of dtype `c_type` with row stride `ldc`. Nothing happens when m or n is 0.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Mat,
        b: Mat,
        beta: f32,
        c: u64,
        ldc: usize,
        ab: DType,
        c_type: DType,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let int = |v: usize| -> Result<i32> {
            i32::try_from(v).map_err(|_| berr(format!("GEMM dimension {v} exceeds i32")))
        };
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
        self.inner.ctx.bind_to_thread().map_err(berr)?;
        let (alpha, beta) = (alpha, beta);
        // SAFETY: pointers are live device buffers whose sizes the callers checked against
        // (m, n, k, ld*); alpha/beta are host f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.inner.blas.handle(),
                op(b.t),
                op(a.t),
                int(n)?,
                int(m)?,
                int(k)?,
                (&alpha) as *const f32 as *const _,
                b.ptr as *const _,
                cu_type(ab),
                int(b.ld.max(1))?,
                a.ptr as *const _,
                cu_type(ab),
                int(a.ld.max(1))?,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                cu_type(c_type),
                int(ldc.max(1))?,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| berr(format!("cublasGemmEx({m}x{n}x{k}): {e:?}")))
    }

    /// [`Cuda::gemm`] with A, B and C of the storage dtype.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_s(
        &self,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Mat,
        b: Mat,
        beta: f32,
        c: u64,
        ldc: usize,
    ) -> Result<()> {
        self.gemm(m, n, k, alpha, a, b, beta, c, ldc, self.dtype, self.dtype)
    }
}
