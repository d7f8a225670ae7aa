//! Argument checks shared by every backend, so that each kernel's contract (shapes, ranges) is
//! enforced in one place and every backend returns the same error for the same bad input.

use super::lowrank::{Base, GradWants, LowRank};
use super::{
    AdaLoraIpt, AdamWParams, AttentionSaved, Axis, Kernels as Backend, SeqSpan, Tensor, same_shape,
};
use crate::error::{Error, Result};
use crate::quant::nf4::Nf4Tensor;

mod multi;
pub use multi::{adapter_indices, linear_multi, lowrank_pool};

/// Checks that `n` host values fill `shape`.
pub fn upload(n: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if n != want {
        return Err(Error::arg(
            "data",
            format!("{n} values for shape {shape:?} ({want} elements)"),
        ));
    }
    Ok(())
}

/// Checks a scatter-add of `src [idx.len(), d]` into `dst [n, d]` (every index first, so
/// nothing is written when one is bad).
pub fn scatter_add_rows<B: Backend>(dst: &Tensor<B>, idx: &[u32], src: &Tensor<B>) -> Result<()> {
    let (n, d) = dst.dims2("dst")?;
    src.expect_shape("src", &[idx.len(), d])?;
    row_indices(idx, n)
}

/// Checks an NF4 tensor to be uploaded as a linear weight: 2-D `[out, in]`.
pub fn nf4_weight(w: &Nf4Tensor) -> Result<()> {
    match w.shape() {
        [_, _] => Ok(()),
        s => Err(Error::shape("nf4 weight", "2-D [out, in]", s)),
    }
}

/// A base weight's name in errors.
fn base_name<B: Backend>(base: Base<'_, B>) -> &'static str {
    match base {
        Base::Dense(_) => "w",
        Base::Nf4(_) => "nf4 weight",
        Base::Bf16(_) => "bf16 weight",
    }
}

/// Checks a base weight (2-D for a dense one) and returns `(out, in)`.
pub fn base<B: Backend>(base: Base<'_, B>) -> Result<(usize, usize)> {
    match base {
        Base::Dense(w) => w.dims2("w"),
        Base::Nf4(w) => Ok(w.dims()),
        Base::Bf16(w) => Ok(w.dims()),
    }
}

/// Checks a bf16 weight upload: `shape` is `[out, in]` and `len` its element count.
pub fn bf16_weight(len: usize, shape: &[usize]) -> Result<(usize, usize)> {
    let [out, in_] = shape[..] else {
        return Err(Error::shape("bf16 weight", "2-D [out, in]", shape));
    };
    upload(len, shape)?;
    Ok((out, in_))
}

/// The names a term's tensors go by in errors: PEFT's for the method the term describes.
struct TermNames {
    a: &'static str,
    b: &'static str,
    rank_scale: &'static str,
    out_scale: &'static str,
}

fn names<B: Backend>(term: &LowRank<'_, B>) -> TermNames {
    if term.shared {
        TermNames {
            a: "vera_A",
            b: "vera_B",
            rank_scale: "vera_lambda_d",
            out_scale: "vera_lambda_b",
        }
    } else {
        TermNames {
            a: "lora_A",
            b: "lora_B",
            rank_scale: "lora_E",
            out_scale: "out_scale",
        }
    }
}

/// Checks a low-rank term against a base `[dout, din]` and returns r: `lora_a [r >= 1, din]`
/// and `lora_b [dout, r]` (a shared term: `[r, >= din]`, `[>= dout, r]`), `rank_scale` with r
/// values (`[r]` or `[r, 1]`), `out_scale [dout]`, the column scale's magnitude and norm
/// `[dout]`, a finite `scale`.
pub fn lowrank_term<B: Backend>(din: usize, dout: usize, term: &LowRank<'_, B>) -> Result<usize> {
    let nm = names(term);
    let (r, ain) = term.lora_a.dims2(nm.a)?;
    if r == 0 {
        return Err(Error::arg("r", "the rank must be at least 1"));
    }
    let a_ok = if term.shared { ain >= din } else { ain == din };
    if !a_ok {
        let want = if term.shared {
            format!("[r, >= {din}]")
        } else {
            format!("[r, {din}]")
        };
        return Err(Error::shape(nm.a, want, term.lora_a.shape()));
    }
    let (bout, br) = term.lora_b.dims2(nm.b)?;
    let b_ok = br == r
        && if term.shared {
            bout >= dout
        } else {
            bout == dout
        };
    if !b_ok {
        let want = if term.shared {
            format!("[>= {dout}, {r}]")
        } else {
            format!("[{dout}, {r}]")
        };
        return Err(Error::shape(nm.b, want, term.lora_b.shape()));
    }
    if !term.scale.is_finite() {
        return Err(Error::arg(
            "scaling",
            format!("must be finite, got {}", term.scale),
        ));
    }
    if let Some(rs) = term.rank_scale {
        let ok = matches!(rs.shape(), [n] if *n == r) || matches!(rs.shape(), [n, 1] if *n == r);
        if !ok {
            return Err(Error::shape(
                nm.rank_scale,
                format!("[{r}] or [{r}, 1]"),
                rs.shape(),
            ));
        }
    }
    if let Some(os) = term.out_scale {
        os.expect_shape(nm.out_scale, &[dout])?;
    }
    if let Some(c) = &term.col_scale {
        c.magnitude.expect_shape("lora_magnitude_vector", &[dout])?;
        if let Some(n) = c.weight_norm {
            n.expect_shape("weight_norm", &[dout])?;
        }
    }
    Ok(r)
}

fn need_norm<B: Backend>(term: &LowRank<'_, B>) -> Result<()> {
    match &term.col_scale {
        Some(c) if c.weight_norm.is_none() => Err(Error::arg(
            "weight_norm",
            "a column scale (DoRA) needs its weight norm here; the *_with_norm ops compute it",
        )),
        _ => Ok(()),
    }
}

/// Checks that `term` has a column scale whose norm is still to be computed.
pub fn col_norm_wanted<B: Backend>(term: &LowRank<'_, B>) -> Result<()> {
    match &term.col_scale {
        Some(c) if c.weight_norm.is_none() => Ok(()),
        Some(_) => Err(Error::arg(
            "weight_norm",
            "this op computes the weight norm: pass the column scale without one",
        )),
        None => Err(Error::arg(
            "col_scale",
            "this op computes a column scale's weight norm but the term has none",
        )),
    }
}

/// Checks a fused forward: `x [T, in]` against the base `[out, in]`, `bias [out]`, the term;
/// with `norm_given`, a column scale must carry its weight norm. Returns `(T, in, out)`.
pub fn linear_lowrank<B: Backend>(
    x: &Tensor<B>,
    base: Base<'_, B>,
    bias: Option<&Tensor<B>>,
    term: Option<&LowRank<'_, B>>,
    norm_given: bool,
) -> Result<(usize, usize, usize)> {
    let (t, din) = x.dims2("x")?;
    let (dout, win) = self::base(base)?;
    if win != din {
        let name = base_name(base);
        return Err(Error::shape(name, format!("[out, {din}]"), &[dout, win]));
    }
    if let Some(b) = bias {
        b.expect_shape("bias", &[dout])?;
    }
    if let Some(term) = term {
        lowrank_term(din, dout, term)?;
        if norm_given {
            need_norm(term)?;
        }
    }
    Ok((t, din, dout))
}

/// Checks `dy [T, out]` against the base (and term) of an input gradient, and `acc [T, in]`.
pub fn backward_input<B: Backend>(
    dy: &Tensor<B>,
    base: Base<'_, B>,
    term: Option<&LowRank<'_, B>>,
    acc: Option<&Tensor<B>>,
) -> Result<(usize, usize, usize)> {
    let (t, dout) = dy.dims2("dy")?;
    let (wout, din) = self::base(base)?;
    if wout != dout {
        let name = base_name(base);
        return Err(Error::shape(name, format!("[{dout}, in]"), &[wout, din]));
    }
    if let Some(term) = term {
        lowrank_term(din, dout, term)?;
        need_norm(term)?;
    }
    if let Some(a) = acc {
        a.expect_shape("dx", &[t, din])?;
    }
    Ok((t, dout, din))
}

/// Checks a fused backward: `dy [T, out]`, `x [T, in]`, `h [T, r]`, `z [T, out]` (present
/// exactly when the term has a column scale), and that `wants` asks only for parts the term
/// has.
#[allow(clippy::too_many_arguments)]
pub fn linear_lowrank_backward<B: Backend>(
    dy: &Tensor<B>,
    x: &Tensor<B>,
    h: &Tensor<B>,
    z: Option<&Tensor<B>>,
    base: Base<'_, B>,
    term: &LowRank<'_, B>,
    wants: GradWants,
) -> Result<()> {
    let (t, din, dout) = linear_lowrank(x, base, None, Some(term), true)?;
    dy.expect_shape("dy", &[t, dout])?;
    let r = term.r();
    h.expect_shape("h", &[t, r])?;
    match (z, &term.col_scale) {
        (Some(z), Some(_)) => z.expect_shape("z", &[t, dout])?,
        (None, None) => {}
        (None, Some(_)) => return Err(Error::arg("z", "a column scale's backward needs z")),
        (Some(_), None) => {
            return Err(Error::arg(
                "z",
                "z belongs to a column scale, which this term lacks",
            ));
        }
    }
    let lacks = |what: &str| {
        Err(Error::arg(
            "wants",
            format!("a gradient of {what}, which the term lacks"),
        ))
    };
    if wants.rank_scale && term.rank_scale.is_none() {
        return lacks("a per-rank scale");
    }
    if wants.out_scale && term.out_scale.is_none() {
        return lacks("a per-output scale");
    }
    if wants.magnitude && term.col_scale.is_none() {
        return lacks("a column scale's magnitude");
    }
    let _ = din;
    Ok(())
}

/// Checks a merge into `w [out, in]`: the term, a column scale with its norm, `sign` ±1.
pub fn lowrank_merge<B: Backend>(w: &Tensor<B>, term: &LowRank<'_, B>, sign: f32) -> Result<()> {
    let (dout, din) = w.dims2("w")?;
    lowrank_term(din, dout, term)?;
    if sign != 1.0 && sign != -1.0 {
        return Err(Error::arg(
            "sign",
            format!("must be 1 (merge) or -1 (unmerge), got {sign}"),
        ));
    }
    if sign == -1.0 {
        need_norm(term)?;
    }
    Ok(())
}

/// Checks a weight gradient: `dy [T, out]`, `x [T, in]`, `dw [out, in]`.
pub fn linear_backward_weight<B: Backend>(
    dy: &Tensor<B>,
    x: &Tensor<B>,
    dw: &Tensor<B>,
) -> Result<()> {
    let (t, dout) = dy.dims2("dy")?;
    let (tx, din) = x.dims2("x")?;
    if tx != t {
        return Err(Error::shape("x", format!("[{t}, in]"), x.shape()));
    }
    dw.expect_shape("dw", &[dout, din])
}

/// Checks an RMSNorm: `x [T, d]`, `weight [d]`; returns `(T, d)`.
pub fn rmsnorm<B: Backend>(x: &Tensor<B>, weight: &Tensor<B>) -> Result<(usize, usize)> {
    let (t, d) = x.dims2("x")?;
    weight.expect_shape("weight", &[d])?;
    Ok((t, d))
}

/// Checks SwiGLU's `gate` and `up` (and the backward's `d`), all one shape.
pub fn swiglu<B: Backend>(gate: &Tensor<B>, up: &Tensor<B>, d: Option<&Tensor<B>>) -> Result<()> {
    same_shape("up", up, gate)?;
    if let Some(d) = d {
        same_shape("d", d, gate)?;
    }
    Ok(())
}

/// Checks `x [T, in]` against `w [out, in]`, returning `(T, in, out)`.
pub fn linear<B: Backend>(x: &Tensor<B>, w: &Tensor<B>) -> Result<(usize, usize, usize)> {
    let (t, din) = x.dims2("x")?;
    let (dout, win) = w.dims2("w")?;
    if win != din {
        return Err(Error::shape("w", format!("[out, {din}]"), w.shape()));
    }
    Ok((t, din, dout))
}

/// Checks `x [T, in]` against a quantized weight of logical shape `[out, in]`, returning
/// `(T, in, out)`.
pub fn linear_dims<B: Backend>(
    x: &Tensor<B>,
    (out, in_): (usize, usize),
) -> Result<(usize, usize, usize)> {
    let (t, din) = x.dims2("x")?;
    if din != in_ {
        return Err(Error::shape(
            "nf4 weight",
            format!("[out, {din}]"),
            &[out, in_],
        ));
    }
    Ok((t, din, out))
}

/// Checks LoRA factor shapes against a base `[dout, din]`; returns r. Errors: r = 0 or
/// mismatched factor shapes.
pub fn lora<B: Backend>(din: usize, dout: usize, a: &Tensor<B>, b: &Tensor<B>) -> Result<usize> {
    let (r, ain) = a.dims2("lora_A")?;
    if r == 0 {
        return Err(Error::arg("r", "LoRA rank must be at least 1"));
    }
    if ain != din {
        return Err(Error::shape("lora_A", format!("[r, {din}]"), a.shape()));
    }
    b.expect_shape("lora_B", &[dout, r])?;
    Ok(r)
}

/// Checks a vector `[n]` named `name`.
pub fn vector<B: Backend>(name: &str, v: &Tensor<B>, n: usize) -> Result<()> {
    v.expect_shape(name, &[n])
}

/// Checks x `[T, in]`, A `[r, in]`, B `[out, r]` and `name` `[T, out]`; returns `(T, in, out, r)`.
pub fn adapter<B: Backend>(
    x: &Tensor<B>,
    a: &Tensor<B>,
    b: &Tensor<B>,
    name: &str,
    y: &Tensor<B>,
) -> Result<(usize, usize, usize, usize)> {
    let (t, din) = x.dims2("x")?;
    let (dout, _) = b.dims2("lora_B")?;
    let r = lora(din, dout, a, b)?;
    y.expect_shape(name, &[t, dout])?;
    Ok((t, din, dout, r))
}

/// Checks DoRA's `lora_magnitude_vector` and `weight_norm`, both `[out]`.
pub fn dora_vectors<B: Backend>(m: &Tensor<B>, n: &Tensor<B>, dout: usize) -> Result<()> {
    m.expect_shape("lora_magnitude_vector", &[dout])?;
    n.expect_shape("weight_norm", &[dout])
}

/// Checks VeRA's shared projections `vera_A [r, max_in]`, `vera_B [max_out, r]` and lambdas
/// against a base `[dout, din]`; returns `(r, max_in)`.
pub fn vera<B: Backend>(
    din: usize,
    dout: usize,
    vera_a: &Tensor<B>,
    vera_b: &Tensor<B>,
    lambda_d: &Tensor<B>,
    lambda_b: &Tensor<B>,
) -> Result<(usize, usize)> {
    let (r, max_in) = vera_a.dims2("vera_A")?;
    if r == 0 || max_in < din {
        return Err(Error::shape(
            "vera_A",
            format!("[r >= 1, max_in >= {din}]"),
            vera_a.shape(),
        ));
    }
    let (max_out, br) = vera_b.dims2("vera_B")?;
    if br != r || max_out < dout {
        return Err(Error::shape(
            "vera_B",
            format!("[max_out >= {dout}, {r}]"),
            vera_b.shape(),
        ));
    }
    vector("vera_lambda_d", lambda_d, r)?;
    vector("vera_lambda_b", lambda_b, dout)?;
    Ok((r, max_in))
}

/// PEFT's AdaLoRA factor `scaling / (ranknum + 1e-5)`, in f32. Errors: ranknum not positive.
pub fn adalora_factor(scaling: f32, ranknum: f32) -> Result<f32> {
    if !(ranknum.is_finite() && ranknum > 0.0) {
        return Err(Error::arg(
            "ranknum",
            format!("must be a positive number (init_r), got {ranknum}"),
        ));
    }
    Ok(scaling / (ranknum + 1e-5))
}

/// Checks AdaLoRA factors `A [r, in]`, `B [out, r]`, `E [r, 1]`; returns r.
pub fn adalora<B: Backend>(
    din: usize,
    dout: usize,
    a: &Tensor<B>,
    b: &Tensor<B>,
    e: &Tensor<B>,
) -> Result<usize> {
    let r = lora(din, dout, a, b)?;
    e.expect_shape("lora_E", &[r, 1])?;
    Ok(r)
}

/// Checks one AdaLoRA EMA update (grad and both EMAs shaped like the parameter) and returns
/// the f32 coefficients of `beta1`, `beta2`. Errors: shapes, a beta outside (0, 1).
pub(crate) fn adalora_update_ipt<B: Backend>(
    param: &Tensor<B>,
    grad: &Tensor<B>,
    ipt: &Tensor<B>,
    unc: &Tensor<B>,
    beta1: f64,
    beta2: f64,
) -> Result<EmaCoefs> {
    same_shape("grad", grad, param)?;
    same_shape("exp_avg_ipt", ipt, param)?;
    same_shape("exp_avg_unc", unc, param)?;
    EmaCoefs::new(beta1, beta2)
}

/// Checks that `v` is 1-D `[n]` and that `offset..offset + r` lies in it; returns n.
fn range<B: Backend>(name: &str, v: &Tensor<B>, offset: usize, r: usize) -> Result<usize> {
    let n = match v.shape() {
        [n] => *n,
        _ => return Err(Error::shape(name, "1-D [n]", v.shape())),
    };
    if offset.checked_add(r).is_none_or(|end| end > n) {
        return Err(Error::arg(
            "offset",
            format!("ranks {offset}..{offset}+{r} outside `{name}` of {n} entries"),
        ));
    }
    Ok(n)
}

/// Checks a layer's AdaLoRA EMAs (`[r, in]`, `[out, r]`, `[r, 1]`, each pair alike, r >= 1)
/// and the range `offset..offset + r` of `scores [n]`; returns `(r, in, out)`.
pub fn adalora_triplet_scores<B: Backend>(
    ema: &AdaLoraIpt<B>,
    scores: &Tensor<B>,
    offset: usize,
) -> Result<(usize, usize, usize)> {
    let (r, din) = ema.ipt_a.dims2("exp_avg_ipt[lora_A]")?;
    if r == 0 {
        return Err(Error::arg("r", "AdaLoRA rank must be at least 1"));
    }
    let (dout, _) = ema.ipt_b.dims2("exp_avg_ipt[lora_B]")?;
    ema.unc_a.expect_shape("exp_avg_unc[lora_A]", &[r, din])?;
    ema.ipt_b.expect_shape("exp_avg_ipt[lora_B]", &[dout, r])?;
    ema.unc_b.expect_shape("exp_avg_unc[lora_B]", &[dout, r])?;
    ema.ipt_e.expect_shape("exp_avg_ipt[lora_E]", &[r, 1])?;
    ema.unc_e.expect_shape("exp_avg_unc[lora_E]", &[r, 1])?;
    range("scores", scores, offset, r)?;
    Ok((r, din, dout))
}

/// Checks `scores [n]` and a 1-based `k` in `1..=n` (torch.kthvalue); returns n.
pub fn adalora_threshold<B: Backend>(scores: &Tensor<B>, k: usize) -> Result<usize> {
    let n = range("scores", scores, 0, 0)?;
    if k == 0 || k > n {
        return Err(Error::arg(
            "k",
            format!("kthvalue k = {k} outside 1..={n} (PEFT: k = init_bgt - budget)"),
        ));
    }
    Ok(n)
}

/// Checks `scores [n]` and `threshold [1]`; returns n.
pub fn adalora_rank_mask<B: Backend>(scores: &Tensor<B>, threshold: &Tensor<B>) -> Result<usize> {
    threshold.expect_shape("threshold", &[1])?;
    range("scores", scores, 0, 0)
}

/// Checks `lora_E [r, 1]` and the range `offset..offset + r` of `keep [n]`; returns r.
pub fn adalora_apply_mask<B: Backend>(
    lora_e: &Tensor<B>,
    keep: &Tensor<B>,
    offset: usize,
) -> Result<usize> {
    let r = match lora_e.shape() {
        [r, 1] => *r,
        _ => return Err(Error::shape("lora_E", "[r, 1]", lora_e.shape())),
    };
    range("keep", keep, offset, r)?;
    Ok(r)
}

/// Checks the orthogonal regularizer's inputs: as many gradient pairs as factor pairs, each
/// `lora_A [r, in]` (r >= 1) with `lora_B [out, r]`, gradients shaped like their factors, and
/// a weight that is finite and >= 0 (PEFT raises for < 0). Returns `(r, in, out)` per layer.
pub fn adalora_orth_reg<B: Backend>(
    factors: &[(&Tensor<B>, &Tensor<B>)],
    grads: &[(&mut Tensor<B>, &mut Tensor<B>)],
    orth_reg_weight: f32,
) -> Result<Vec<(usize, usize, usize)>> {
    if !(orth_reg_weight >= 0.0 && orth_reg_weight.is_finite()) {
        return Err(Error::arg(
            "orth_reg_weight",
            format!("must be finite and >= 0, got {orth_reg_weight}"),
        ));
    }
    if grads.len() != factors.len() {
        return Err(Error::arg(
            "grads",
            format!(
                "{} gradient pairs for {} layers",
                grads.len(),
                factors.len()
            ),
        ));
    }
    factors
        .iter()
        .zip(grads)
        .map(|(&(a, b), (ga, gb))| {
            let (_, din) = a.dims2("lora_A")?;
            let (dout, _) = b.dims2("lora_B")?;
            let r = lora(din, dout, a, b)?;
            same_shape("grad_A", ga, a)?;
            same_shape("grad_B", gb, b)?;
            Ok((r, din, dout))
        })
        .collect()
}

/// Shape checks shared by attention forward and backward; returns `(T, head_dim, group)`.
pub fn attention<B: Backend>(
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
) -> Result<(usize, usize, usize)> {
    let (t, qw) = q.dims2("q")?;
    if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || qw % n_heads != 0 {
        return Err(Error::arg(
            "n_heads",
            format!("{n_heads} query heads, {n_kv_heads} kv heads for q width {qw}"),
        ));
    }
    let hd = qw / n_heads;
    k.expect_shape("k", &[t, n_kv_heads * hd])?;
    v.expect_shape("v", &[t, n_kv_heads * hd])?;
    for s in seqs {
        if s.start + s.len > t {
            return Err(Error::arg(
                "seqs",
                format!("span {}..{} beyond {t} rows", s.start, s.start + s.len),
            ));
        }
    }
    Ok((t, hd, n_heads / n_kv_heads))
}

/// Checks the inputs of an RMSNorm backward: `dy` and `x [T, d]`, `weight [d]`, `rstd [T]`.
/// Returns `(T, d)`.
pub fn rmsnorm_backward<B: Backend>(
    dy: &Tensor<B>,
    x: &Tensor<B>,
    weight: &Tensor<B>,
    rstd: &Tensor<B>,
) -> Result<(usize, usize)> {
    let (t, d) = x.dims2("x")?;
    dy.expect_shape("dy", &[t, d])?;
    weight.expect_shape("weight", &[d])?;
    rstd.expect_shape("rstd", &[t])?;
    Ok((t, d))
}

/// Checks `dy [T, out]` against a quantized weight of logical shape `[out, in]` (the input
/// of `dx = dy W`), returning `(T, out, in)`.
pub fn backward_input_dims<B: Backend>(
    dy: &Tensor<B>,
    (out, in_): (usize, usize),
) -> Result<(usize, usize, usize)> {
    let (t, dout) = dy.dims2("dy")?;
    if dout != out {
        return Err(Error::shape(
            "nf4 weight",
            format!("[{dout}, in]"),
            &[out, in_],
        ));
    }
    Ok((t, dout, in_))
}

/// Checks cross-entropy labels against `logits [n, vocab]`: one per row, each negative
/// (ignored) or `< vocab`.
pub fn labels(labels: &[i32], n: usize, vocab: usize) -> Result<()> {
    if labels.len() != n {
        return Err(Error::arg(
            "labels",
            format!("{} labels for {n} logit rows", labels.len()),
        ));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= 0 && l as usize >= vocab) {
        return Err(Error::arg(
            "labels",
            format!("label {bad} out of range for vocab {vocab}"),
        ));
    }
    Ok(())
}

/// Checks row indices against a table of `n` rows.
pub fn row_indices(idx: &[u32], n: usize) -> Result<()> {
    match idx.iter().find(|&&i| i as usize >= n) {
        Some(&i) => Err(Error::arg(
            "idx",
            format!("row index {i} out of range 0..{n}"),
        )),
        None => Ok(()),
    }
}

/// Checks rotary-embedding arguments for `x [T, width]`.
pub fn rope(width: usize, t: usize, positions: &[u32], head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !width.is_multiple_of(head_dim) {
        return Err(Error::arg(
            "head_dim",
            format!("{head_dim} must be even and divide the row width {width}"),
        ));
    }
    if positions.len() != t {
        return Err(Error::arg(
            "positions",
            format!("{} positions for {t} rows", positions.len()),
        ));
    }
    Ok(())
}

/// The per-step constants of torch's single-tensor AdamW, computed once on the host in the
/// same precision by every backend: `step_size = lr / (1 - beta1^t)`,
/// `bc2_sqrt = sqrt(1 - beta2^t)` (f64, then f32) and the decoupled decay `1 - lr * wd`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWFactors {
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub decay: f32,
}

/// Checks one AdamW update (grad and both moments shaped like the parameter, a 1-based step)
/// and returns its [`AdamWFactors`].
pub fn adamw<B: Backend>(
    param: &Tensor<B>,
    grad: &Tensor<B>,
    m: &Tensor<B>,
    v: &Tensor<B>,
    p: &AdamWParams,
) -> Result<AdamWFactors> {
    same_shape("grad", grad, param)?;
    same_shape("exp_avg", m, param)?;
    same_shape("exp_avg_sq", v, param)?;
    if p.step == 0 {
        return Err(Error::arg("step", "AdamW steps are 1-based"));
    }
    let bc1 = 1.0 - (p.beta1 as f64).powi(p.step as i32);
    let bc2 = 1.0 - (p.beta2 as f64).powi(p.step as i32);
    Ok(AdamWFactors {
        step_size: (p.lr as f64 / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        decay: 1.0 - p.lr * p.weight_decay,
    })
}

/// Checks the inputs of an attention backward: `d_out` and `saved.out` shaped like q,
/// `saved.lse [n_heads, T]`, and everything [`attention`] checks. Returns `(T, head_dim, group)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<B: Backend>(
    d_out: &Tensor<B>,
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    saved: &AttentionSaved<B>,
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
) -> Result<(usize, usize, usize)> {
    let dims = attention(q, k, v, seqs, n_heads, n_kv_heads)?;
    d_out.expect_shape("d_out", q.shape())?;
    saved.out.expect_shape("saved.out", q.shape())?;
    saved.lse.expect_shape("saved.lse", &[n_heads, dims.0])?;
    Ok(dims)
}

/// Torch multiplies an f32 tensor by a Python float as f32, with `1 - beta` computed in f64.
#[derive(Clone, Copy, Debug)]
pub struct EmaCoefs {
    pub b1: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
}

impl EmaCoefs {
    /// The f32 coefficients of `beta1`, `beta2` (each in the open interval (0, 1), which PEFT
    /// asserts). Errors: a beta outside it, named.
    pub fn new(beta1: f64, beta2: f64) -> Result<Self> {
        for (name, b) in [("beta1", beta1), ("beta2", beta2)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(Error::arg(name, format!("must be in (0, 1), got {b}")));
            }
        }
        Ok(EmaCoefs {
            b1: beta1 as f32,
            one_minus_b1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            one_minus_b2: (1.0 - beta2) as f32,
        })
    }
}

/// Checks an attention over cached context: q `[Tq, Hq*hd]`, k and v `[Tk, Hkv*hd]`, one kv
/// span per q span, each inside its tensor and with `q.len <= kv.len` (and `kv.len > 0` when
/// there are queries). Returns `(Tq, head_dim, group)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached<B: Backend>(
    q: &Tensor<B>,
    k: &Tensor<B>,
    v: &Tensor<B>,
    q_seqs: &[SeqSpan],
    kv_seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
) -> Result<(usize, usize, usize)> {
    let (tq, qw) = q.dims2("q")?;
    if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || qw % n_heads != 0 {
        return Err(Error::arg(
            "n_heads",
            format!("{n_heads} query heads, {n_kv_heads} kv heads for q width {qw}"),
        ));
    }
    let hd = qw / n_heads;
    let (tk, kw) = k.dims2("k")?;
    if kw != n_kv_heads * hd {
        return Err(Error::shape(
            "k",
            format!("[Tk, {}]", n_kv_heads * hd),
            k.shape(),
        ));
    }
    v.expect_shape("v", &[tk, kw])?;
    if q_seqs.len() != kv_seqs.len() {
        return Err(Error::arg(
            "kv_seqs",
            format!(
                "{} kv spans for {} query spans",
                kv_seqs.len(),
                q_seqs.len()
            ),
        ));
    }
    for (i, (qs, ks)) in q_seqs.iter().zip(kv_seqs).enumerate() {
        if qs.start + qs.len > tq || ks.start + ks.len > tk {
            return Err(Error::arg(
                "seqs",
                format!("sequence {i}: span outside q ({tq} rows) or k ({tk} rows)"),
            ));
        }
        if qs.len > ks.len {
            return Err(Error::arg(
                "kv_seqs",
                format!(
                    "sequence {i}: {} new tokens but a context of {}",
                    qs.len, ks.len
                ),
            ));
        }
    }
    Ok((tq, hd, n_heads / n_kv_heads))
}

/// [`Backend::mul_vector`](crate::backend::Backend::mul_vector): x 2-D, v `[d]` (columns) or `[n]` (rows). Returns `(n, d)`.
pub fn axis_vector<B: Backend>(x: &Tensor<B>, v: &Tensor<B>, axis: Axis) -> Result<(usize, usize)> {
    let (n, d) = x.dims2("x")?;
    let want = match axis {
        Axis::Cols => d,
        Axis::Rows => n,
    };
    v.expect_shape("v", &[want])?;
    Ok((n, d))
}

/// [`Backend::softmax_rows`](crate::backend::Backend::softmax_rows): x 2-D with at least one column. Returns `(n, k)`.
pub fn softmax_rows<B: Backend>(x: &Tensor<B>) -> Result<(usize, usize)> {
    let (n, k) = x.dims2("x")?;
    if k == 0 {
        return Err(Error::shape("x", "[n, k] with k >= 1", x.shape()));
    }
    Ok((n, k))
}
