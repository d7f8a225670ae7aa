//! The per-method kernel calls the tests were written against (one per method and base format,
//! as the `Backend` seam had them before it described every method as one fused low-rank
//! op), as a test-only extension over that one op. Each is the fused op with the method's
//! [`LowRank`] description, so the tests keep their assertions while exercising the one op.
//!
//! AdaLoRA's `h` is `x A^T` (before `lora_E`), as the fused op keeps it.

#![allow(dead_code, clippy::too_many_arguments)]

use lorafuse::adapter::{AdaLoraGrads, DoraGrads, DoraSaved};
use lorafuse::backend::{Backend, Base, GradWants, LowRank, Nf4Weight, Tensor, check};
use lorafuse::{Error, Result};

fn need<B: Backend>(t: Option<Tensor<B>>, what: &str) -> Result<Tensor<B>> {
    t.ok_or_else(|| Error::arg(what, "missing from the fused op's result"))
}

/// The old per-method calls, each a description of the one fused op.
pub trait PerMethod: Backend {
    fn lora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let o = self.linear_lowrank(x, Base::Dense(w0), bias, Some(&LowRank::lora(a, b, s)))?;
        Ok((o.y, need(o.h, "h")?))
    }

    fn lora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        let g = self.linear_lowrank_backward(
            dy,
            x,
            h,
            None,
            Base::Dense(w0),
            &LowRank::lora(a, b, s),
            GradWants::LORA,
        )?;
        Ok((g.dx, need(g.d_lora_a, "dA")?, need(g.d_lora_b, "dB")?))
    }

    fn lora_merge(
        &self,
        w: &mut Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        sign: f32,
    ) -> Result<()> {
        self.lowrank_merge(w, &LowRank::lora(a, b, s), sign)
    }

    fn dora_weight_norm(
        &self,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
    ) -> Result<Tensor<Self>> {
        self.lowrank_row_norms(Base::Dense(w0), w0_row_sq, &LowRank::lora(a, b, s))
    }

    fn nf4_dora_weight_norm(
        &self,
        w0: &Nf4Weight<Self>,
        w0_row_sq: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
    ) -> Result<Tensor<Self>> {
        self.lowrank_row_norms(Base::Nf4(w0), w0_row_sq, &LowRank::lora(a, b, s))
    }

    fn dora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        m: &Tensor<Self>,
        n: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>)> {
        let o = self.linear_lowrank(
            x,
            Base::Dense(w0),
            bias,
            Some(&LowRank::dora(a, b, s, m, Some(n))),
        )?;
        Ok((
            o.y,
            DoraSaved {
                h: need(o.h, "h")?,
                z: need(o.z, "z")?,
            },
        ))
    }

    fn dora_forward_with_norm(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        w0_row_sq: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        m: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, DoraSaved<Self>, Tensor<Self>)> {
        let o = self.linear_lowrank_with_norm(
            x,
            Base::Dense(w0),
            w0_row_sq,
            bias,
            &LowRank::dora(a, b, s, m, None),
        )?;
        Ok((
            o.y,
            DoraSaved {
                h: need(o.h, "h")?,
                z: need(o.z, "z")?,
            },
            need(o.weight_norm, "weight_norm")?,
        ))
    }

    fn dora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        saved: &DoraSaved<Self>,
        w0: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        m: &Tensor<Self>,
        n: &Tensor<Self>,
    ) -> Result<DoraGrads<Self>> {
        let g = self.linear_lowrank_backward(
            dy,
            x,
            &saved.h,
            Some(&saved.z),
            Base::Dense(w0),
            &LowRank::dora(a, b, s, m, Some(n)),
            GradWants::DORA,
        )?;
        Ok(DoraGrads {
            dx: g.dx,
            d_lora_a: need(g.d_lora_a, "dA")?,
            d_lora_b: need(g.d_lora_b, "dB")?,
            d_magnitude: need(g.d_magnitude, "dm")?,
        })
    }

    fn dora_merge(
        &self,
        w: &mut Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        m: &Tensor<Self>,
        n: &Tensor<Self>,
    ) -> Result<()> {
        self.lowrank_merge(w, &LowRank::dora(a, b, s, m, Some(n)), 1.0)
    }

    fn dora_merge_with_norm(
        &self,
        w: &mut Tensor<Self>,
        w_row_sq: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        m: &Tensor<Self>,
    ) -> Result<Tensor<Self>> {
        self.lowrank_merge_with_norm(w, w_row_sq, &LowRank::dora(a, b, s, m, None))
    }

    fn dora_unmerge(
        &self,
        w: &mut Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        s: f32,
        m: &Tensor<Self>,
        n: &Tensor<Self>,
    ) -> Result<()> {
        self.lowrank_merge(w, &LowRank::dora(a, b, s, m, Some(n)), -1.0)
    }

    fn vera_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        va: &Tensor<Self>,
        vb: &Tensor<Self>,
        ld: &Tensor<Self>,
        lb: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let o = self.linear_lowrank(
            x,
            Base::Dense(w0),
            bias,
            Some(&LowRank::vera(va, vb, ld, lb)),
        )?;
        Ok((o.y, need(o.h, "h")?))
    }

    fn vera_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        va: &Tensor<Self>,
        vb: &Tensor<Self>,
        ld: &Tensor<Self>,
        lb: &Tensor<Self>,
    ) -> Result<(Tensor<Self>, Tensor<Self>, Tensor<Self>)> {
        let g = self.linear_lowrank_backward(
            dy,
            x,
            h,
            None,
            Base::Dense(w0),
            &LowRank::vera(va, vb, ld, lb),
            GradWants::VERA,
        )?;
        Ok((
            g.dx,
            need(g.d_rank_scale, "dld")?,
            need(g.d_out_scale, "dlb")?,
        ))
    }

    fn vera_merge(
        &self,
        w: &mut Tensor<Self>,
        va: &Tensor<Self>,
        vb: &Tensor<Self>,
        ld: &Tensor<Self>,
        lb: &Tensor<Self>,
        sign: f32,
    ) -> Result<()> {
        self.lowrank_merge(w, &LowRank::vera(va, vb, ld, lb), sign)
    }

    fn adalora_forward(
        &self,
        x: &Tensor<Self>,
        w0: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
    ) -> Result<(Tensor<Self>, Tensor<Self>)> {
        let c = check::adalora_factor(scaling, ranknum)?;
        let o = self.linear_lowrank(
            x,
            Base::Dense(w0),
            bias,
            Some(&LowRank::adalora(a, b, e, c)),
        )?;
        Ok((o.y, need(o.h, "h")?))
    }

    fn adalora_backward(
        &self,
        dy: &Tensor<Self>,
        x: &Tensor<Self>,
        h: &Tensor<Self>,
        w0: &Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
    ) -> Result<AdaLoraGrads<Self>> {
        let c = check::adalora_factor(scaling, ranknum)?;
        let g = self.linear_lowrank_backward(
            dy,
            x,
            h,
            None,
            Base::Dense(w0),
            &LowRank::adalora(a, b, e, c),
            GradWants::ADALORA,
        )?;
        Ok(AdaLoraGrads {
            dx: g.dx,
            d_lora_a: need(g.d_lora_a, "dA")?,
            d_lora_b: need(g.d_lora_b, "dB")?,
            d_lora_e: need(g.d_rank_scale, "dE")?,
        })
    }

    fn adalora_merge(
        &self,
        w: &mut Tensor<Self>,
        a: &Tensor<Self>,
        b: &Tensor<Self>,
        e: &Tensor<Self>,
        scaling: f32,
        ranknum: f32,
        sign: f32,
    ) -> Result<()> {
        let c = check::adalora_factor(scaling, ranknum)?;
        self.lowrank_merge(w, &LowRank::adalora(a, b, e, c), sign)
    }

    fn nf4_linear(
        &self,
        x: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<Tensor<Self>> {
        Ok(self.linear_lowrank(x, Base::Nf4(w), bias, None)?.y)
    }

    fn nf4_linear_backward_input(
        &self,
        dy: &Tensor<Self>,
        w: &Nf4Weight<Self>,
        acc: Option<&mut Tensor<Self>>,
    ) -> Result<Option<Tensor<Self>>> {
        Ok(self.backward_input(dy, Base::Nf4(w), None, acc)?.0)
    }

    fn nf4_row_sq_norms(&self, w: &Nf4Weight<Self>) -> Result<Tensor<Self>> {
        self.row_sq_norms(Base::Nf4(w))
    }
}

impl<B: Backend> PerMethod for B {}
