//! The wgpu device, its buffers, the pipeline cache and the dispatch queue.
//!
//! Dispatches are recorded into one pending command encoder and submitted together (every
//! [`BATCH`] dispatches, or when the host needs data back), so a training step costs a few
//! submits, and the only readbacks are the ones the caller asks for (`download`, the loss);
//! [`Ctx::readbacks`] counts them.
//! Each dispatch's uniform parameters go into one uniform buffer per batch, written once
//! before its submit.

use super::compose;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// The workgroup reduction prelude of row kernels: a tree in workgroup memory, and the
/// subgroup version used where the device has `SUBGROUP` (see [`Ctx::reduce_kernel`]).
const REDUCE: &str = include_str!("../../../shaders/reduce.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../../shaders/reduce_subgroup.wgsl");

/// Dispatches recorded before a submit.
const BATCH: usize = 256;
/// Bytes reserved per dispatch in the batch's uniform buffer (the largest uniform alignment
/// WebGPU allows, so every offset is valid on every adapter).
const PARAM_STRIDE: usize = 256;

/// One storage binding of a dispatch: a buffer and the byte range of it to bind.
pub(crate) struct Bind<'a> {
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset (a multiple of the adapter's storage offset alignment).
    pub offset: u64,
    /// Bytes bound (a multiple of 4, at least 4).
    pub size: u64,
    /// The buffer holds f16 values ([`DType::F16`]); only bindings a kernel declared f16 may
    /// take it (checked by [`Ctx::dispatch`]).
    pub f16: bool,
}

impl<'a> Bind<'a> {
    /// The whole buffer.
    pub fn all(buf: &'a GpuBuf) -> Self {
        Bind {
            buffer: &buf.buffer,
            offset: 0,
            size: buf.bytes(),
            f16: buf.dtype == DType::F16,
        }
    }
    /// Bytes `offset..offset + size` of a buffer.
    pub fn range(buf: &'a GpuBuf, offset: u64, size: u64) -> Self {
        Bind {
            buffer: &buf.buffer,
            offset,
            size,
            f16: buf.dtype == DType::F16,
        }
    }
    /// Elements `lo..=hi` of `buf` (of either storage type), from the element at or before
    /// `lo` where a binding may start (the storage offset alignment, in elements: always even
    /// for f16, so a binding starts on a 4-byte word), rounded up to whole 4-byte words (an f16
    /// buffer is padded to whole words, so the rounding stays inside it). Returns the binding
    /// and the index of its first element.
    pub fn elems(ctx: &Ctx, buf: &'a GpuBuf, lo: usize, hi: usize) -> (Self, usize) {
        let esz = buf.dtype.size();
        let align = (ctx.offset_align as usize / esz).max(1);
        let start = lo / align * align;
        let size = (esz * (hi + 1 - start)).div_ceil(4) * 4;
        (Bind::range(buf, (esz * start) as u64, size as u64), start)
    }
}

/// How a [`GpuBuf`] stores its values. Kernels compute in f32 either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// IEEE half, two per little-endian 32-bit word (element `2w` in the low half of word `w`),
    /// the last word zero-padded for an odd length. Only frozen weights are stored so
    /// ([`crate::Backend::upload_frozen`]), and only where the adapter has `SHADER_F16`.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
}

/// `src` with the storage arrays `names` made f16 ([`compose::f16_variant`], the rule
/// `build.rs` validates). Errors (a bug in a shader): a declaration or loader not found.
pub(crate) fn f16_variant(src: &str, names: &[&str]) -> Result<String> {
    compose::f16_variant(src, names).map_err(err)
}

/// The error of an in-place kernel handed a frozen f16 weight.
pub(crate) fn frozen_err(what: &str) -> Error {
    err(format!(
        "{what}: frozen f16 weight cannot be modified in place; upload it with upload()"
    ))
}

/// A compiled kernel: a pipeline and its bind group layout (binding 0 is the uniform
/// parameter block, storage buffers follow). The layout is derived from the entry point, so a
/// dispatch binds exactly the buffers that entry point uses.
pub(crate) struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    key: String,
    /// Bit `i` set: binding `i` is declared `array<f16>` (every other storage binding is f32).
    f16_mask: u32,
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    params: Vec<u8>,
    params_buf: Option<wgpu::Buffer>,
    dispatches: usize,
}

/// The device and everything shared by the tensors living on it.
pub(crate) struct Ctx {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// Largest storage binding in bytes (the adapter's limit, or a lower one set for tests).
    pub max_binding: u64,
    /// Alignment of storage binding offsets in bytes.
    pub offset_align: u64,
    pub max_groups: u32,
    /// Reductions use subgroup operations (the adapter has SUBGROUP and the options allow);
    /// selects the prelude of [`Ctx::reduce_kernel`].
    pub subgroups: bool,
    /// Frozen weights may be stored as f16 (the adapter has SHADER_F16 and the options allow).
    pub f16: bool,
    kernels: Mutex<HashMap<String, Arc<Kernel>>>,
    pending: Mutex<Pending>,
    /// First error reported by the device (validation, out of memory, device lost).
    error: Arc<Mutex<Option<String>>>,
    /// A 16-byte buffer bound where a kernel's optional input is absent.
    dummy: wgpu::Buffer,
    /// Readbacks so far ([`Ctx::readbacks`]).
    readbacks: AtomicU64,
}

/// A storage buffer of f32 (or, for a frozen weight, f16) values on the device.
pub struct GpuBuf {
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) buffer: wgpu::Buffer,
    /// Number of elements (the buffer holds at least one 32-bit word).
    pub(crate) len: usize,
    pub(crate) dtype: DType,
}

impl GpuBuf {
    /// Size of the underlying buffer in bytes.
    pub(crate) fn bytes(&self) -> u64 {
        self.buffer.size()
    }
}

/// Deep copy on the device: tensors have value semantics on every backend (a clone is never
/// changed by in-place kernels run on the original).
impl Clone for GpuBuf {
    fn clone(&self) -> Self {
        // The same bytes in a buffer of the same size and storage type.
        let buffer = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: self.buffer.size(),
            usage: self.buffer.usage(),
            mapped_at_creation: false,
        });
        self.ctx
            .copy(&self.buffer, 0, &buffer, 0, self.buffer.size());
        GpuBuf {
            ctx: self.ctx.clone(),
            buffer,
            len: self.len,
            dtype: self.dtype,
        }
    }
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf[{}; {:?}]", self.len, self.dtype)
    }
}

fn err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "wgpu".into(),
        msg: msg.into(),
    }
}

impl Ctx {
    /// Opens the first Vulkan/Metal/DX12 adapter (a software one such as lavapipe when no
    /// hardware adapter exists). Errors: [`Error::BackendUnavailable`] when there is none.
    pub fn new(opts: &super::WgpuOptions) -> Result<Arc<Ctx>> {
        let max_binding = opts.max_binding;
        let unavailable = |reason: String| Error::BackendUnavailable {
            backend: "wgpu".into(),
            reason,
        };
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
        let instance = wgpu::Instance::new(desc);
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            ..Default::default()
        }))
        .map_err(|e| unavailable(format!("no Vulkan, Metal or DX12 adapter found ({e})")))?;
        let info = adapter.get_info();
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("lorafuse"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| unavailable(format!("{}: request_device failed: {e}", info.name)))?;
        let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let e = error.clone();
        device.on_uncaptured_error(Arc::new(move |er: wgpu::Error| {
            let mut slot = e.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| er.to_string());
        }));
        let e = error.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let mut slot = e.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| format!("device lost ({reason:?}): {msg}"));
        });
        let adapter_max =
            (limits.max_storage_buffer_binding_size as u64).min(limits.max_buffer_size);
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Arc::new(Ctx {
            info,
            max_binding: max_binding.map_or(adapter_max, |m| m.min(adapter_max)),
            offset_align: limits.min_storage_buffer_offset_alignment as u64,
            max_groups: limits.max_compute_workgroups_per_dimension,
            subgroups: opts.subgroups && features.contains(wgpu::Features::SUBGROUP),
            f16: opts.f16 && features.contains(wgpu::Features::SHADER_F16),
            device,
            queue,
            kernels: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending {
                encoder: None,
                params: Vec::new(),
                params_buf: None,
                dispatches: 0,
            }),
            error,
            dummy,
            readbacks: AtomicU64::new(0),
        }))
    }

    /// Returns the first device error since the last check, as an `Err`.
    pub fn check(&self) -> Result<()> {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(msg) => Err(err(msg)),
            None => Ok(()),
        }
    }

    /// A zero-filled buffer of `len` f32 (wgpu zero-initializes new buffers).
    pub fn alloc(self: &Arc<Self>, len: usize) -> GpuBuf {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4 * len.max(1) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        GpuBuf {
            ctx: self.clone(),
            buffer,
            len,
            dtype: DType::F32,
        }
    }

    /// A buffer holding `data` rounded to f16 (round to nearest even, as `half::f16::from_f32`),
    /// packed two per word.
    pub fn upload_f16(self: &Arc<Self>, data: &[f32]) -> GpuBuf {
        let halves: Vec<u16> = data
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        GpuBuf {
            dtype: DType::F16,
            ..self.upload_bytes(bytemuck::cast_slice(&halves), data.len())
        }
    }

    /// A buffer holding `data`.
    pub fn upload(self: &Arc<Self>, data: &[f32]) -> GpuBuf {
        self.upload_bytes(bytemuck::cast_slice(data), data.len())
    }

    /// A buffer holding raw 32-bit words (`len` of them) given as bytes.
    pub fn upload_bytes(self: &Arc<Self>, bytes: &[u8], len: usize) -> GpuBuf {
        let mut padded;
        let contents = if bytes.len() < 4 || !bytes.len().is_multiple_of(4) {
            padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
            &padded[..]
        } else {
            bytes
        };
        let buffer = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            });
        GpuBuf {
            ctx: self.clone(),
            buffer,
            len,
            dtype: DType::F32,
        }
    }

    /// Records a buffer-to-buffer copy (bytes, multiples of 4).
    pub fn copy(&self, src: &wgpu::Buffer, so: u64, dst: &wgpu::Buffer, d_o: u64, size: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let enc = self.encoder(&mut p);
        enc.copy_buffer_to_buffer(src, so, dst, d_o, size);
    }

    fn encoder<'p>(&self, p: &'p mut Pending) -> &'p mut wgpu::CommandEncoder {
        p.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        })
    }

    /// The kernel `entry` of the WGSL module `source`, compiled once and cached under `key`.
    pub fn kernel(&self, key: &str, source: &str, entry: &str) -> Result<Arc<Kernel>> {
        self.kernel_f16(key, || Ok(source.to_string()), entry, 0)
    }

    /// The kernel `entry` of a module that reduces across the workgroup: `src` with a
    /// reduction prelude in front, `shaders/reduce_subgroup.wgsl` where [`Ctx::subgroups`]
    /// holds, else the workgroup-memory tree of `shaders/reduce.wgsl` (both define `Lanes`,
    /// `wg_sum`, `wg_max`, `red`). Cached per variant under `module.entry+variant`.
    pub fn reduce_kernel(&self, module: &str, src: &str, entry: &str) -> Result<Arc<Kernel>> {
        self.reduce_kernel_f16(module, src, entry, &[])
    }

    /// [`Ctx::reduce_kernel`] with the storage arrays `f16` (`(name, binding)` pairs) read as
    /// frozen f16 weights ([`f16_variant`]); one cached pipeline per variant.
    pub fn reduce_kernel_f16(
        &self,
        module: &str,
        src: &str,
        entry: &str,
        f16: &[(&str, u32)],
    ) -> Result<Arc<Kernel>> {
        let (prelude, variant) = if self.subgroups {
            (REDUCE_SUBGROUP, "subgroup")
        } else {
            (REDUCE, "workgroup")
        };
        let names: Vec<&str> = f16.iter().map(|&(n, _)| n).collect();
        let mask = f16.iter().fold(0u32, |m, &(_, b)| m | (1 << b));
        let key = if names.is_empty() {
            format!("{module}.{entry}+{variant}")
        } else {
            format!("{module}.{entry}+{variant}+f16:{}", names.join(","))
        };
        self.kernel_f16(
            &key,
            || {
                let full = compose::with_prelude(prelude, src);
                if names.is_empty() {
                    Ok(full)
                } else {
                    f16_variant(&full, &names)
                }
            },
            entry,
            mask,
        )
    }

    /// [`Ctx::kernel`] for a module whose bindings in `f16_mask` (bit `i` for binding `i`) are
    /// `array<f16>`; the source is made only on the first use of `key`.
    pub fn kernel_f16(
        &self,
        key: &str,
        source: impl FnOnce() -> Result<String>,
        entry: &str,
        f16_mask: u32,
    ) -> Result<Arc<Kernel>> {
        let mut cache = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(key) {
            return Ok(k.clone());
        }
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(key),
                source: wgpu::ShaderSource::Wgsl(source()?.into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            });
        // A shader that does not compile is a bug in lorafuse; report it as an error.
        self.device
            .poll(wgpu::PollType::Poll)
            .map_err(|e| err(format!("poll: {e}")))?;
        self.check()
            .map_err(|e| err(format!("compiling kernel `{key}`: {e}")))?;
        let layout = pipeline.get_bind_group_layout(0);
        let k = Arc::new(Kernel {
            pipeline,
            layout,
            key: key.to_string(),
            f16_mask,
        });
        cache.insert(key.to_string(), k.clone());
        Ok(k)
    }

    /// Records one dispatch of `kernel` over `groups` workgroups with the uniform `params`
    /// (32-bit words) at binding 0 and the storage `binds` at their binding numbers.
    pub fn dispatch(
        &self,
        kernel: &Kernel,
        params: &[u32],
        binds: &[(u32, Bind<'_>)],
        groups: (u32, u32, u32),
    ) -> Result<()> {
        if params.len() * 4 > PARAM_STRIDE {
            return Err(err("kernel parameter block larger than 256 bytes"));
        }
        if groups.0 > self.max_groups || groups.1 > self.max_groups || groups.2 > self.max_groups {
            return Err(err(format!(
                "dispatch of {groups:?} workgroups exceeds the adapter's {} per dimension",
                self.max_groups
            )));
        }
        // A frozen f16 weight bound where the kernel reads f32 would be misread: refuse it.
        for (i, b) in binds {
            if b.f16 && (*i >= 32 || kernel.f16_mask & (1 << i) == 0) {
                return Err(err(format!(
                    "kernel `{}` reads binding {i} as f32 but it holds a frozen f16 weight; \
                     upload that tensor with upload()",
                    kernel.key
                )));
            }
        }
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if p.params_buf.is_none() {
            p.params_buf = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: (BATCH * PARAM_STRIDE) as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let slot = p.dispatches;
        let off = slot * PARAM_STRIDE;
        p.params.resize(off + PARAM_STRIDE, 0);
        p.params[off..off + params.len() * 4].copy_from_slice(bytemuck::cast_slice(params));
        let params_buf = p.params_buf.as_ref().expect("created above");
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: params_buf,
                offset: off as u64,
                size: wgpu::BufferSize::new(PARAM_STRIDE as u64),
            }),
        }];
        for (i, b) in binds {
            entries.push(wgpu::BindGroupEntry {
                binding: *i,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: wgpu::BufferSize::new(b.size),
                }),
            });
        }
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &kernel.layout,
            entries: &entries,
        });
        {
            let enc = self.encoder(&mut p);
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        }
        p.dispatches += 1;
        if p.dispatches >= BATCH {
            self.submit_locked(&mut p);
        }
        Ok(())
    }

    /// A binding of the 16-byte placeholder buffer, for an absent optional input.
    pub fn dummy(&self) -> Bind<'_> {
        Bind {
            buffer: &self.dummy,
            offset: 0,
            size: 16,
            f16: false,
        }
    }

    fn submit_locked(&self, p: &mut Pending) {
        if let Some(buf) = p.params_buf.take() {
            self.queue.write_buffer(&buf, 0, &p.params);
        }
        p.params.clear();
        p.dispatches = 0;
        if let Some(enc) = p.encoder.take() {
            self.queue.submit([enc.finish()]);
        }
    }

    /// Submits everything recorded and waits for the device to finish it.
    pub fn wait(&self) -> Result<()> {
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            self.submit_locked(&mut p);
        }
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| err(format!("waiting for the device: {e}")))?;
        self.check()
    }

    /// Reads `len` 32-bit words from the start of `buf` back to the host (submits pending work
    /// and waits for it).
    pub fn read(&self, buf: &wgpu::Buffer, len: usize) -> Result<Vec<u32>> {
        Ok(self.read_many(&[(buf, len)])?.pop().unwrap_or_default())
    }

    /// Readbacks so far: calls of [`Ctx::read_many`] that waited for the device.
    pub fn readbacks(&self) -> u64 {
        self.readbacks.load(Ordering::Relaxed)
    }

    /// Reads the first `len` 32-bit words of each buffer back to the host with one staging
    /// buffer, one submit and one wait (one readback, counted by [`Ctx::readbacks`]).
    pub fn read_many(&self, bufs: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<u32>>> {
        let total: usize = bufs.iter().map(|&(_, len)| len).sum();
        if total == 0 {
            return Ok(bufs.iter().map(|_| Vec::new()).collect());
        }
        self.readbacks.fetch_add(1, Ordering::Relaxed);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: 4 * total as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let enc = self.encoder(&mut p);
            let mut off = 0u64;
            for &(buf, len) in bufs {
                if len > 0 {
                    enc.copy_buffer_to_buffer(buf, 0, &staging, off, 4 * len as u64);
                }
                off += 4 * len as u64;
            }
            self.submit_locked(&mut p);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| err(format!("waiting for the device: {e}")))?;
        self.check()?;
        rx.recv()
            .map_err(|_| err("buffer mapping was cancelled"))?
            .map_err(|e| err(format!("mapping a readback buffer: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| err(format!("reading a mapped buffer: {e}")))?;
        let words = bytemuck::cast_slice::<u8, u32>(&view);
        let mut out = Vec::with_capacity(bufs.len());
        let mut off = 0;
        for &(_, len) in bufs {
            out.push(words[off..off + len].to_vec());
            off += len;
        }
        drop(view);
        staging.unmap();
        Ok(out)
    }
}
