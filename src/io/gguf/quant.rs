//! ggml tensor types (`GgmlType`, their block layouts) and dequantization to f32 (gguf-py
//! `gguf/quants.py`).

use std::fmt;

use half::f16;
use rayon::prelude::*;

#[cfg(doc)]
use super::GgufFile;
use crate::error::{Error, Result};

/// Blocks dequantized per rayon task.
const BLOCKS_PER_TASK: usize = 2048;

/// A ggml tensor type, with its GGUF id as the discriminant (`enum ggml_type`, gguf-py
/// `GGMLQuantizationType`). Ids that ggml retired (4, 5, 31..33, 36..38) are not listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
}

impl GgmlType {
    /// Every known type, for lookups by id.
    const ALL: [GgmlType; 32] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ3_XXS,
        GgmlType::IQ1_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ3_S,
        GgmlType::IQ2_S,
        GgmlType::IQ4_XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1_M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
    ];

    /// The type with GGUF id `id`, or `None` for an unknown or retired id.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| *t as u32 == id)
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// `(elements per block, bytes per block)`, as gguf-py's `GGML_QUANT_SIZES`.
    pub fn block_layout(self) -> (usize, usize) {
        use GgmlType::*;
        const QK_K: usize = 256;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 4 + 32),
            Q2_K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3_K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4_K => (QK_K, 2 + 2 + QK_K / 2 + 12),
            Q5_K => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12),
            Q6_K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8_K => (QK_K, 4 + QK_K + QK_K / 8),
            IQ2_XXS => (QK_K, 2 + QK_K / 4),
            IQ2_XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3_XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1_S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4_NL => (32, 2 + 16),
            IQ3_S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2_S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4_XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
        }
    }

    /// Whether [`GgufFile::tensor_f32`] / [`dequantize`] can convert this type to f32.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q8_0)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} (ggml type {})", self.id())
    }
}

/// Converts `bytes` of ggml type `ty` to f32 into `out` (row-major, storage order).
///
/// Formats (all little-endian; a block of 32 for the quantized ones):
/// * F32, F16 (IEEE half), BF16 (`bits << 16`).
/// * Q4_0: f16 `d`, 16 bytes `qs`; element `j < 16` is the low nibble of `qs[j]`, element
///   `j + 16` its high nibble; value `d * (q - 8)`.
/// * Q4_1: f16 `d`, f16 `m`, 16 bytes `qs` (nibbles as Q4_0); value `d * q + m`.
/// * Q8_0: f16 `d`, 32 i8 `qs`; value `d * q`.
///
/// # Errors
/// [`Error::InvalidArgument`] if `ty` cannot be dequantized or `bytes.len()` does not match
/// `out.len()` elements of `ty`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (block, block_bytes) = ty.block_layout();
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => deq_f32,
        GgmlType::F16 => deq_f16,
        GgmlType::BF16 => deq_bf16,
        GgmlType::Q4_0 => deq_q4_0,
        GgmlType::Q4_1 => deq_q4_1,
        GgmlType::Q8_0 => deq_q8_0,
        other => {
            return Err(Error::arg(
                "ggml_type",
                format!("cannot dequantize {other} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)"),
            ));
        }
    };
    if !out.len().is_multiple_of(block) || bytes.len() != out.len() / block * block_bytes {
        return Err(Error::arg(
            "bytes",
            format!(
                "{} bytes of {ty} do not hold {} elements (blocks of {block} elements in \
                 {block_bytes} bytes)",
                bytes.len(),
                out.len()
            ),
        ));
    }
    out.par_chunks_mut(block * BLOCKS_PER_TASK)
        .zip(bytes.par_chunks(block_bytes * BLOCKS_PER_TASK))
        .for_each(|(o, b)| kernel(b, o));
    Ok(())
}

fn le_f16(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

fn deq_f32(b: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

fn deq_f16(b: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = le_f16(c);
    }
}

fn deq_bf16(b: &[u8], out: &mut [f32]) {
    // gguf-py: `(blocks.view(np.int16).astype(np.int32) << 16).view(np.float32)`.
    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
}

fn deq_q4_0(b: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(18)) {
        let d = le_f16(blk);
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = blk[2 + j];
            lo[j] = d * ((q & 0x0F) as i8 - 8) as f32;
            hi[j] = d * ((q >> 4) as i8 - 8) as f32;
        }
    }
}

fn deq_q4_1(b: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(20)) {
        let d = le_f16(blk);
        let m = le_f16(&blk[2..]);
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            let q = blk[4 + j];
            lo[j] = d * f32::from(q & 0x0F) + m;
            hi[j] = d * f32::from(q >> 4) + m;
        }
    }
}

fn deq_q8_0(b: &[u8], out: &mut [f32]) {
    for (o, blk) in out.chunks_exact_mut(32).zip(b.chunks_exact(34)) {
        let d = le_f16(blk);
        for (x, &q) in o.iter_mut().zip(&blk[2..]) {
            *x = d * f32::from(q as i8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_1_nibble_order_and_formula() {
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16_bytes(0.5));
        blk.extend_from_slice(&f16_bytes(-1.0));
        blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &blk, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    #[test]
    fn q4_0_and_q8_0() {
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16_bytes(2.0));
        blk.extend((0..16u8).map(|j| j | (j << 4)));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_0, &blk, &mut out).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 2.0 * (j as f32 - 8.0));
            assert_eq!(out[j + 16], out[j]);
        }
        let mut blk = Vec::new();
        blk.extend_from_slice(&f16_bytes(0.25));
        blk.extend((0..32i32).map(|j| ((j - 16) * 7) as i8 as u8));
        dequantize(GgmlType::Q8_0, &blk, &mut out).unwrap();
        for (j, x) in out.iter().enumerate() {
            assert_eq!(*x, 0.25 * ((j as i32 - 16) * 7) as f32);
        }
    }

    #[test]
    fn f16_bf16() {
        let xs = [1.5f32, -0.0, 65504.0, 1e-7];
        let b: Vec<u8> = xs.iter().flat_map(|&x| f16_bytes(x)).collect();
        let mut out = [0f32; 4];
        dequantize(GgmlType::F16, &b, &mut out).unwrap();
        for (o, x) in out.iter().zip(xs) {
            assert_eq!(*o, f16::from_f32(x).to_f32());
        }
        let b: Vec<u8> = xs
            .iter()
            .flat_map(|&x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        dequantize(GgmlType::BF16, &b, &mut out).unwrap();
        for (o, x) in out.iter().zip(xs) {
            assert_eq!(o.to_bits(), x.to_bits() & 0xFFFF_0000);
        }
    }

    #[test]
    fn dequantize_rejects_bad_lengths_and_types() {
        let mut out = [0f32; 32];
        assert!(dequantize(GgmlType::Q4_1, &[0u8; 19], &mut out).is_err());
        assert!(dequantize(GgmlType::Q4_K, &[0u8; 144], &mut [0f32; 256]).is_err());
    }
}
