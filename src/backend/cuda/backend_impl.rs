//! `impl Backend for Cuda`: each method delegates to the module of its kernel family.

use super::{
    Cuda, CudaBuf, CudaNf4, adalora_alloc, adalora_vera, adapters, berr, check_dims, decode, dora,
    nf4, ops,
};
use crate::backend::{
    AdaLoraGrads, AdaLoraIpt, AdamWParams, AttentionSaved, Backend, DoraGrads, DoraSaved,
    Nf4Weight, SeqSpan, Tensor,
};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;
use std::sync::Arc;

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Nf4Buf = CudaNf4;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn synchronize(&self) -> Result<()> {
        Cuda::synchronize(self)
    }

    fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor<Self>> {
        let n: usize = shape.iter().product();
        if data.len() != n {
            return Err(Error::arg(
                "data",
                format!("{} values for shape {shape:?} ({n} elements)", data.len()),
            ));
        }
        check_dims(shape)?;
        let bytes = self.encode(data);
        let mem = if bytes.is_empty() {
            self.raw_alloc(1)?
        } else {
            self.stream().clone_htod(&bytes).map_err(berr)?
        };
        Ok(Tensor {
            buf: CudaBuf {
                mem: Arc::new(mem),
                dtype: self.dtype,
                len: n,
            },
            shape: shape.to_vec(),
        })
    }

    fn download(&self, t: &Tensor<Self>) -> Result<Vec<f32>> {
        let bytes = self.download_bytes(&t.buf.mem, t.buf.len * t.buf.dtype.size())?;
        Ok(decode(&bytes, t.buf.dtype))
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor<Self>> {
        self.alloc(shape)
    }

    fn copy_into(&self, src: &Tensor<Self>, dst: &mut Tensor<Self>) -> Result<()> {
        crate::backend::same_shape("dst", dst, src)?;
        if src.buf.dtype != dst.buf.dtype || src.buf.mem.len() != dst.buf.mem.len() {
            return Err(Error::arg("src", "storage type differs from dst's"));
        }
        if Arc::get_mut(&mut dst.buf.mem).is_none() {
            // Shared with a clone, which keeps its values: copy into a buffer of dst's own.
            dst.buf.mem = Arc::new(self.raw_alloc(src.buf.mem.len())?);
        }
        let mem = Arc::get_mut(&mut dst.buf.mem).ok_or_else(|| berr("dst is shared"))?;
        self.stream().memcpy_dtod(&*src.buf.mem, mem).map_err(berr)
    }

    fn gather_rows(&self, t: &Tensor<Self>, idx: &[u32]) -> Result<Tensor<Self>> {
        ops::gather_rows(self, t, idx)
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Tensor<Self>,
        idx: &[u32],
        src: &Tensor<Self>,
    ) -> Result<()> {
        ops::scatter_add_rows(self, dst, idx, src)
    }

    fn linear(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        adapters::linear(self, x, w, bias)
    }

    fn linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Tensor<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        adapters::linear_backward_input(self, dy, w, acc)
    }

    fn linear_backward_weight(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        dw: &mut Tensor<Self>,
    ) -> Result<()> {
        adapters::linear_backward_weight(self, dy, x, dw)
    }

    fn axpy(&self, a: &mut Tensor<Self>, alpha: f32, b: &Tensor<Self>) -> Result<()> {
        ops::axpy(self, a, alpha, b)
    }

    fn scale(&self, a: &mut Tensor<Self>, alpha: f32) -> Result<()> {
        ops::scale(self, a, alpha)
    }

    fn sum_squares(&self, a: &Tensor<Self>) -> Result<f64> {
        ops::sum_squares(self, a)
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
        adapters::lora_forward(self, x, w0, bias, lora_a, lora_b, scaling)
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
        adapters::lora_backward(self, dy, x, h, w0, lora_a, lora_b, scaling)
    }

    fn lora_merge(
        &self,
        w: &mut Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
        sign: f32,
    ) -> Result<()> {
        adapters::lora_merge(self, w, lora_a, lora_b, scaling, sign)
    }

    fn row_sq_norms(&self, w: &Tensor<Self>) -> Result<Tensor<Self>> {
        dora::row_sq_norms(self, w)
    }

    fn dora_weight_norm(
        &self,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        dora::dora_weight_norm(self, w0, w0_row_sq, lora_a, lora_b, scaling)
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
        dora::dora_forward(
            self,
            x,
            w0,
            bias,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
        )
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
        dora::dora_backward(
            self,
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
        dora::dora_merge(
            self,
            w,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
            false,
        )
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
        dora::dora_merge(
            self,
            w,
            lora_a,
            lora_b,
            scaling,
            magnitude,
            weight_norm,
            true,
        )
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
        adalora_vera::vera_forward(self, x, w0, bias, vera_a, vera_b, lambda_d, lambda_b)
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
        adalora_vera::vera_backward(self, dy, x, h, w0, vera_a, vera_b, lambda_d, lambda_b)
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
        adalora_vera::vera_merge(self, w, vera_a, vera_b, lambda_d, lambda_b, sign)
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
        adalora_vera::adalora_forward(self, x, w0, bias, lora_a, lora_b, lora_e, scaling, ranknum)
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
        adalora_vera::adalora_backward(self, dy, x, h, w0, lora_a, lora_b, lora_e, scaling, ranknum)
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
        adalora_vera::adalora_merge(self, w, lora_a, lora_b, lora_e, scaling, ranknum, sign)
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
        adalora_alloc::update_ipt(self, param, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2)
    }

    fn adalora_triplet_scores(
        &self,
        ema: &AdaLoraIpt<Self>,
        scores: &mut Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora_alloc::triplet_scores(self, ema, scores, offset)
    }

    fn adalora_threshold(&self, scores: &Tensor<Self>, k: usize) -> Result<Tensor<Self>> {
        adalora_alloc::threshold(self, scores, k)
    }

    fn adalora_rank_mask(
        &self,
        scores: &Tensor<Self>,
        threshold: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        adalora_alloc::rank_mask(self, scores, threshold)
    }

    fn adalora_apply_mask(
        &self,
        lora_e: &mut Tensor<Self>,
        keep: &Tensor<Self>,
        offset: usize,
    ) -> Result<()> {
        adalora_alloc::apply_mask(self, lora_e, keep, offset)
    }

    fn adalora_orth_reg(
        &self,
        factors: &[(&Tensor<Self>, &Tensor<Self>)],
        grads: &mut [(&mut Tensor<Self>, &mut Tensor<Self>)],
        orth_reg_weight: f32,
    ) -> Result<Tensor<Self>> {
        adalora_alloc::orth_reg(self, factors, grads, orth_reg_weight)
    }

    fn upload_nf4(&self, w: &Nf4Tensor) -> Result<Nf4Weight<Self>> {
        nf4::upload(self, w)
    }

    fn nf4_dequantize(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::dequantize(self, w)
    }

    fn nf4_linear(
        &self,
        x: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        nf4::linear(self, x, w, bias)
    }

    fn nf4_linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        nf4::linear_backward_input(self, dy, w, acc)
    }

    fn nf4_row_sq_norms(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        nf4::row_sq_norms(self, w)
    }

    fn nf4_dora_weight_norm(
        &self,
        w0: &Nf4Weight<Self>,
        w0_row_sq: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        nf4::dora_weight_norm(self, w0, w0_row_sq, lora_a, lora_b, scaling)
    }

    fn lora_add(
        &self,
        y: &mut Tensor<Self>,
        x: &Tensor<Self>,
        lora_a: &Tensor<Self>,
        lora_b: &Tensor<Self>,
        scaling: f32,
    ) -> Result<Tensor<Self>> {
        adapters::lora_add(self, y, x, lora_a, lora_b, scaling)
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
        adapters::lora_backward_adapter(self, dy, x, h, lora_a, lora_b, scaling, dx)
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
        dora::dora_forward_from_base(
            self,
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
        dora::dora_backward_adapter(
            self,
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
        ops::rmsnorm(self, x, weight, eps)
    }

    fn rmsnorm_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        weight: &Tensor<Self>,
        rstd: &Tensor<Self>,
        dweight: Option<&mut Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        ops::rmsnorm_backward(self, dy, x, weight, rstd, dweight)
    }

    fn rope(
        &self,
        x: &mut Tensor<Self>,
        positions: &[u32],
        head_dim: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(self, x, positions, head_dim, theta, inverse)
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
        ops::attention(self, q, k, v, seqs, n_heads, n_kv_heads, scale)
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
        ops::attention_backward(
            self, d_out, q, k, v, saved, seqs, n_heads, n_kv_heads, scale,
        )
    }

    fn swiglu(&self, gate: &Tensor<Self>, up: &Tensor<Self>) -> Result<Tensor<Self>> {
        ops::swiglu(self, gate, up)
    }

    fn swiglu_backward(
        &self,
        d: &Tensor<Self>,
        gate: &Tensor<Self>,
        up: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::swiglu_backward(self, d, gate, up)
    }

    fn cross_entropy(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(f64, Tensor<Self>)> {
        ops::cross_entropy(self, logits, labels, grad_scale)
    }

    fn cross_entropy_stats(
        &self,
        logits: &Tensor<Self>,
        labels: &[i32],
        grad_scale: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        ops::cross_entropy_stats(self, logits, labels, grad_scale)
    }

    fn adamw_step(
        &self,
        param: &mut Tensor<Self>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        p: &AdamWParams,
    ) -> Result<()> {
        ops::adamw_step(self, param, grad, m, v, p)
    }
}
