//! Encoding f32 values into the ggml types the writers emit: F32, F16, BF16 and Q8_0, bit for
//! bit as ggml's reference encoders (`ggml_fp32_to_fp16`, `ggml_fp32_to_bf16`,
//! `quantize_row_q8_0_ref`) and gguf-py's `gguf.quants.quantize`.

use half::{bf16, f16};
use rayon::prelude::*;

use super::GgmlType;
use crate::error::{Error, Result};

/// Q8_0 blocks encoded per rayon task.
const BLOCKS_PER_TASK: usize = 4096;

/// Encodes row-major `values` (rows of `row_len` elements) as ggml type `ty`; the inverse of
/// [`super::dequantize`] up to the type's rounding.
///
/// * F32: the values as they are.
/// * F16 / BF16: rounded to nearest, ties to even (F16 overflows to infinity; BF16 keeps NaN a
///   quiet NaN), as numpy's `astype(float16)` and gguf-py's `bf16` conversion.
/// * Q8_0: blocks of 32 along each row: `d = max|x| / 127`, `q = round(x / d)` computed as
///   `x * (1/d)` with ties away from zero (`roundf`), stored as f16 `d` and 32 i8 `q`; an
///   all-zero block has `d = 0`, `q = 0`.
///
/// # Errors
/// [`Error::InvalidArgument`] for a type this writer does not encode, or Q8_0 with `row_len`
/// not a multiple of 32 or `values` not whole rows.
pub fn encode(ty: GgmlType, values: &[f32], row_len: usize) -> Result<Vec<u8>> {
    match ty {
        GgmlType::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => Ok(values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect()),
        GgmlType::BF16 => Ok(values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect()),
        GgmlType::Q8_0 => {
            if row_len == 0 || !row_len.is_multiple_of(32) || !values.len().is_multiple_of(row_len)
            {
                return Err(Error::arg(
                    "row_len",
                    format!(
                        "Q8_0 encodes rows whose length is a multiple of 32; got {} values in \
                         rows of {row_len}",
                        values.len()
                    ),
                ));
            }
            let mut out = vec![0u8; values.len() / 32 * 34];
            out.par_chunks_mut(34 * BLOCKS_PER_TASK)
                .zip(values.par_chunks(32 * BLOCKS_PER_TASK))
                .for_each(|(o, x)| {
                    for (ob, xb) in o.chunks_exact_mut(34).zip(x.chunks_exact(32)) {
                        q8_0_block(xb, ob);
                    }
                });
            Ok(out)
        }
        other => Err(Error::arg(
            "ggml_type",
            format!("cannot encode {other} (supported: F32, F16, BF16, Q8_0)"),
        )),
    }
}

/// One Q8_0 block (`quantize_row_q8_0_ref`): 32 values into 34 bytes.
fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, &v) in out[2..].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::dequantize;

    #[test]
    fn q8_0_round_trips_within_half_a_step_and_matches_the_formula() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.173)
            .collect();
        let bytes = encode(GgmlType::Q8_0, &x, 64).unwrap();
        assert_eq!(bytes.len(), 2 * 34);
        let mut back = vec![0f32; 64];
        dequantize(GgmlType::Q8_0, &bytes, &mut back).unwrap();
        for (b, xb) in back.chunks(32).zip(x.chunks(32)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0).to_f32();
            // half a step, plus the f16 rounding of the scale times |q| (<= 127)
            for (u, v) in b.iter().zip(xb) {
                assert!(
                    (u - v).abs() <= 0.5 * d + v.abs() * 2f32.powi(-10) + 1e-7,
                    "{u} vs {v}"
                );
            }
            // the largest magnitude is stored as +-127
            let qmax = b.iter().fold(0f32, |m, v| m.max(v.abs())) / d;
            assert!((qmax - 127.0).abs() < 1e-3, "{qmax}");
        }
        // ties away from zero: 63.5/127 * 127 = 63.5 -> 64
        let mut t = vec![0f32; 32];
        t[0] = 127.0;
        t[1] = 63.5;
        t[2] = -63.5;
        let b = encode(GgmlType::Q8_0, &t, 32).unwrap();
        assert_eq!((b[2] as i8, b[3] as i8, b[4] as i8), (127, 64, -64));
        // a zero block
        let z = encode(GgmlType::Q8_0, &[0.0; 32], 32).unwrap();
        assert!(z.iter().all(|&v| v == 0));
    }

    #[test]
    fn halves_round_to_nearest_even_and_bad_requests_fail() {
        let x = [1.0f32 + f32::EPSILON, -2.5, 65520.0, 1e-8];
        let b = encode(GgmlType::F16, &x, 4).unwrap();
        let mut back = [0f32; 4];
        dequantize(GgmlType::F16, &b, &mut back).unwrap();
        assert_eq!(back[..2], [1.0, -2.5]);
        assert!(back[2].is_infinite());
        let b = encode(
            GgmlType::BF16,
            &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)],
            2,
        )
        .unwrap();
        let mut back = [0f32; 2];
        dequantize(GgmlType::BF16, &b, &mut back).unwrap();
        assert_eq!(back, [1.0, 1.0 + 2f32.powi(-6)]);
        assert!(encode(GgmlType::Q8_0, &[0.0; 48], 48).is_err());
        assert!(encode(GgmlType::Q8_0, &[0.0; 40], 32).is_err());
        assert!(encode(GgmlType::Q4_1, &[0.0; 32], 32).is_err());
    }
}
