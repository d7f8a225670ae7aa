//! Bottleneck adapters (Houlsby et al. 2019, sec. 2.1; Pfeiffer et al. 2021, sec. 3) and
//! AdapterFusion (Pfeiffer et al. 2021, sec. 3.2) as the `adapters` library 1.3.0 places them in
//! a Llama decoder layer.
//!
//! One adapter is `f(u) = act(u W_down^T + b_down) W_up^T + b_up` with a bottleneck of
//! `hidden / reduction_factor`. Writing x for the residual stream entering a sub-layer and h for
//! the sub-layer's output before the residual addition:
//! - Houlsby (`double_seq_bn`): after attention and after the MLP, each `x + h + f(h)`;
//! - Pfeiffer (`seq_bn`): after the MLP only, reading the residual sum: `x + h + f(x + h)`;
//! - AdapterFusion over frozen Pfeiffer adapters `f_i`, after the MLP, with `y = x + h` and
//!   `u_i = f_i(y)`: `out = y + sum_i softmax_i(q . k_i) v_i`, `q = y Wq^T + bq`,
//!   `k_i = u_i Wk^T + bk`, `v_i = u_i Wv^T` (no 1/sqrt(d) scaling, no value bias).
//!
//! The library applies no layer norm inside the adapter on Llama, and a scaling of 1.

use crate::backend::{Activation, Axis, Backend, Tensor};
use crate::error::{Error, Result};
use rand::SeedableRng;

/// Where the adapters sit (the `adapters` library's config classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BottleneckKind {
    /// `DoubleSeqBnConfig` (`double_seq_bn`): after attention (`mh_adapter`) and after the MLP.
    Houlsby,
    /// `SeqBnConfig` (`seq_bn`): after the MLP only.
    Pfeiffer,
}

impl BottleneckKind {
    /// The library's architecture name.
    pub fn architecture(self) -> &'static str {
        match self {
            BottleneckKind::Houlsby => "double_seq_bn",
            BottleneckKind::Pfeiffer => "seq_bn",
        }
    }
    /// The library's defaults: `swish` for Houlsby, `relu` for Pfeiffer.
    pub fn default_activation(self) -> Activation {
        match self {
            BottleneckKind::Houlsby => Activation::Silu,
            BottleneckKind::Pfeiffer => Activation::Relu,
        }
    }
}

/// The hyperparameters of one bottleneck adapter, under the library's names.
#[derive(Clone, Debug, PartialEq)]
pub struct BottleneckConfig {
    pub kind: BottleneckKind,
    /// The adapter's name (its key segment: `adapters.<name>.`).
    pub name: String,
    /// `reduction_factor`: the bottleneck is `hidden / reduction_factor` (rounded down).
    pub reduction_factor: f64,
    /// `non_linearity`.
    pub non_linearity: Activation,
}

impl BottleneckConfig {
    /// The bottleneck width for a hidden size. Errors: a factor that leaves no unit.
    pub fn bottleneck(&self, hidden: usize) -> Result<usize> {
        let m = (hidden as f64 / self.reduction_factor).floor();
        if m.is_nan() || m < 1.0 {
            return Err(Error::arg(
                "reduction_factor",
                format!(
                    "{} leaves no bottleneck unit for hidden size {hidden}",
                    self.reduction_factor
                ),
            ));
        }
        Ok(m as usize)
    }
}

/// One bottleneck adapter: `adapter_down.0` `[m, d]` + bias `[m]`, `adapter_up` `[d, m]` +
/// bias `[d]`.
#[derive(Clone, Debug)]
pub struct BnAdapter<B: Backend> {
    pub down_w: Tensor<B>,
    pub down_b: Tensor<B>,
    pub up_w: Tensor<B>,
    pub up_b: Tensor<B>,
}

/// The four gradients of a bottleneck adapter, in [`BN_SUFFIXES`] order.
pub type BnGrads<B> = [Tensor<B>; 4];

/// What [`BnAdapter::forward`] keeps: the input and the pre-activation.
pub struct BnSaved<B: Backend> {
    u: Tensor<B>,
    a: Tensor<B>,
    g: Tensor<B>,
}

/// The suffixes of an adapter's tensors, in [`BnAdapter::params`] order.
pub const BN_SUFFIXES: [&str; 4] = [
    "adapter_down.0.weight",
    "adapter_down.0.bias",
    "adapter_up.weight",
    "adapter_up.bias",
];

impl<B: Backend> BnAdapter<B> {
    /// The library's "bert" init: both weights N(0, 0.02), biases zero (our own seeded
    /// generator, not torch's stream).
    pub fn init(be: &B, hidden: usize, bottleneck: usize, seed: u64) -> Result<Self> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize| -> Vec<f32> {
            use rand::RngExt;
            (0..n)
                .map(|_| {
                    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
                    let u2: f64 = rng.random_range(0.0..1.0);
                    (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect()
        };
        let dw = normal(bottleneck * hidden);
        let uw = normal(hidden * bottleneck);
        Ok(BnAdapter {
            down_w: be.upload(&dw, &[bottleneck, hidden])?,
            down_b: be.zeros(&[bottleneck])?,
            up_w: be.upload(&uw, &[hidden, bottleneck])?,
            up_b: be.zeros(&[hidden])?,
        })
    }

    /// Errors: shapes that are not `[m, d]`, `[m]`, `[d, m]`, `[d]` for this hidden size.
    pub fn validate(&self, hidden: usize) -> Result<()> {
        let (m, d) = self.down_w.dims2("adapter_down.0.weight")?;
        if d != hidden {
            return Err(Error::shape(
                "adapter_down.0.weight",
                format!("[bottleneck, {hidden}]"),
                self.down_w.shape(),
            ));
        }
        self.down_b.expect_shape("adapter_down.0.bias", &[m])?;
        self.up_w.expect_shape("adapter_up.weight", &[hidden, m])?;
        self.up_b.expect_shape("adapter_up.bias", &[hidden])
    }

    /// The tensors under the library's names ([`BN_SUFFIXES`]).
    pub fn params(&self) -> [(&'static str, &Tensor<B>); 4] {
        [
            (BN_SUFFIXES[0], &self.down_w),
            (BN_SUFFIXES[1], &self.down_b),
            (BN_SUFFIXES[2], &self.up_w),
            (BN_SUFFIXES[3], &self.up_b),
        ]
    }

    /// Mutable tensors in [`BnAdapter::params`] order.
    pub fn params_mut(&mut self) -> [&mut Tensor<B>; 4] {
        [
            &mut self.down_w,
            &mut self.down_b,
            &mut self.up_w,
            &mut self.up_b,
        ]
    }

    /// `f(u) [T, d]` for u `[T, d]`.
    pub fn forward(
        &self,
        be: &B,
        u: &Tensor<B>,
        act: Activation,
    ) -> Result<(Tensor<B>, BnSaved<B>)> {
        let a = be.linear(u, &self.down_w, Some(&self.down_b))?;
        let g = be.activation(&a, act)?;
        let f = be.linear(&g, &self.up_w, Some(&self.up_b))?;
        Ok((f, BnSaved { u: u.clone(), a, g }))
    }

    /// `du` from `df`, and with `grads` the four parameter gradients in [`BN_SUFFIXES`] order.
    pub fn backward(
        &self,
        be: &B,
        s: &BnSaved<B>,
        df: &Tensor<B>,
        act: Activation,
        grads: bool,
    ) -> Result<(Tensor<B>, Option<BnGrads<B>>)> {
        let dg = be
            .linear_backward_input(df, &self.up_w, None)?
            .ok_or_else(|| Error::arg("dx", "linear_backward_input returned no dx"))?;
        let da = be.activation_backward(&dg, &s.a, act)?;
        let du = be
            .linear_backward_input(&da, &self.down_w, None)?
            .ok_or_else(|| Error::arg("dx", "linear_backward_input returned no dx"))?;
        let g = if grads {
            let mut dwu = be.zeros(self.up_w.shape())?;
            be.linear_backward_weight(df, &s.g, &mut dwu)?;
            let mut dwd = be.zeros(self.down_w.shape())?;
            be.linear_backward_weight(&da, &s.u, &mut dwd)?;
            Some([
                dwd,
                be.sum_product(&da, None, Axis::Cols)?,
                dwu,
                be.sum_product(df, None, Axis::Cols)?,
            ])
        } else {
            None
        };
        Ok((du, g))
    }
}

/// The adapters of one decoder layer.
#[derive(Clone, Debug)]
pub struct BnLayer<B: Backend> {
    /// After attention (`attention_adapters`; Houlsby only).
    pub attention: Option<BnAdapter<B>>,
    /// After the MLP (`output_adapters`).
    pub output: Option<BnAdapter<B>>,
}

/// A trained bottleneck adapter over the whole model.
#[derive(Clone, Debug)]
pub struct Bottleneck<B: Backend> {
    pub config: BottleneckConfig,
    pub layers: Vec<BnLayer<B>>,
}

impl<B: Backend> Bottleneck<B> {
    /// New adapters at the sites of `config.kind` in every one of `n_layers` layers, the
    /// library's init. Errors: a reduction factor that leaves no unit.
    pub fn init(
        be: &B,
        config: BottleneckConfig,
        n_layers: usize,
        hidden: usize,
        seed: u64,
    ) -> Result<Self> {
        let m = config.bottleneck(hidden)?;
        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            let s = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(2 * l as u64);
            layers.push(BnLayer {
                attention: match config.kind {
                    BottleneckKind::Houlsby => Some(BnAdapter::init(be, hidden, m, s)?),
                    BottleneckKind::Pfeiffer => None,
                },
                output: Some(BnAdapter::init(be, hidden, m, s + 1)?),
            });
        }
        Ok(Bottleneck { config, layers })
    }
}

/// The fusion layer of one decoder layer over its frozen adapters.
#[derive(Clone, Debug)]
pub struct FuseLayer<B: Backend> {
    /// The fused adapters' output adapters at this layer, frozen, in fusion order.
    pub adapters: Vec<BnAdapter<B>>,
    pub query_w: Tensor<B>,
    pub query_b: Tensor<B>,
    pub key_w: Tensor<B>,
    pub key_b: Tensor<B>,
    pub value_w: Tensor<B>,
}

/// The suffixes of a fusion layer's tensors (after `adapter_fusion_layer.<a,b>.`), in
/// [`FuseLayer::params`] order.
pub const FUSION_SUFFIXES: [&str; 5] = [
    "query.weight",
    "query.bias",
    "key.weight",
    "key.bias",
    "value.weight",
];

impl<B: Backend> FuseLayer<B> {
    /// The library's init over `adapters`: query and key N(0, 0.02) weights with zero biases,
    /// value the identity plus 1e-6 off the diagonal (our own seeded generator).
    pub fn init(be: &B, adapters: Vec<BnAdapter<B>>, hidden: usize, seed: u64) -> Result<Self> {
        let probe = BnAdapter::init(be, hidden, hidden, seed)?;
        let mut value = vec![1e-6f32; hidden * hidden];
        for i in 0..hidden {
            value[i * hidden + i] = 1.0;
        }
        let key = BnAdapter::init(be, hidden, hidden, seed ^ 0xA5A5)?;
        Ok(FuseLayer {
            adapters,
            query_w: probe.down_w,
            query_b: be.zeros(&[hidden])?,
            key_w: key.down_w,
            key_b: be.zeros(&[hidden])?,
            value_w: be.upload(&value, &[hidden, hidden])?,
        })
    }

    /// The trainable tensors ([`FUSION_SUFFIXES`]).
    pub fn params(&self) -> [(&'static str, &Tensor<B>); 5] {
        [
            (FUSION_SUFFIXES[0], &self.query_w),
            (FUSION_SUFFIXES[1], &self.query_b),
            (FUSION_SUFFIXES[2], &self.key_w),
            (FUSION_SUFFIXES[3], &self.key_b),
            (FUSION_SUFFIXES[4], &self.value_w),
        ]
    }

    /// Mutable tensors in [`FuseLayer::params`] order.
    pub fn params_mut(&mut self) -> [&mut Tensor<B>; 5] {
        [
            &mut self.query_w,
            &mut self.query_b,
            &mut self.key_w,
            &mut self.key_b,
            &mut self.value_w,
        ]
    }
}

/// One fused adapter's forward state, `u_i`, `k_i` and `v_i`.
type FusedOne<B> = (BnSaved<B>, Tensor<B>, Tensor<B>, Tensor<B>);

/// What [`FuseLayer::forward`] keeps.
pub struct FuseSaved<B: Backend> {
    y: Tensor<B>,
    q: Tensor<B>,
    /// Per adapter: its forward state, `u_i`, `k_i`, `v_i`.
    per: Vec<FusedOne<B>>,
    /// Softmax weights `[T, n]`.
    p: Tensor<B>,
}

/// Column `i` of a `[T, n]` matrix as a `[T]` vector.
fn column<B: Backend>(be: &B, m: &Tensor<B>, i: usize) -> Result<Tensor<B>> {
    let (t, n) = (m.dim(0), m.dim(1));
    let flat = m.clone().into_shape(&[t * n, 1])?;
    let idx: Vec<u32> = (0..t).map(|r| (r * n + i) as u32).collect();
    be.gather_rows(&flat, &idx)?.into_shape(&[t])
}

/// Stacks `[T]` vectors as the columns of a `[T, n]` matrix.
fn stack_columns<B: Backend>(be: &B, cols: &[Tensor<B>]) -> Result<Tensor<B>> {
    let n = cols.len();
    let t = cols.first().map_or(0, |c| c.len());
    let mut out = be.zeros(&[t * n, 1])?;
    for (i, c) in cols.iter().enumerate() {
        let idx: Vec<u32> = (0..t).map(|r| (r * n + i) as u32).collect();
        be.scatter_add_rows(&mut out, &idx, &c.clone().into_shape(&[t, 1])?)?;
    }
    out.into_shape(&[t, n])
}

impl<B: Backend> FuseLayer<B> {
    /// `sum_i p_i v_i [T, d]` (the part added to `y`) for `y = x + h` `[T, d]`.
    pub fn forward(
        &self,
        be: &B,
        y: &Tensor<B>,
        acts: &[Activation],
    ) -> Result<(Tensor<B>, FuseSaved<B>)> {
        let q = be.linear(y, &self.query_w, Some(&self.query_b))?;
        let mut per = Vec::with_capacity(self.adapters.len());
        let mut scores = Vec::with_capacity(self.adapters.len());
        for (a, &act) in self.adapters.iter().zip(acts) {
            let (u, s) = a.forward(be, y, act)?;
            let k = be.linear(&u, &self.key_w, Some(&self.key_b))?;
            let v = be.linear(&u, &self.value_w, None)?;
            scores.push(be.sum_product(&q, Some(&k), Axis::Rows)?);
            per.push((s, u, k, v));
        }
        let p = be.softmax_rows(&stack_columns(be, &scores)?)?;
        let mut out = be.zeros(y.shape())?;
        for (i, (_, _, _, v)) in per.iter().enumerate() {
            let pi = column(be, &p, i)?;
            be.axpy(&mut out, 1.0, &be.mul_vector(v, &pi, Axis::Rows)?)?;
        }
        Ok((
            out,
            FuseSaved {
                y: y.clone(),
                q,
                per,
                p,
            },
        ))
    }

    /// From `d_out [T, d]` (the gradient of the fused sum): `dy` through the fusion (the
    /// residual's identity not included) and the five gradients of [`FuseLayer::params`].
    pub fn backward(
        &self,
        be: &B,
        s: &FuseSaved<B>,
        d_out: &Tensor<B>,
        acts: &[Activation],
    ) -> Result<(Tensor<B>, [Tensor<B>; 5])> {
        let d = s.y.dim(1);
        let mut dwq = be.zeros(&[d, d])?;
        let mut dwk = be.zeros(&[d, d])?;
        let mut dwv = be.zeros(&[d, d])?;
        let mut dbk = be.zeros(&[d])?;
        let mut dq = be.zeros(s.q.shape())?;
        let mut dy = be.zeros(s.y.shape())?;
        // d p_i = rowdot(d_out, v_i); d scores = softmax backward.
        let dp: Vec<Tensor<B>> = s
            .per
            .iter()
            .map(|(_, _, _, v)| be.sum_product(d_out, Some(v), Axis::Rows))
            .collect::<Result<_>>()?;
        let ds = be.softmax_rows_backward(&stack_columns(be, &dp)?, &s.p)?;
        for (i, ((a, (bs, u, k, _)), &act)) in
            self.adapters.iter().zip(&s.per).zip(acts).enumerate()
        {
            let pi = column(be, &s.p, i)?;
            let dsi = column(be, &ds, i)?;
            // v_i = u_i Wv^T: dv_i = p_i ⊙ d_out.
            let dv = be.mul_vector(d_out, &pi, Axis::Rows)?;
            be.linear_backward_weight(&dv, u, &mut dwv)?;
            let mut du = be
                .linear_backward_input(&dv, &self.value_w, None)?
                .ok_or_else(|| Error::arg("dx", "no dx"))?;
            // s_i = rowdot(q, k_i): dq += ds_i ⊙ k_i, dk_i = ds_i ⊙ q.
            be.axpy(&mut dq, 1.0, &be.mul_vector(k, &dsi, Axis::Rows)?)?;
            let dk = be.mul_vector(&s.q, &dsi, Axis::Rows)?;
            be.linear_backward_weight(&dk, u, &mut dwk)?;
            be.axpy(&mut dbk, 1.0, &be.sum_product(&dk, None, Axis::Cols)?)?;
            be.linear_backward_input(&dk, &self.key_w, Some(&mut du))?;
            // u_i = f_i(y), the adapter frozen.
            let (dyi, _) = a.backward(be, bs, &du, act, false)?;
            be.axpy(&mut dy, 1.0, &dyi)?;
        }
        be.linear_backward_weight(&dq, &s.y, &mut dwq)?;
        let dbq = be.sum_product(&dq, None, Axis::Cols)?;
        be.linear_backward_input(&dq, &self.query_w, Some(&mut dy))?;
        Ok((dy, [dwq, dbq, dwk, dbk, dwv]))
    }

    /// The library's value regularizer `sum (I - Wv)^2` of this layer (times its weight, 0.01
    /// in the library, by the caller), on the device: the per-row sums of `(Wv - I)^2` `[d]`
    /// (summed to the scalar by the caller, so that a step reads nothing back) and the gradient
    /// `2 (Wv - I)`. `eye` is the identity `[d, d]`. Errors: `eye` of another shape.
    pub fn value_reg(&self, be: &B, eye: &Tensor<B>) -> Result<(Tensor<B>, Tensor<B>)> {
        let mut g = self.value_w.clone();
        be.axpy(&mut g, -1.0, eye)?;
        let rows = be.sum_product(&g, Some(&g), Axis::Rows)?;
        be.scale(&mut g, 2.0)?;
        Ok((rows, g))
    }
}

/// AdapterFusion over already-trained Pfeiffer adapters, which stay frozen.
#[derive(Clone, Debug)]
pub struct AdapterFusion<B: Backend> {
    /// The fused adapters' configs, in fusion order.
    pub adapters: Vec<BottleneckConfig>,
    /// One fusion layer per decoder layer.
    pub layers: Vec<FuseLayer<B>>,
    /// The value regularizer's weight (the library's 0.01).
    pub reg_weight: f32,
}

impl<B: Backend> AdapterFusion<B> {
    /// The fusion's name as the library writes it (`a,b`).
    pub fn name(&self) -> String {
        self.adapters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Each fused adapter's non-linearity, in fusion order.
    pub fn activations(&self) -> Vec<Activation> {
        self.adapters.iter().map(|c| c.non_linearity).collect()
    }
}
