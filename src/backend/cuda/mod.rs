//! The CUDA backend: cudarc over the driver API, kernels from `kernels/*.cu` compiled at run
//! time by NVRTC (see [`kernels`]), cuBLAS for the large dense products.
//!
//! * Storage: every tensor holds one dtype, f32 (the default, [`Cuda::new`]), f16 or bf16
//!   ([`Cuda::with_dtype`]); [`crate::backend::Backend::upload`] converts from f32 (round to nearest even) and
//!   [`crate::backend::Backend::download`] back to f32. Kernels accumulate in f32 (f64 where the CPU reference
//!   does). Two outputs are always f32 whatever the storage: RMSNorm's `rstd` and attention's
//!   `lse` (statistics that must not lose precision).
//! * Kernels: `impl Kernels for Cuda` below only delegates, one module per concept as on the
//!   CPU: `memory` (buffers, gathers), `dense` (the base products over a dense or NF4
//!   weight, elementwise updates, row norms), `lowrank` (the fused low-rank term of
//!   [`crate::backend::lowrank`]: forward, input gradient, parameter gradients, merges, weight
//!   norm), `nf4` (bitsandbytes' layout, the tiled dequantized products), `adalora` (the rank
//!   allocator), `ops` (the Llama block ops and AdamW). They receive their arguments checked:
//!   shapes and argument errors come from [`crate::backend::check`] through `Backend`'s
//!   provided methods, exactly as on the CPU. What remains here is the device's own: a tensor of
//!   another storage dtype, a dim beyond 2^31 - 1, a head dim over 256, and device failures
//!   (out of memory, a failed launch, NVRTC errors), `Error::Backend { backend: "cuda", .. }`;
//!   nothing panics through the public API.
//! * Requirements: an NVIDIA GPU of compute capability 8.0 or newer (bf16 atomics), the driver
//!   (`libcuda`), `libnvrtc` and `libcublas` (CUDA 13) on the library path, and the toolkit's
//!   `cuda_fp16.h`/`cuda_bf16.h` for NVRTC (see [`kernels::include_dir`]).
//! * Tensor clones share the device buffer; the first in-place write through a shared buffer
//!   copies it first (copy on write), so clones behave like the CPU's deep copies.
//!
//! Kernels run on one stream in order; downloads synchronize.

mod adalora;
mod blas;
mod dense;
pub mod kernels;
mod lowrank;
mod memory;
mod multi;
mod nf4;
mod ops;
mod pointwise;

use super::check::{AdamWFactors, EmaCoefs};
use super::kernels::Checked;
use super::{
    Activation, AdaLoraIpt, AdamWParams, AttentionSaved, Axis, Base, Bf16Weight, GradWants,
    Kernels, LowRank, LowRankOut, LowRankPool, Nf4Weight, ParamGrads, SeqSpan, Tensor,
};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg,
};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Storage dtype of a CUDA tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 (`torch.float16`).
    F16,
    /// bfloat16 (`torch.bfloat16`).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// The suffix of the kernels' extern "C" entry points for this dtype.
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// Device storage of one tensor: a shared byte buffer and its element dtype.
#[derive(Clone)]
pub struct CudaBuf {
    mem: Arc<CudaSlice<u8>>,
    dtype: DType,
    len: usize,
}

impl CudaBuf {
    /// The element dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Double-quantized absmax on the device: u8 codes, nested absmax, the 256-entry nested map,
/// offset, nested blocksize (the fields of [`crate::quant::nf4::Absmax::Double`]).
type DoubleQuant = (
    Arc<CudaSlice<u8>>,
    Arc<CudaSlice<f32>>,
    Arc<CudaSlice<f32>>,
    f32,
    usize,
);

/// Device storage of one NF4 weight in bitsandbytes' layout (see [`crate::quant::nf4`]).
#[derive(Clone)]
pub struct CudaNf4 {
    packed: Arc<CudaSlice<u8>>,
    /// f32 absmax per block, when not double-quantized.
    absmax: Option<Arc<CudaSlice<f32>>>,
    /// Double quant: u8 codes, nested absmax, the 256-entry map, offset, nested blocksize.
    double: Option<DoubleQuant>,
    blocksize: usize,
}

/// One kernel argument.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device pointer (0 for null).
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

/// The kernel modules, compiled once per process and device.
struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    /// The NF4 code table (`quant_map`) on the device.
    nf4_code: CudaSlice<f32>,
}

/// The CUDA backend (see the [module docs](self)). Cheap to clone: clones share the context,
/// the stream and the compiled kernels.
#[derive(Clone)]
pub struct Cuda {
    inner: Arc<Inner>,
    dtype: DType,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({}, {:?})", self.inner.arch, self.dtype)
    }
}

pub(crate) fn berr(msg: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "cuda".into(),
        msg: msg.to_string(),
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason: reason.into(),
    }
}

/// True when the CUDA driver library can be loaded (no device needed to answer).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its usual names.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

impl Cuda {
    /// The CUDA backend on device `ordinal` with f32 storage.
    ///
    /// Errors: [`Error::BackendUnavailable`] when libcuda, libcublas or libnvrtc cannot be
    /// loaded, no device `ordinal` exists, or its compute capability is below 8.0.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Self::with_dtype(ordinal, DType::F32)
    }

    /// The CUDA backend on device `ordinal` with `dtype` storage (see [`Cuda::new`]).
    pub fn with_dtype(ordinal: usize, dtype: DType) -> Result<Cuda> {
        if !driver_present() {
            return Err(unavailable(
                "the CUDA driver library (libcuda) is not installed",
            ));
        }
        if !kernels::nvrtc_available() {
            return Err(unavailable(
                "libnvrtc (CUDA 13) is not on the library path; kernels cannot be compiled",
            ));
        }
        // SAFETY: only tries to dlopen libcublas.
        let blas_ok =
            std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() })
                .unwrap_or(false);
        if !blas_ok {
            return Err(unavailable(
                "libcublas (CUDA 13) is not on the library path",
            ));
        }
        let made = std::panic::catch_unwind(|| -> Result<Cuda> {
            let n = CudaContext::device_count()
                .map_err(|e| unavailable(format!("cuInit/device count failed: {e}")))?;
            if ordinal >= n.max(0) as usize {
                return Err(unavailable(format!(
                    "no CUDA device {ordinal} ({n} device(s) found)"
                )));
            }
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| unavailable(format!("cannot create a context: {e}")))?;
            let (maj, min) = ctx.compute_capability().map_err(berr)?;
            if maj < 8 {
                return Err(unavailable(format!(
                    "compute capability {maj}.{min} is below the 8.0 these kernels need"
                )));
            }
            // One stream, in order: the slices need no cross-stream events.
            // SAFETY: every buffer of this backend is used on `stream` only.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            let blas = cudarc::cublas::CudaBlas::new(stream.clone()).map_err(berr)?;
            let nf4_code = stream
                .clone_htod(&crate::quant::nf4::NF4_CODE[..])
                .map_err(berr)?;
            Ok(Cuda {
                inner: Arc::new(Inner {
                    ctx,
                    stream,
                    blas,
                    arch: format!("compute_{maj}{min}"),
                    modules: Mutex::new(HashMap::new()),
                    funcs: Mutex::new(HashMap::new()),
                    nf4_code,
                }),
                dtype,
            })
        });
        made.unwrap_or_else(|_| Err(unavailable("the CUDA driver API panicked during setup")))
    }

    /// The same device, context and compiled kernels with another storage dtype. Tensors of
    /// the two backends must not be mixed (kernels reject a dtype mismatch).
    pub fn to_dtype(&self, dtype: DType) -> Cuda {
        Cuda {
            inner: self.inner.clone(),
            dtype,
        }
    }

    /// The storage dtype of tensors this backend makes.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The NVRTC architecture the kernels are compiled for (`compute_90` on an H100).
    pub fn arch(&self) -> &str {
        &self.inner.arch
    }

    /// The device name as the driver reports it.
    pub fn device_name(&self) -> Result<String> {
        self.inner.ctx.name().map_err(berr)
    }

    /// Waits for all queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.inner.stream.synchronize().map_err(berr)
    }

    /// Compiles (or loads from the PTX cache) every kernel module now, so that later calls
    /// never pay for NVRTC. Errors: a module that fails to compile or load.
    pub fn warm_up(&self) -> Result<()> {
        for (name, _) in kernels::SOURCES {
            self.module(name)?;
        }
        Ok(())
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let mut mods = self
            .inner
            .modules
            .lock()
            .map_err(|_| berr("module cache poisoned"))?;
        if let Some(m) = mods.get(name) {
            return Ok(m.clone());
        }
        let arch = self.inner.arch.clone();
        let ptx = kernels::cached_ptx(name, &arch, false)?;
        let m = match self
            .inner
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        {
            Ok(m) => m,
            Err(_) => {
                // A stale or foreign cache entry: compile afresh once.
                let ptx = kernels::cached_ptx(name, &arch, true)?;
                self.inner
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(|e| berr(format!("loading kernels/{name}.cu: {e}")))?
            }
        };
        mods.insert(name, m.clone());
        Ok(m)
    }

    fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let key = format!("{module}/{name}");
        if let Some(f) = self
            .inner
            .funcs
            .lock()
            .map_err(|_| berr("function cache poisoned"))?
            .get(&key)
        {
            return Ok(f.clone());
        }
        let f = self
            .module(module)?
            .load_function(name)
            .map_err(|e| berr(format!("kernel {name} in kernels/{module}.cu: {e}")))?;
        self.inner
            .funcs
            .lock()
            .map_err(|_| berr("function cache poisoned"))?
            .insert(key, f.clone());
        Ok(f)
    }

    /// Launches `module`'s kernel `name` (already suffixed, or dtype-free) with `args`.
    pub(crate) fn launch_raw(
        &self,
        module: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = self.function(module, name)?;
        let mut b = self.stream().launch_builder(&f);
        for a in args {
            match a {
                Arg::P(p) => b.arg(p),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem,
        };
        // SAFETY: argument lists are written next to each kernel's signature (kernels/*.cu) and
        // every pointer is a live device buffer sized by the shape checks of the caller.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| berr(format!("launch of {name}: {e}")))
    }

    /// Launches the storage-dtype instantiation `name_<dtype>`.
    pub(crate) fn launch(
        &self,
        module: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let full = format!("{name}_{}", self.dtype.suffix());
        self.launch_raw(module, &full, grid, block, smem, args)
    }

    // ---- buffers ------------------------------------------------------------------------------

    fn raw_alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        self.stream()
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| berr(format!("allocating {bytes} bytes: {e}")))
    }

    /// A zeroed buffer of `n` elements of `dtype`.
    fn alloc_buf(&self, n: usize, dtype: DType) -> Result<CudaBuf> {
        Ok(CudaBuf {
            mem: Arc::new(self.raw_alloc(n * dtype.size())?),
            dtype,
            len: n,
        })
    }

    /// A zeroed tensor of the storage dtype.
    pub(crate) fn alloc(&self, shape: &[usize]) -> Result<Tensor<Cuda>> {
        self.alloc_typed(shape, self.dtype)
    }

    pub(crate) fn alloc_typed(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Cuda>> {
        check_dims(shape)?;
        Ok(Tensor {
            buf: self.alloc_buf(shape.iter().product(), dtype)?,
            shape: shape.to_vec(),
        })
    }

    /// A zeroed scratch buffer of `n` f64 values.
    pub(crate) fn scratch_f64(&self, n: usize) -> Result<CudaSlice<u8>> {
        self.raw_alloc(n * 8)
    }

    pub(crate) fn slice_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(self.stream());
        p
    }

    /// The device pointer of a tensor of the storage dtype, for reading.
    pub(crate) fn rd(&self, name: &str, t: &Tensor<Cuda>) -> Result<Arg> {
        if t.buf.dtype != self.dtype {
            return Err(Error::arg(
                name,
                format!("dtype {:?} on a {:?} CUDA backend", t.buf.dtype, self.dtype),
            ));
        }
        Ok(Arg::P(self.slice_ptr(&t.buf.mem)))
    }

    /// The device pointer of an optional tensor (null for `None`).
    pub(crate) fn opt(&self, name: &str, t: Option<&Tensor<Cuda>>) -> Result<Arg> {
        match t {
            Some(t) => self.rd(name, t),
            None => Ok(Arg::P(0)),
        }
    }

    /// The raw device pointer of a tensor of the storage dtype, for reading.
    pub(crate) fn ptr(&self, name: &str, t: &Tensor<Cuda>) -> Result<u64> {
        Ok(pu(self.rd(name, t)?))
    }

    /// The raw device pointer of an optional tensor of the storage dtype (0 for `None`).
    pub(crate) fn opt_ptr(&self, name: &str, t: Option<&Tensor<Cuda>>) -> Result<u64> {
        Ok(pu(self.opt(name, t)?))
    }

    /// The device pointer of an f32 tensor (rstd, lse). Errors: another dtype.
    pub(crate) fn rd_f32(&self, name: &str, t: &Tensor<Cuda>) -> Result<Arg> {
        if t.buf.dtype != DType::F32 {
            return Err(Error::arg(
                name,
                format!(
                    "must be f32 (as the forward returns it), got {:?}",
                    t.buf.dtype
                ),
            ));
        }
        Ok(Arg::P(self.slice_ptr(&t.buf.mem)))
    }

    /// The raw device pointer of an f32 tensor (a GEMM product kept in f32). Errors: another
    /// dtype.
    pub(crate) fn ptr_f32(&self, name: &str, t: &Tensor<Cuda>) -> Result<u64> {
        Ok(pu(self.rd_f32(name, t)?))
    }

    /// The device pointer of a tensor for writing in place: a buffer shared with a clone is
    /// copied first, so the clone keeps its values.
    pub(crate) fn wr(&self, name: &str, t: &mut Tensor<Cuda>) -> Result<Arg> {
        self.rd(name, t)?;
        if Arc::get_mut(&mut t.buf.mem).is_none() {
            let bytes = t.buf.mem.len();
            let mut fresh = self.raw_alloc(bytes)?;
            self.stream()
                .memcpy_dtod(&*t.buf.mem, &mut fresh)
                .map_err(berr)?;
            t.buf.mem = Arc::new(fresh);
        }
        Ok(Arg::P(self.slice_ptr(&t.buf.mem)))
    }

    /// Copies host `i32` values to the device (indices, labels, positions).
    pub(crate) fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self.stream().alloc_zeros::<i32>(1).map_err(berr);
        }
        self.stream().clone_htod(v).map_err(berr)
    }

    pub(crate) fn upload_f32(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        if v.is_empty() {
            return self.stream().alloc_zeros::<f32>(1).map_err(berr);
        }
        self.stream().clone_htod(v).map_err(berr)
    }

    pub(crate) fn download_bytes(&self, s: &CudaSlice<u8>, bytes: usize) -> Result<Vec<u8>> {
        let mut v = self.stream().clone_dtoh(s).map_err(berr)?;
        v.truncate(bytes);
        Ok(v)
    }

    pub(crate) fn download_f64(&self, s: &CudaSlice<u8>, n: usize) -> Result<Vec<f64>> {
        let b = self.download_bytes(s, n * 8)?;
        Ok(b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")))
            .collect())
    }

    fn encode(&self, data: &[f32]) -> Vec<u8> {
        match self.dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
            DType::BF16 => data
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
        }
    }
}

/// Kernels index dims with 32-bit ints: every dim must fit.
fn check_dims(shape: &[usize]) -> Result<()> {
    if let Some(&d) = shape.iter().find(|&&d| d > i32::MAX as usize) {
        return Err(Error::arg(
            "shape",
            format!("dim {d} exceeds the CUDA backend's 2^31 - 1 limit per dim"),
        ));
    }
    Ok(())
}

fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4-byte chunk")))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

/// The raw pointer of a pointer argument (0 for a scalar).
pub(crate) fn pu(a: Arg) -> u64 {
    match a {
        Arg::P(p) => p,
        _ => 0,
    }
}

/// `ceil(a / b)` as a grid dimension.
pub(crate) fn blocks(a: usize, b: usize) -> u32 {
    a.div_ceil(b.max(1)).min(u32::MAX as usize) as u32
}

impl Kernels for Cuda {
    type Buf = CudaBuf;
    /// A frozen dense tensor of the bf16-rounded values (see [`Bf16Weight`]).
    type Bf16Buf = Tensor<Self>;
    type Nf4Buf = CudaNf4;

    fn name_kernel(&self, _: Checked) -> &'static str {
        "cuda"
    }
    fn synchronize_kernel(&self, _: Checked) -> Result<()> {
        Cuda::synchronize(self)
    }

    fn upload_kernel(&self, _: Checked, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        memory::upload(self, data, shape)
    }
    /// The bytes of the storage dtype (2 per element in f16/bf16).
    fn stored_bytes_kernel(_: Checked, t: &Tensor<Self>) -> usize {
        memory::stored_bytes(t)
    }
    fn download_kernel(&self, _: Checked, t: &Tensor<Self>) -> Result<Vec<f32>> {
        memory::download(self, t)
    }
    fn zeros_kernel(&self, _: Checked, shape: &[usize]) -> Result<Tensor<Self>> {
        self.alloc(shape)
    }
    fn copy_into_kernel(
        &self,
        _: Checked,
        src: &Tensor<Self>,
        dst: &mut Tensor<Self>,
    ) -> Result<()> {
        memory::copy_into(self, src, dst)
    }
    fn gather_rows_kernel(
        &self,
        _: Checked,
        t: &Tensor<Self>,
        idx: &[u32],
    ) -> Result<Tensor<Self>> {
        memory::gather_rows(self, t, idx)
    }
    fn scatter_add_rows_kernel(
        &self,
        _: Checked,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()> {
        memory::scatter_add_rows(self, dst, idx, src)
    }

    fn linear_lowrank_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        base: Base<'_, Self>,
        bias: Option<&Tensor<Self>>,
        term: Option<&LowRank<'_, Self>>,
    ) -> Result<LowRankOut<Self>> {
        lowrank::forward(self, x, base, bias, term)
    }
    fn backward_input_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        base: Base<'_, Self>,
        term: Option<&LowRank<'_, Self>>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<(Option<Tensor<Self>>, Option<Tensor<Self>>)> {
        lowrank::backward_input(self, dy, base, term, acc)
    }
    fn lowrank_grads_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        z: Option<&Tensor<Self>>,
        g: &Tensor<Self>,
        term: &LowRank<'_, Self>,
        wants: GradWants,
    ) -> Result<ParamGrads<Self>> {
        lowrank::grads(self, dy, x, h, z, g, term, wants)
    }
    fn lowrank_merge_kernel(
        &self,
        _: Checked,
        w: &mut Tensor<Self>,
        term: &LowRank<'_, Self>,
        sign: f32,
    ) -> Result<()> {
        lowrank::merge(self, w, term, sign)
    }
    fn row_sq_norms_kernel(&self, _: Checked, base: Base<'_, Self>) -> Result<Tensor<Self>> {
        dense::row_sq_norms(self, base)
    }
    fn lowrank_row_norms_kernel(
        &self,
        _: Checked,
        base: Base<'_, Self>,
        base_row_sq: &Tensor<Self>,
        term: &LowRank<'_, Self>,
    ) -> Result<Tensor<Self>> {
        lowrank::row_norms(self, base, base_row_sq, term)
    }
    fn linear_backward_weight_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        dense::backward_weight(self, dy, x, dw)
    }
    fn lowrank_multi_add_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        pool: &LowRankPool<Self>,
        adapter_of_row: &[i32],
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        multi::add(self, x, pool, adapter_of_row, y)
    }
    fn axpy_kernel(
        &self,
        _: Checked,
        a: &mut Tensor<Self>,
        alpha: f32,
        b: &Tensor<Self>,
    ) -> Result<()> {
        dense::axpy(self, a, alpha, b)
    }
    fn scale_kernel(&self, _: Checked, a: &mut Tensor<Self>, alpha: f32) -> Result<()> {
        dense::scale(self, a, alpha)
    }
    fn sum_squares_kernel(&self, _: Checked, a: &Tensor<Self>) -> Result<f64> {
        dense::sum_squares(self, a)
    }

    fn upload_nf4_kernel(&self, _: Checked, w: &Nf4Tensor) -> Result<Nf4Weight<Self>> {
        nf4::upload(self, w)
    }
    fn nf4_dequantize_kernel(&self, _: Checked, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::dequantize(self, w)
    }
    fn upload_bf16_kernel(
        &self,
        _: Checked,
        data: &[f32],
        out: usize,
        in_: usize,
    ) -> Result<Bf16Weight<Self>> {
        Bf16Weight::held_frozen(self, data, out, in_)
    }
    fn bf16_to_f32_kernel(&self, _: Checked, w: &Bf16Weight<Self>) -> Result<Tensor<Self>> {
        w.held_to_f32(self)
    }

    fn adalora_update_ipt_kernel(
        &self,
        _: Checked,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        exp_avg_ipt: &mut Tensor<Self>,
        exp_avg_unc: &mut Tensor<Self>,
        coefs: &EmaCoefs,
    ) -> Result<()> {
        adalora::update_ipt(self, param, grad, exp_avg_ipt, exp_avg_unc, coefs)
    }
    fn adalora_triplet_scores_kernel(
        &self,
        _: Checked,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::triplet_scores(self, ema, scores, offset)
    }
    fn adalora_threshold_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        k: usize,
    ) -> Result<Tensor<Self>> {
        adalora::threshold(self, scores, k)
    }
    fn adalora_rank_mask_kernel(
        &self,
        _: Checked,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        adalora::rank_mask(self, scores, threshold)
    }
    fn adalora_apply_mask_kernel(
        &self,
        _: Checked,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::apply_mask(self, lora_e, keep, offset)
    }
    fn adalora_orth_reg_kernel(
        &self,
        _: Checked,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>> {
        adalora::orth_reg(self, factors, grads, orth_reg_weight)
    }

    fn rmsnorm_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::rmsnorm(self, x, weight, eps)
    }
    fn rmsnorm_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        ops::rmsnorm_backward(self, dy, x, weight, rstd, dweight)
    }
    fn rope_kernel(
        &self,
        _: Checked,
        x: &mut Tensor<Self>,
        positions: &[u32],
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(self, x, positions, head_dim, theta, inverse)
    }
    fn attention_kernel(
        &self,
        _: Checked,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<AttentionSaved<Self>> {
        ops::attention(self, q, k, v, seqs, n_heads, n_kv_heads, scale)
    }
    fn attention_backward_kernel(
        &self,
        _: Checked,
        d_out: &Tensor<Self>,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        saved: &AttentionSaved<Self>,
        seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        ops::attention_backward(
            self, d_out, q, k, v, saved, seqs, n_heads, n_kv_heads, scale,
        )
    }
    fn attention_cached_kernel(
        &self,
        _: Checked,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        q_seqs: &[SeqSpan],
        kv_seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<Tensor<Self>> {
        ops::attention_cached(self, q, k, v, q_seqs, kv_seqs, n_heads, n_kv_heads, scale)
    }
    fn mul_vector_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        v: &Tensor<Self>,
        axis: Axis,
    ) -> Result<Tensor<Self>> {
        pointwise::mul_vector(self, x, v, axis)
    }
    fn sum_product_kernel(
        &self,
        _: Checked,
        a: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
        axis: Axis,
    ) -> Result<Tensor<Self>> {
        pointwise::sum_product(self, a, b, axis)
    }
    fn activation_kernel(
        &self,
        _: Checked,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        pointwise::activation(self, x, act)
    }
    fn activation_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        act: Activation,
    ) -> Result<Tensor<Self>> {
        pointwise::activation_backward(self, dy, x, act)
    }
    fn softmax_rows_kernel(&self, _: Checked, x: &Tensor<Self>) -> Result<Tensor<Self>> {
        pointwise::softmax_rows(self, x)
    }
    fn softmax_rows_backward_kernel(
        &self,
        _: Checked,
        dy: &Tensor<Self>,
        p: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        pointwise::softmax_rows_backward(self, dy, p)
    }
    fn swiglu_kernel(
        &self,
        _: Checked,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        ops::swiglu(self, gate, up)
    }
    fn swiglu_backward_kernel(
        &self,
        _: Checked,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::swiglu_backward(self, d, gate, up)
    }
    fn cross_entropy_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)> {
        ops::cross_entropy(self, logits, labels, grad_scale)
    }
    fn cross_entropy_stats_kernel(
        &self,
        _: Checked,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::cross_entropy_stats(self, logits, labels, grad_scale)
    }

    fn adamw_step_kernel(
        &self,
        _: Checked,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        factors: &AdamWFactors,
        p: &AdamWParams,
    ) -> Result<()> {
        ops::adamw_step(self, param, grad, m, v, factors, p)
    }
}
