//! The CPU reference backend: f32, row-major `Vec<f32>` buffers, a fast GEMM ([`gemm`]) and
//! rayon for the rest. Every other backend is tested against these functions, so they favour
//! plain, obviously-correct loops around the GEMMs.

mod adalora;
mod adapters;
pub mod gemm;
mod nf4;
mod ops;

use self::gemm::{Op, sgemm};
use super::{
    AdaLoraGrads, AdaLoraIpt, AdamWParams, AttentionSaved, Backend, DoraGrads, DoraSaved,
    Nf4Weight, SeqSpan, Tensor, check, same_shape,
};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// The CPU reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    /// Wraps host data as a tensor (no copy).
    pub fn from_vec(&self, data: Vec<f32>, shape: &[usize]) -> Result<Tensor<Cpu>> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::arg(
                "data",
                format!("{} values for shape {shape:?} ({n} elements)", data.len()),
            ));
        }
        Ok(Tensor {
            buf: data,
            shape: shape.to_vec(),
        })
    }
}

impl Tensor<Cpu> {
    /// The data of a CPU tensor.
    pub fn data(&self) -> &[f32] {
        &self.buf
    }
    /// The mutable data of a CPU tensor.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
    /// Consumes the tensor, returning its data.
    pub fn into_vec(self) -> Vec<f32> {
        self.buf
    }
}

fn new(data: Vec<f32>, shape: &[usize]) -> Tensor<Cpu> {
    Tensor {
        buf: data,
        shape: shape.to_vec(),
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    /// The quantized tensor itself, shared: uploading copies it once, clones are cheap.
    type Nf4Buf = Arc<Nf4Tensor>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        self.from_vec(data.to_vec(), shape)
    }

    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        Ok(t.buf.clone())
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>> {
        Ok(new(vec![0.0; shape.iter().product()], shape))
    }

    fn gather_rows(&self, t: &Tensor<Self>, idx: &[u32]) -> Result<Tensor<Self>> {
        let (n, d) = t.dims2("table")?;
        let mut out = vec![0.0f32; idx.len() * d];
        for (row, &i) in out.chunks_mut(d.max(1)).zip(idx) {
            let i = i as usize;
            if i >= n {
                return Err(Error::arg(
                    "idx",
                    format!("row index {i} out of range 0..{n}"),
                ));
            }
            row.copy_from_slice(&t.buf[i * d..(i + 1) * d]);
        }
        Ok(new(out, &[idx.len(), d]))
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()> {
        let (n, d) = dst.dims2("dst")?;
        src.expect_shape("src", &[idx.len(), d])?;
        for (row, &i) in src.buf.chunks(d.max(1)).zip(idx) {
            let i = i as usize;
            if i >= n {
                return Err(Error::arg(
                    "idx",
                    format!("row index {i} out of range 0..{n}"),
                ));
            }
            for (o, s) in dst.buf[i * d..(i + 1) * d].iter_mut().zip(row) {
                *o += s;
            }
        }
        Ok(())
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        let (t, din, dout) = check::linear(x, w)?;
        let mut y = vec![0.0f32; t * dout];
        if let Some(b) = bias {
            b.expect_shape("bias", &[dout])?;
            for row in y.chunks_mut(dout.max(1)) {
                row.copy_from_slice(&b.buf);
            }
        }
        let beta = if bias.is_some() { 1.0 } else { 0.0 };
        sgemm(
            Op::N,
            Op::T,
            t,
            dout,
            din,
            1.0,
            &x.buf,
            &w.buf,
            beta,
            &mut y,
        );
        Ok(new(y, &[t, dout]))
    }

    fn linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        let (t, dout) = dy.dims2("dy")?;
        let (wout, din) = w.dims2("w")?;
        if wout != dout {
            return Err(Error::shape("w", format!("[{dout}, in]"), w.shape()));
        }
        match acc {
            Some(dx) => {
                dx.expect_shape("dx", &[t, din])?;
                sgemm(
                    Op::N,
                    Op::N,
                    t,
                    din,
                    dout,
                    1.0,
                    &dy.buf,
                    &w.buf,
                    1.0,
                    &mut dx.buf,
                );
                Ok(None)
            }
            None => {
                let mut dx = vec![0.0f32; t * din];
                sgemm(
                    Op::N,
                    Op::N,
                    t,
                    din,
                    dout,
                    1.0,
                    &dy.buf,
                    &w.buf,
                    0.0,
                    &mut dx,
                );
                Ok(Some(new(dx, &[t, din])))
            }
        }
    }

    fn linear_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        let (t, dout) = dy.dims2("dy")?;
        let (tx, din) = x.dims2("x")?;
        if tx != t {
            return Err(Error::shape("x", format!("[{t}, in]"), x.shape()));
        }
        dw.expect_shape("dw", &[dout, din])?;
        sgemm(
            Op::T,
            Op::N,
            dout,
            din,
            t,
            1.0,
            &dy.buf,
            &x.buf,
            1.0,
            &mut dw.buf,
        );
        Ok(())
    }

    fn axpy(&self, a: &mut Tensor<Self>, alpha: f32, b: &Tensor<Self>) -> Result<()> {
        same_shape("b", b, a)?;
        a.buf
            .par_iter_mut()
            .with_min_len(1 << 14)
            .zip(b.buf.par_iter())
            .for_each(|(x, y)| *x += alpha * y);
        Ok(())
    }

    fn scale(&self, a: &mut Tensor<Self>, alpha: f32) -> Result<()> {
        a.buf.iter_mut().for_each(|x| *x *= alpha);
        Ok(())
    }

    fn sum_squares(&self, a: &Tensor<Self>) -> Result<f64> {
        Ok(a.buf.iter().map(|&x| (x as f64) * (x as f64)).sum())
    }

    fn lora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let (t, din, dout) = check::linear(x, w0)?;
        let r = check::lora(din, dout, lora_a, lora_b)?;
        let mut y = self.linear(x, w0, bias)?;
        // h = x A^T  [T, r]
        let mut h = vec![0.0f32; t * r];
        sgemm(
            Op::N,
            Op::T,
            t,
            r,
            din,
            1.0,
            &x.buf,
            &lora_a.buf,
            0.0,
            &mut h,
        );
        // y += s h B^T  (accumulated straight into y: no [T, out] temporary)
        sgemm(
            Op::N,
            Op::T,
            t,
            dout,
            r,
            scaling,
            &h,
            &lora_b.buf,
            1.0,
            &mut y.buf,
        );
        Ok((y, new(h, &[t, r])))
    }

    fn lora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        let (t, din, dout) = check::linear(x, w0)?;
        let r = check::lora(din, dout, lora_a, lora_b)?;
        dy.expect_shape("dy", &[t, dout])?;
        h.expect_shape("h", &[t, r])?;
        // g = dy B  [T, r]
        let mut g = vec![0.0f32; t * r];
        sgemm(
            Op::N,
            Op::N,
            t,
            r,
            dout,
            1.0,
            &dy.buf,
            &lora_b.buf,
            0.0,
            &mut g,
        );
        // dx = dy W0 + s g A
        let mut dx = vec![0.0f32; t * din];
        sgemm(
            Op::N,
            Op::N,
            t,
            din,
            dout,
            1.0,
            &dy.buf,
            &w0.buf,
            0.0,
            &mut dx,
        );
        sgemm(
            Op::N,
            Op::N,
            t,
            din,
            r,
            scaling,
            &g,
            &lora_a.buf,
            1.0,
            &mut dx,
        );
        // dA = s g^T x  [r, in];  dB = s dy^T h  [out, r]
        let mut da = vec![0.0f32; r * din];
        sgemm(Op::T, Op::N, r, din, t, scaling, &g, &x.buf, 0.0, &mut da);
        let mut db = vec![0.0f32; dout * r];
        sgemm(
            Op::T,
            Op::N,
            dout,
            r,
            t,
            scaling,
            &dy.buf,
            &h.buf,
            0.0,
            &mut db,
        );
        Ok((new(dx, &[t, din]), new(da, &[r, din]), new(db, &[dout, r])))
    }

    fn lora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        sign: f32,
    ) -> Result<()> {
        let (dout, din) = w.dims2("w")?;
        let r = check::lora(din, dout, lora_a, lora_b)?;
        sgemm(
            Op::N,
            Op::N,
            dout,
            din,
            r,
            sign * scaling,
            &lora_b.buf,
            &lora_a.buf,
            1.0,
            &mut w.buf,
        );
        Ok(())
    }

    fn row_sq_norms(&self, w: &Tensor<Self>) -> Result<Tensor<Self>> {
        adapters::row_sq_norms(w)
    }

    fn dora_weight_norm(
        &self,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        adapters::dora_weight_norm(w0, w0_row_sq, lora_a, lora_b, scaling)
    }

    fn dora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>)> {
        adapters::dora_forward(x, w0, bias, lora_a, lora_b, scaling, magnitude, weight_norm)
    }

    fn dora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        saved: &DoraSaved<Self>,
        w0: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<DoraGrads<Self>> {
        adapters::dora_backward(
            dy,
            x,
            saved,
            w0,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )
    }

    fn dora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<()> {
        adapters::dora_merge(w, lora_a, lora_b, scaling, magnitude, weight_norm)
    }

    fn dora_forward_with_norm(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>, Tensor<Self>)> {
        adapters::dora_forward_with_norm(x, w0, w0_row_sq, bias, lora_a, lora_b, scaling, magnitude)
    }

    fn dora_merge_with_norm(
        &self,
        w: &mut Tensor<Self>,
        w_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        adapters::dora_merge_with_norm(w, w_row_sq, lora_a, lora_b, scaling, magnitude)
    }

    fn dora_unmerge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<()> {
        adapters::dora_unmerge(w, lora_a, lora_b, scaling, magnitude, weight_norm)
    }

    fn vera_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        adapters::vera_forward(x, w0, bias, vera_a, vera_b, lambda_d, lambda_b)
    }

    fn vera_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        adapters::vera_backward(dy, x, h, w0, vera_a, vera_b, lambda_d, lambda_b)
    }

    fn vera_merge(
        &self,
        w: &mut Tensor<Self>,
        vera_a: &Tensor<Self>,
        vera_b: &Tensor<Self>,
        lambda_d: &Tensor<Self>,
        lambda_b: &Tensor<Self>,
        sign: f32,
    ) -> Result<()> {
        adapters::vera_merge(w, vera_a, vera_b, lambda_d, lambda_b, sign)
    }

    fn adalora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        lora_e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        adapters::adalora_forward(x, w0, bias, lora_a, lora_b, lora_e, scaling, ranknum)
    }

    fn adalora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        lora_e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
    ) -> Result<AdaLoraGrads<Self>> {
        adapters::adalora_backward(dy, x, h, w0, lora_a, lora_b, lora_e, scaling, ranknum)
    }

    fn adalora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        lora_e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
        sign: f32,
    ) -> Result<()> {
        adapters::adalora_merge(w, lora_a, lora_b, lora_e, scaling, ranknum, sign)
    }

    fn adalora_update_ipt(
        &self,
        param: &Tensor<Self>,
        grad: &Tensor<Self>,
        exp_avg_ipt: &mut Tensor<Self>,
        exp_avg_unc: &mut Tensor<Self>,
        beta1: f64,
        beta2: f64,
    ) -> Result<()> {
        adalora::update_ipt(param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2)
    }

    fn adalora_triplet_scores(
        &self,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::triplet_scores(ema, scores, offset)
    }

    fn adalora_threshold(&self, scores: &Tensor<Self>, k: usize) -> Result<Tensor<Self>> {
        adalora::threshold(scores, k)
    }

    fn adalora_rank_mask(
        &self,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        adalora::rank_mask(scores, threshold)
    }

    fn adalora_apply_mask(
        &self,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora::apply_mask(lora_e, keep, offset)
    }

    fn adalora_orth_reg(
        &self,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>> {
        adalora::orth_reg(factors, grads, orth_reg_weight)
    }

    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Nf4Weight<Self>> {
        nf4::upload(w)
    }

    fn nf4_dequantize(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::dequantize(w)
    }

    fn nf4_linear(
        &self,
        x: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        nf4::linear(x, w, bias)
    }

    fn nf4_linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        nf4::linear_backward_input(dy, w, acc)
    }

    fn nf4_row_sq_norms(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::row_sq_norms(w)
    }

    fn nf4_dora_weight_norm(
        &self,
        w0: &Nf4Weight<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        nf4::dora_weight_norm(w0, w0_row_sq, lora_a, lora_b, scaling)
    }

    fn lora_add(
        &self,
        y: &mut Tensor<Self>,
        x: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        adapters::lora_add(y, x, lora_a, lora_b, scaling)
    }

    fn lora_backward_adapter(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        dx: &mut Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        adapters::lora_backward_adapter(dy, x, h, lora_a, lora_b, scaling, dx)
    }

    fn dora_forward_from_base(
        &self,
        base_out: Tensor<Self>,
        x: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>)> {
        adapters::dora_forward_from_base(
            base_out,
            x,
            bias,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )
    }

    fn dora_backward_adapter(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        saved: &DoraSaved<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        magnitude: &Tensor<Self>,
        weight_norm: &Tensor<Self>,
    ) -> Result<(DoraGrads<Self>, Tensor<Self>)> {
        adapters::dora_backward_adapter(
            dy,
            x,
            saved,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )
    }

    fn rmsnorm(
        &self,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        eps: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::rmsnorm(x, weight, eps)
    }

    fn rmsnorm_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        ops::rmsnorm_backward(dy, x, weight, rstd, dweight)
    }

    fn rope(
        &self,
        x: &mut Tensor<Self>,
        positions: &[u32],
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(x, positions, head_dim, theta, inverse)
    }

    fn attention(
        &self,
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        v: &Tensor<Self>,
        seqs: &[SeqSpan],
        n_heads: usize,
        n_kv_heads: usize,
        scale: f32,
    ) -> Result<AttentionSaved<Self>> {
        ops::attention(q, k, v, seqs, n_heads, n_kv_heads, scale)
    }

    fn attention_backward(
        &self,
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
        ops::attention_backward(d_out, q, k, v, saved, seqs, n_heads, n_kv_heads, scale)
    }

    fn swiglu(&self, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<Tensor<Self>> {
        same_shape("up", up, gate)?;
        let out = gate
            .buf
            .par_iter()
            .with_min_len(1 << 14)
            .zip(up.buf.par_iter())
            .map(|(&g, &u)| ops::silu(g) * u)
            .collect();
        Ok(new(out, gate.shape()))
    }

    fn swiglu_backward(
        &self,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        same_shape("up", up, gate)?;
        same_shape("d", d, gate)?;
        let (dg, du): (Vec<f32>, Vec<f32>) = d
            .buf
            .par_iter()
            .with_min_len(1 << 14)
            .zip(gate.buf.par_iter().zip(up.buf.par_iter()))
            .map(|(&d, (&g, &u))| {
                let sig = 1.0 / (1.0 + (-g).exp());
                let silu = g * sig;
                // d silu/dg = sig * (1 + g (1 - sig))
                (d * u * sig * (1.0 + g * (1.0 - sig)), d * silu)
            })
            .unzip();
        Ok((new(dg, gate.shape()), new(du, gate.shape())))
    }

    fn cross_entropy(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)> {
        ops::cross_entropy(logits, labels, grad_scale)
    }

    fn cross_entropy_stats(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::cross_entropy_stats(logits, labels, grad_scale)
    }

    fn adamw_step(
        &self,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        p: &AdamWParams,
    ) -> Result<()> {
        // torch.optim.AdamW (single-tensor path): decay, moments, bias-corrected update with
        // eps added to sqrt(v_hat).
        let check::AdamWFactors {
            step_size,
            bc2_sqrt,
            decay,
        } = check::adamw(param, grad, m, v, p)?;
        for (((w, &g), m), v) in param
            .buf
            .iter_mut()
            .zip(&grad.buf)
            .zip(m.buf.iter_mut())
            .zip(v.buf.iter_mut())
        {
            *w *= decay;
            *m = p.beta1 * *m + (1.0 - p.beta1) * g;
            *v = p.beta2 * *v + (1.0 - p.beta2) * g * g;
            let denom = v.sqrt() / bc2_sqrt + p.eps;
            *w -= step_size * *m / denom;
        }
        Ok(())
    }
}
