//! bitsandbytes-compatible NF4 (4-bit NormalFloat) quantization, with double quantization of the
//! per-block absmax, bit for bit equal to bitsandbytes 0.50's CPU path.
//!
//! Layout (the one bitsandbytes and transformers use):
//!
//! * The tensor is flattened row-major into `n` elements and cut into blocks of `blocksize`
//!   consecutive elements (the last block may be short).
//! * `packed` (`u8`, `(n + 1) / 2` bytes): byte `k` holds element `2k` in the **high** nibble and
//!   element `2k + 1` in the low nibble. If `n` is odd the last low nibble is padding, index 7
//!   (the code for 0.0).
//! * `absmax` (`f32`, one per block), or with double quantization `absmax_q` (`u8`, one per
//!   block) indexing the signed 8-bit dynamic map [`dynamic_map`], scaled per block of 256 by
//!   `nested_absmax` (`f32`) and shifted by `offset` (`f32`).
//! * Dequantization: `out[j] = NF4_CODE[q[j]] * absmax[j / blocksize]` (one fp32 product), where
//!   under double quant `absmax[i] = nested_code[absmax_q[i]] * nested_absmax[i / 256] + offset`
//!   (an fp32 product, then an fp32 sum).
//!
//! [`quantize_nf4`] reproduces bitsandbytes' default (pure torch) CPU `quantize_4bit` kernel and,
//! for double quant, its C++ CPU `quantize_blockwise` kernel with the 65536-cell lookup table,
//! including their rounding quirks (see the function's docs). The golden vectors in
//! `tests/golden/nf4_*.safetensors` are matched bit for bit.

use crate::error::{Error, Result};
use crate::torch_cpu::sum::{TorchCpuOrder, torch_mean_f32};
use rayon::prelude::*;
use std::sync::OnceLock;

/// The NF4 code table of bitsandbytes (`quant_map`), ascending; index 7 is 0.0. The literals are
/// bitsandbytes' own (float64 reprs of the f32 values); they round to the exact f32 bits.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Block size of the nested (8-bit) quantization of absmax, as bitsandbytes fixes it.
pub const NESTED_BLOCKSIZE: usize = 256;

/// `absmax` is clamped to at least this before taking its reciprocal: torch's
/// `clamp(min=1e-38)`, i.e. the double `1e-38` rounded to f32 (a subnormal).
const ABSMAX_MIN: f32 = 1e-38_f64 as f32;

/// Index of the nibble used to pad an odd element count (the code for 0.0).
const PAD_NIBBLE: u8 = 7;

/// The per-block scale of an [`Nf4Tensor`], with or without double quantization.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block (`compress_statistics=False`).
    F32(Vec<f32>),
    /// Double quantization (`compress_statistics=True`):
    /// `absmax[i] = nested_code[absmax_q[i]] * nested_absmax[i / nested_blocksize] + offset`.
    Double {
        /// One 8-bit index into `nested_code` per block (bnb's quantized `absmax`).
        absmax_q: Vec<u8>,
        /// One f32 scale per block of `nested_blocksize` entries of `absmax_q`.
        nested_absmax: Vec<f32>,
        /// The 256-entry 8-bit map (bnb's `nested_quant_map`; the signed dynamic map).
        nested_code: Vec<f32>,
        /// `mean(absmax)`, subtracted before the nested quantization (bnb's `nested_offset`).
        offset: f32,
        /// Block size of the nested quantization (256 in bitsandbytes).
        nested_blocksize: usize,
    },
}

/// An NF4-quantized tensor in bitsandbytes' layout (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    packed: Vec<u8>,
    absmax: Absmax,
    shape: Vec<usize>,
    blocksize: usize,
}

/// Checks a 4-bit `blocksize`: bitsandbytes accepts the powers of two 32..=4096.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::arg(
            "blocksize",
            format!("must be a power of two in 32..=4096 (as in bitsandbytes), got {blocksize}"),
        ))
    }
}

impl Nf4Tensor {
    /// Builds a tensor from its stored parts (e.g. read from a checkpoint), checking that they
    /// are consistent: `blocksize` valid, `shape` non-empty with `n > 0` elements,
    /// `packed.len() == (n + 1) / 2`, one absmax (or `absmax_q`) per block, one `nested_absmax`
    /// per nested block, `nested_code.len() == 256`, and finite scales.
    pub fn from_parts(
        packed: Vec<u8>,
        absmax: Absmax,
        shape: Vec<usize>,
        blocksize: usize,
    ) -> Result<Self> {
        check_blocksize(blocksize)?;
        let n: usize = shape.iter().product();
        if shape.is_empty() || n == 0 {
            return Err(Error::shape(
                "shape",
                "at least one dim and n > 0 elements",
                &shape,
            ));
        }
        if packed.len() != n.div_ceil(2) {
            return Err(Error::shape(
                "packed",
                format!("[{}] bytes ((n + 1) / 2 for n = {n})", n.div_ceil(2)),
                &[packed.len()],
            ));
        }
        let nblocks = n.div_ceil(blocksize);
        match &absmax {
            Absmax::F32(a) => {
                if a.len() != nblocks {
                    return Err(Error::shape("absmax", format!("[{nblocks}]"), &[a.len()]));
                }
                check_finite("absmax", a)?;
            }
            Absmax::Double {
                absmax_q,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => {
                if absmax_q.len() != nblocks {
                    return Err(Error::shape(
                        "absmax",
                        format!("[{nblocks}]"),
                        &[absmax_q.len()],
                    ));
                }
                if *nested_blocksize == 0 {
                    return Err(Error::arg("nested_blocksize", "must be > 0"));
                }
                let nn = nblocks.div_ceil(*nested_blocksize);
                if nested_absmax.len() != nn {
                    return Err(Error::shape(
                        "nested_absmax",
                        format!("[{nn}]"),
                        &[nested_absmax.len()],
                    ));
                }
                if nested_code.len() != 256 {
                    return Err(Error::shape(
                        "nested_quant_map",
                        "[256]",
                        &[nested_code.len()],
                    ));
                }
                check_finite("nested_absmax", nested_absmax)?;
                check_finite("nested_quant_map", nested_code)?;
                check_finite("nested_offset", &[*offset])?;
            }
        }
        Ok(Self {
            packed,
            absmax,
            shape,
            blocksize,
        })
    }

    /// The packed 4-bit indices, `(n + 1) / 2` bytes, high nibble first.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    /// The per-block scales.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }
    /// The logical shape of the unquantized tensor (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Elements per quantization block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }
    /// Number of elements `n` (product of the shape).
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of quantization blocks, `ceil(n / blocksize)`.
    pub fn n_blocks(&self) -> usize {
        self.n_elements().div_ceil(self.blocksize)
    }
    /// Whether absmax is double-quantized.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Double { .. })
    }

    /// Memory footprint of the quantized data in bytes: packed indices, plus the absmax
    /// statistics (f32 per block, or u8 per block + f32 per nested block + the 256-entry f32
    /// nested map + the f32 offset). The shared 16-entry NF4 table is not counted.
    pub fn bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::F32(a) => 4 * a.len(),
                Absmax::Double {
                    absmax_q,
                    nested_absmax,
                    nested_code,
                    ..
                } => absmax_q.len() + 4 * nested_absmax.len() + 4 * nested_code.len() + 4,
            }
    }

    /// The f32 absmax of every block: the stored one, or under double quant the decoded
    /// `nested_code[absmax_q[i]] * nested_absmax[i / nested_blocksize] + offset` (bnb's
    /// `dequantize_blockwise(absmax_q, state2) + offset`, bit for bit).
    pub fn absmax_f32(&self) -> Vec<f32> {
        (0..self.n_blocks()).map(|b| self.block_absmax(b)).collect()
    }

    #[inline]
    fn block_absmax(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::F32(a) => a[b],
            Absmax::Double {
                absmax_q,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => nested_code[absmax_q[b] as usize] * nested_absmax[b / nested_blocksize] + offset,
        }
    }

    /// Dequantizes to a new row-major f32 vector of `n` elements (bnb's `dequantize_4bit` with
    /// `dtype=float32`, bit for bit).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.n_elements()];
        self.dequantize_into(&mut out)
            .expect("output sized to n elements");
        out
    }

    /// Dequantizes into `out` (`n` elements, row-major). Errors if `out.len() != n`.
    /// Runs in parallel over blocks.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        let n = self.n_elements();
        if out.len() != n {
            return Err(Error::shape("out", format!("[{n}]"), &[out.len()]));
        }
        let bs = self.blocksize;
        out.par_chunks_mut(bs).enumerate().for_each(|(b, chunk)| {
            self.dequantize_span(b * bs, chunk);
        });
        Ok(())
    }

    /// Dequantizes rows `row_start..row_end` of the tensor seen as a matrix
    /// `[rows, cols]`, `cols = shape[last]`, `rows = n / cols` (a 1-D tensor is one row), into
    /// `out` (`(row_end - row_start) * cols` elements, row-major). Lets a QLoRA matmul
    /// dequantize a tile at a time without materializing the whole matrix; the values equal
    /// the same rows of [`Self::dequantize`] bit for bit.
    ///
    /// Errors: `row_start > row_end`, `row_end > rows`, or a wrong `out` length.
    pub fn dequantize_rows(&self, row_start: usize, row_end: usize, out: &mut [f32]) -> Result<()> {
        let cols = *self.shape.last().expect("shape is non-empty");
        let rows = self.n_elements() / cols;
        if row_start > row_end || row_end > rows {
            return Err(Error::arg(
                "rows",
                format!("range {row_start}..{row_end} is not within 0..{rows}"),
            ));
        }
        let len = (row_end - row_start) * cols;
        if out.len() != len {
            return Err(Error::shape("out", format!("[{len}]"), &[out.len()]));
        }
        self.dequantize_span(row_start * cols, out);
        Ok(())
    }

    /// Dequantizes the elements `start..start + out.len()` (must lie within `0..n`).
    fn dequantize_span(&self, start: usize, out: &mut [f32]) {
        let bs = self.blocksize;
        let end = start + out.len();
        let mut j = start;
        while j < end {
            let b = j / bs;
            let block_end = ((b + 1) * bs).min(end);
            let a = self.block_absmax(b);
            let table: [f32; 16] = std::array::from_fn(|k| NF4_CODE[k] * a);
            for (jj, o) in (j..block_end).zip(out[j - start..block_end - start].iter_mut()) {
                let byte = self.packed[jj >> 1];
                let q = if jj & 1 == 0 { byte >> 4 } else { byte & 0x0f };
                *o = table[q as usize];
            }
            j = block_end;
        }
    }
}

fn check_finite(name: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFinite {
            name: name.into(),
            index,
        }),
        None => Ok(()),
    }
}

/// torch's `bucketize(v, bounds, right=False)` on 15 sorted bounds: the binary search
/// `cus_lower_bound` (first `i` with `bounds[i] >= v`; a NaN goes to the end).
#[inline]
fn bucketize(v: f32, bounds: &[f32; 15]) -> u8 {
    let (mut start, mut end) = (0usize, bounds.len());
    while start < end {
        let mid = start + ((end - start) >> 1);
        // `!(x >= v)` rather than `x < v`: identical for numbers, and a NaN moves right as in torch.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(bounds[mid] >= v) {
            start = mid + 1;
        } else {
            end = mid;
        }
    }
    start as u8
}

/// The NF4 midpoints `(code[i] + code[i + 1]) / 2` in f32 (bnb's `_get_4bit_quantize_bounds`).
fn nf4_bounds() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// Quantizes `w` (row-major, `shape`) to NF4 exactly as bitsandbytes 0.50's CPU
/// `quantize_4bit(quant_type="nf4", blocksize, compress_statistics=double_quant)` does:
///
/// * Full blocks: `absmax = max|w|` (stored as is, even 0), `v = clamp(w * (1 / max(absmax,
///   1e-38)), -1, 1)` with the fp32 reciprocal. The short last block (when `blocksize` does not
///   divide `n`) follows torch's separate code path: `am = max(max|w|, 1e-38)` is stored, and
///   `v = clamp(w / am, -1, 1)` uses a true division.
/// * `q = bucketize(v, midpoints)`: nearest code, a value exactly on a midpoint goes to the lower
///   index. Packed high nibble first; an odd `n` is padded with nibble 7.
/// * With `double_quant`: `offset = mean(absmax)` in torch's summation order
///   ([`TorchCpuOrder::detected`]), then `absmax - offset` is quantized per block of 256 by bnb's C++ CPU kernel: `nested_absmax =
///   max|a|` (a block of all zeros gets index 0), `v = a * (1 / nested_absmax)`, and the index
///   comes from bnb's 65536-cell lookup table (see [`dynamic_lut`]), not exact nearest rounding.
///
/// Errors: `blocksize` not a power of two in 32..=4096; `shape` not matching `w.len()`; empty
/// input; a NaN or Inf in `w` (`Error::NonFinite` names the flat index).
pub fn quantize_nf4(
    w: &[f32],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    quantize_nf4_in_order(w, shape, blocksize, double_quant, TorchCpuOrder::detected())
}

/// [`quantize_nf4`] with the double-quant offset summed in torch's `order` (the CPU capability
/// and thread count of the torch process to match, e.g. one that called
/// `torch.set_num_threads`); the order matters from 32768 blocks on, and between AVX-512 and
/// other CPUs at any size. Errors as [`quantize_nf4`].
pub fn quantize_nf4_in_order(
    w: &[f32],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
    order: TorchCpuOrder,
) -> Result<Nf4Tensor> {
    check_blocksize(blocksize)?;
    let n: usize = shape.iter().product();
    if shape.is_empty() || n != w.len() {
        return Err(Error::shape(
            "shape",
            format!("a shape with {} elements (the length of w)", w.len()),
            shape,
        ));
    }
    if n == 0 {
        return Err(Error::arg("w", "cannot quantize an empty tensor"));
    }
    check_finite("w", w)?;

    let nblocks = n.div_ceil(blocksize);
    let full = n / blocksize;
    let bounds = nf4_bounds();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; nblocks];
    packed
        .par_chunks_mut(blocksize / 2)
        .zip(w.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .enumerate()
        .for_each(|(b, ((p, x), am))| {
            let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let q = |v: f32| bucketize(v.clamp(-1.0, 1.0), &bounds);
            let qs: Vec<u8> = if b < full {
                *am = m;
                let recip = 1.0 / m.max(ABSMAX_MIN);
                x.iter().map(|&v| q(v * recip)).collect()
            } else {
                let m = m.max(ABSMAX_MIN);
                *am = m;
                x.iter().map(|&v| q(v / m)).collect()
            };
            for (k, byte) in p.iter_mut().enumerate() {
                let hi = qs[2 * k];
                let lo = qs.get(2 * k + 1).copied().unwrap_or(PAD_NIBBLE);
                *byte = (hi << 4) | lo;
            }
        });

    let absmax = if double_quant {
        double_quantize(&absmax, order)
    } else {
        Absmax::F32(absmax)
    };
    Ok(Nf4Tensor {
        packed,
        absmax,
        shape: shape.to_vec(),
        blocksize,
    })
}

/// torch's `absmax.mean()` as bitsandbytes takes it for the double-quant offset: the f32 mean
/// in the summation order torch would use in this process ([`TorchCpuOrder::detected`]: 16
/// lanes on AVX-512, 8 elsewhere; its thread count from 32768 blocks on).
pub fn mean_f32(x: &[f32]) -> f32 {
    torch_mean_f32(x, TorchCpuOrder::detected())
}

/// Double quantization of the per-block absmax (bnb's `quantize_4bit(compress_statistics=True)`).
fn double_quantize(absmax: &[f32], order: TorchCpuOrder) -> Absmax {
    let offset = torch_mean_f32(absmax, order);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = dynamic_map();
    let lut = dynamic_lut();
    let mut absmax_q = vec![0u8; centered.len()];
    let mut nested_absmax = vec![0f32; centered.len().div_ceil(NESTED_BLOCKSIZE)];
    absmax_q
        .par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(centered.par_chunks(NESTED_BLOCKSIZE))
        .zip(nested_absmax.par_iter_mut())
        .for_each(|((q, a), na)| {
            let m = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            *na = m;
            if m == 0.0 {
                q.fill(0);
                return;
            }
            let inv = 1.0 / m;
            for (qi, &v) in q.iter_mut().zip(a) {
                *qi = lut[lut_cell(v * inv)];
            }
        });
    Absmax::Double {
        absmax_q,
        nested_absmax,
        nested_code: code.to_vec(),
        offset,
        nested_blocksize: NESTED_BLOCKSIZE,
    }
}

/// bnb's `norm_to_lut_index`: `uint16((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)`; the compiled
/// library fuses the last multiply-add into one FMA, so this does too.
#[inline]
fn lut_cell(v: f32) -> usize {
    let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
    t.mul_add(65535.0, 0.5) as usize
}

/// bnb's 65536-cell quantization lookup table for [`dynamic_map`] (`build_quantize_lut`): cell
/// `i` holds the first code index whose upper midpoint `0.5 * (code[k] + code[k + 1])` is not
/// below the grid value `-1 + (2 i) / 65535` (all in f32).
pub fn dynamic_lut() -> &'static [u8; 65536] {
    static LUT: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map();
        let mid: [f32; 255] = std::array::from_fn(|i| 0.5 * (code[i] + code[i + 1]));
        let mut lut = Box::new([0u8; 65536]);
        let mut k = 0usize;
        for (i, cell) in lut.iter_mut().enumerate() {
            let val = (2.0 * i as f32) / 65535.0 - 1.0;
            while k < 255 && mid[k] < val {
                k += 1;
            }
            *cell = k as u8;
        }
        lut
    })
}

/// bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`: 256 ascending f32 values, `code[0] = -0.99297`, `code[255] = 1.0`.
///
/// For exponent `i` in 0..7, the `2^i` midpoints of `torch.linspace(0.1, 1, 2^i + 1)` (f32)
/// are scaled by `±f32(10^(i - 6))`; then 0 and 1 are added and everything is sorted.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for i in 0..7i32 {
            let items = (1usize << i) + 1;
            let b = torch_linspace_f32(0.1, 1.0, items);
            let scale = 10f64.powi(i - 6) as f32;
            for w in b.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(scale * mean);
                data.push(-scale * mean);
            }
        }
        data.push(0.0);
        data.push(1.0);
        debug_assert_eq!(data.len(), 256);
        data.sort_by(f32::total_cmp);
        let mut out = [0f32; 256];
        out.copy_from_slice(&data);
        out
    })
}

/// torch's CPU `linspace(start, end, steps, dtype=float32)` as torch 2.15 computes it (checked
/// bit for bit against it for every step count the dynamic map uses): `step = (end - start) /
/// (steps - 1)` in f32; the first half is `start + step * i` and the second half
/// `end - step * (steps - 1 - i)`, each product-and-sum fused into one FMA (a single rounding).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}
