//! lorafuse's candle layers against candle's own composition of the same math (issue: layers
//! for candle): forward, the gradients candle's autograd gets from the fused op's `bwd`, a few
//! AdamW steps, and PEFT folders saved and loaded from candle.
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use common::candle::{max_abs, max_abs_diff};
use lorafuse::adapter::LoraConfig;
use lorafuse::candle::{
    AdaLoraLinear, AdaptedLinear, DoraLinear, FrozenLinear, LoraLinear, VeraLinear,
    VeraProjections, load_peft, save_peft,
};
use lorafuse::io::peft::{AdaLoraOptions, MethodOptions};

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
    // A seeded uniform stream mapped to [-sqrt(3) std, sqrt(3) std] (variance std^2), so
    // every run sees the same values.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            ((2.0 * u - 1.0) * 3f64.sqrt() * std) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

/// `|a - b| <= tol * max(1, max|b|)`, naming `what`.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_abs_diff(a, b);
    let scale = max_abs(b).max(1.0);
    assert!(
        d <= tol * scale,
        "{what}: max |diff| {d} > {tol} * {scale} (shapes {:?})",
        a.dims()
    );
}

/// Sets a VarMap variable (by full name) to `t`.
fn set_var(vm: &VarMap, name: &str, t: &Tensor) {
    let data = vm.data().lock().unwrap();
    let v = data
        .get(name)
        .unwrap_or_else(|| panic!("no var {name}; have {:?}", data.keys().collect::<Vec<_>>()));
    v.set(t).unwrap();
}

fn var(vm: &VarMap, name: &str) -> Tensor {
    vm.data().lock().unwrap()[name].as_tensor().copy().unwrap()
}

const IN: usize = 37;
const OUT: usize = 29;
const R: usize = 5;

fn base(bias: bool) -> candle_nn::Linear {
    let w = randn(&[OUT, IN], 0.2, 1);
    let b = bias.then(|| randn(&[OUT], 0.1, 2));
    candle_nn::Linear::new(w, b)
}

/// `x [2, 3, in]` as a Var (so dx is taken) and the upstream gradient `g [2, 3, out]`.
fn inputs() -> (Var, Tensor) {
    (
        Var::from_tensor(&randn(&[2, 3, IN], 1.0, 3)).unwrap(),
        randn(&[2, 3, OUT], 1.0, 4),
    )
}

/// `x W^T + b` in candle ops, x `[..., in]`.
fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    match b {
        Some(b) => y.broadcast_add(b).unwrap(),
        None => y,
    }
}

/// Runs `ours` and `theirs` (the same function of the same parameter values), compares y and
/// the gradients of `sum(y ⊙ g)` with respect to x and each parameter pair.
fn check_grads(
    what: &str,
    ours: &dyn Fn(&Tensor) -> Tensor,
    our_params: &[Tensor],
    theirs: &dyn Fn(&Tensor) -> Tensor,
    their_params: &[Tensor],
    tol: f32,
) {
    let (x, g) = inputs();
    let x2 = Var::from_tensor(&x.as_tensor().copy().unwrap()).unwrap();
    let y = ours(x.as_tensor());
    let y_ref = theirs(x2.as_tensor());
    assert_close(&format!("{what} y"), &y, &y_ref, tol);
    let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let gs_ref = (&y_ref * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx = gs.get(x.as_tensor()).expect("our dx");
    let dx_ref = gs_ref.get(x2.as_tensor()).expect("reference dx");
    assert_close(&format!("{what} dx"), dx, dx_ref, tol);
    assert!(max_abs(dx) > 0.0, "{what}: dx is zero");
    for (i, (p, q)) in our_params.iter().zip(their_params).enumerate() {
        let dp = gs
            .get(p)
            .unwrap_or_else(|| panic!("{what}: no gradient of param {i}"));
        let dq = gs_ref.get(q).expect("reference grad");
        assert_close(&format!("{what} d param {i}"), dp, dq, tol);
        assert!(max_abs(dp) > 0.0, "{what}: gradient of param {i} is zero");
    }
}

fn lora_cfg(rslora: bool) -> LoraConfig {
    LoraConfig {
        r: R,
        lora_alpha: 7.0,
        use_rslora: rslora,
        ..Default::default()
    }
}

/// A LoRA layer with non-zero random factors, and reference Vars of the same values.
fn lora_layer(base: FrozenLinear, rslora: bool) -> (VarMap, LoraLinear, Var, Var) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let l = LoraLinear::new(base, &lora_cfg(rslora), vb.pp("q")).unwrap();
    set_var(&vm, "q.lora_B.weight", &randn(&[OUT, R], 0.3, 5));
    let a = Var::from_tensor(&var(&vm, "q.lora_A.weight")).unwrap();
    let b = Var::from_tensor(&var(&vm, "q.lora_B.weight")).unwrap();
    (vm, l, a, b)
}

/// `x W^T + b + s (x A^T) B^T` in candle ops.
fn lora_ref(
    x: &Tensor,
    (w, bias): (&Tensor, Option<&Tensor>),
    a: &Tensor,
    b: &Tensor,
    s: f64,
) -> Tensor {
    let lo = x
        .broadcast_matmul(&a.t().unwrap())
        .unwrap()
        .broadcast_matmul(&b.t().unwrap())
        .unwrap();
    (dense(x, w, bias) + (lo * s).unwrap()).unwrap()
}

/// [`check_grads`] of a LoRA layer against [`lora_ref`] over the base `(W, bias)` with the
/// reference Vars `(A, B)`.
fn check_lora(what: &str, l: &LoraLinear, base: (&Tensor, Option<&Tensor>), (a, b): (&Var, &Var)) {
    let s = l.scaling() as f64;
    check_grads(
        what,
        &|x| l.forward(x).unwrap(),
        &[l.lora_a.clone(), l.lora_b.clone()],
        &|x| lora_ref(x, base, a.as_tensor(), b.as_tensor(), s),
        &[a.as_tensor().clone(), b.as_tensor().clone()],
        2e-5,
    );
}

#[test]
fn lora_and_rslora_match_candle_composition() {
    for (bias, rslora) in [(false, false), (true, false), (true, true)] {
        let lin = base(bias);
        let (_vm, l, a, b) = lora_layer(FrozenLinear::from_linear(&lin).unwrap(), rslora);
        let s = l.scaling() as f64;
        assert_eq!(
            s,
            if rslora {
                7.0 / (R as f64).sqrt()
            } else {
                7.0 / R as f64
            } as f32 as f64
        );
        check_lora(
            &format!("lora bias={bias} rslora={rslora}"),
            &l,
            (lin.weight(), lin.bias()),
            (&a, &b),
        );
    }
}

#[test]
fn qlora_matches_candle_composition_over_the_dequantized_weight() {
    let lin = base(true);
    for double_quant in [false, true] {
        let q = FrozenLinear::nf4(&lin, 64, double_quant).unwrap();
        assert!(q.is_quantized());
        assert!(
            q.bytes() < OUT * IN * 4 / 2,
            "NF4 holds {} bytes",
            q.bytes()
        );
        let (wq, bq) = q.to_candle().unwrap();
        // The NF4 weight is close to the original but not equal to it.
        let d = max_abs_diff(&wq, lin.weight());
        assert!(d > 0.0 && d < 0.2, "NF4 round trip error {d}");
        let (_vm, l, a, b) = lora_layer(q, false);
        check_lora(
            &format!("qlora dq={double_quant}"),
            &l,
            (&wq, bq.as_ref()),
            (&a, &b),
        );
    }
}

#[test]
fn frozen_linear_is_the_base_and_passes_dx() {
    let lin = base(true);
    let f = FrozenLinear::from_linear(&lin).unwrap();
    check_grads(
        "frozen",
        &|x| f.forward(x).unwrap(),
        &[],
        &|x| dense(x, lin.weight(), lin.bias()),
        &[],
        1e-5,
    );
}

#[test]
fn dora_matches_candle_composition_with_the_detached_norm() {
    let lin = base(true);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let l = DoraLinear::from_linear(&lin, &lora_cfg(false), vb.pp("v")).unwrap();
    // At creation m = ||W0||_row (B = 0), so the layer is the base.
    let m0 = var(&vm, "v.lora_magnitude_vector");
    let w_norm = lin.weight().sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    assert_close("dora m init", &m0, &w_norm, 1e-6);
    set_var(&vm, "v.lora_B.weight", &randn(&[OUT, R], 0.3, 6));
    set_var(
        &vm,
        "v.lora_magnitude_vector",
        &(&w_norm + randn(&[OUT], 0.1, 7)).unwrap(),
    );
    let a = Var::from_tensor(&var(&vm, "v.lora_A.weight")).unwrap();
    let b = Var::from_tensor(&var(&vm, "v.lora_B.weight")).unwrap();
    let m = Var::from_tensor(&var(&vm, "v.lora_magnitude_vector")).unwrap();
    let s = l.lora().scaling() as f64;
    let w = lin.weight();
    let theirs = |x: &Tensor| {
        let delta = (b.matmul(&a).unwrap() * s).unwrap();
        let n = (w + delta)
            .unwrap()
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .detach();
        let lo = x
            .broadcast_matmul(&a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap();
        let z = (dense(x, w, None) + (lo * s).unwrap()).unwrap();
        let c = (m.as_tensor() / n).unwrap();
        z.broadcast_mul(&c)
            .unwrap()
            .broadcast_add(lin.bias().unwrap())
            .unwrap()
    };
    check_grads(
        "dora",
        &|x| l.forward(x).unwrap(),
        &[
            l.lora().lora_a.clone(),
            l.lora().lora_b.clone(),
            l.lora_magnitude_vector.clone(),
        ],
        &theirs,
        &[
            a.as_tensor().clone(),
            b.as_tensor().clone(),
            m.as_tensor().clone(),
        ],
        2e-5,
    );
}

#[test]
fn vera_matches_candle_composition_over_shared_projections() {
    let lin = base(false);
    let proj = VeraProjections::new(R, IN + 6, OUT + 3, 11).unwrap();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let l = VeraLinear::from_linear(&lin, &proj, 0.1, vb.pp("k")).unwrap();
    assert_close(
        "vera lambda_d init",
        &var(&vm, "k.vera_lambda_d"),
        &Tensor::full(0.1f32, R, &DEV).unwrap(),
        0.0,
    );
    set_var(&vm, "k.vera_lambda_b", &randn(&[OUT], 0.5, 8));
    set_var(&vm, "k.vera_lambda_d", &randn(&[R], 0.5, 9));
    let ld = Var::from_tensor(&var(&vm, "k.vera_lambda_d")).unwrap();
    let lb = Var::from_tensor(&var(&vm, "k.vera_lambda_b")).unwrap();
    let (va, vbm) = proj.to_candle().unwrap();
    let va = va.narrow(1, 0, IN).unwrap();
    let vbm = vbm.narrow(0, 0, OUT).unwrap();
    let theirs = |x: &Tensor| {
        let h = x.broadcast_matmul(&va.t().unwrap()).unwrap();
        let h = h.broadcast_mul(ld.as_tensor()).unwrap();
        let u = h.broadcast_matmul(&vbm.t().unwrap()).unwrap();
        (dense(x, lin.weight(), None) + u.broadcast_mul(lb.as_tensor()).unwrap()).unwrap()
    };
    check_grads(
        "vera",
        &|x| l.forward(x).unwrap(),
        &[l.vera_lambda_d.clone(), l.vera_lambda_b.clone()],
        &theirs,
        &[ld.as_tensor().clone(), lb.as_tensor().clone()],
        2e-5,
    );
}

#[test]
fn adalora_matches_candle_composition_and_masks_ranks() {
    let lin = base(true);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let l = AdaLoraLinear::from_linear(&lin, R, 6.0, vb.pp("o")).unwrap();
    set_var(&vm, "o.lora_E", &randn(&[R, 1], 0.5, 10));
    l.apply_rank_mask(&[true, false, true, true, false])
        .unwrap();
    let e_now = var(&vm, "o.lora_E")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!((e_now[1], e_now[4]), (0.0, 0.0));
    assert!(e_now[0] != 0.0 && e_now[2] != 0.0);
    let a = Var::from_tensor(&var(&vm, "o.lora_A")).unwrap();
    let b = Var::from_tensor(&var(&vm, "o.lora_B")).unwrap();
    let e = Var::from_tensor(&var(&vm, "o.lora_E")).unwrap();
    let c = 6.0 / (R as f64 + 1e-5);
    assert!((l.factor().unwrap() as f64 - c).abs() < 1e-6);
    let theirs = |x: &Tensor| {
        let ae = a.broadcast_mul(e.as_tensor()).unwrap();
        let lo = x
            .broadcast_matmul(&ae.t().unwrap())
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap();
        (dense(x, lin.weight(), lin.bias()) + (lo * c).unwrap()).unwrap()
    };
    check_grads(
        "adalora",
        &|x| l.forward(x).unwrap(),
        &[l.lora_a.clone(), l.lora_b.clone(), l.lora_e.clone()],
        &theirs,
        &[
            a.as_tensor().clone(),
            b.as_tensor().clone(),
            e.as_tensor().clone(),
        ],
        2e-5,
    );
    let err = l.apply_rank_mask(&[true]).unwrap_err().to_string();
    assert!(err.contains("1 mask entries for rank 5"), "{err}");
}

/// Five AdamW steps through our layer and through candle's composition end on the same
/// weights (the same trajectory).
#[test]
fn adamw_steps_follow_candle_composition() {
    let lin = base(true);
    let (vm, l, a, b) = lora_layer(FrozenLinear::from_linear(&lin).unwrap(), false);
    let s = l.scaling() as f64;
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = AdamW::new(vm.all_vars(), params.clone()).unwrap();
    let mut opt_ref = AdamW::new(vec![a.clone(), b.clone()], params).unwrap();
    let target = randn(&[2, 3, OUT], 1.0, 12);
    for step in 0..5 {
        let x = randn(&[2, 3, IN], 1.0, 100 + step);
        let loss = (l.forward(&x).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        opt.backward_step(&loss).unwrap();
        let y = lora_ref(
            &x,
            (lin.weight(), lin.bias()),
            a.as_tensor(),
            b.as_tensor(),
            s,
        );
        let loss_ref = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        let (lv, rv) = (
            loss.to_scalar::<f32>().unwrap(),
            loss_ref.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (lv - rv).abs() <= 1e-5 * rv.abs().max(1.0),
            "step {step}: loss {lv} vs {rv}"
        );
        opt_ref.backward_step(&loss_ref).unwrap();
    }
    let b_now = var(&vm, "q.lora_B.weight");
    assert_close(
        "A after 5 steps",
        &var(&vm, "q.lora_A.weight"),
        a.as_tensor(),
        1e-5,
    );
    assert_close("B after 5 steps", &b_now, b.as_tensor(), 1e-5);
    // The steps moved the weights.
    assert!(max_abs_diff(&b_now, &randn(&[OUT, R], 0.3, 5)) > 1e-3);
}

#[test]
fn inputs_are_checked_with_clear_errors() {
    let lin = base(false);
    let (_vm, l, _, _) = lora_layer(FrozenLinear::from_linear(&lin).unwrap(), false);
    let e = l
        .forward(&randn(&[3, IN + 1], 1.0, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes 37 input features"), "{e}");
    let x64 = randn(&[3, IN], 1.0, 1).to_dtype(DType::F64).unwrap();
    let e = l.forward(&x64).unwrap_err().to_string();
    assert!(e.contains("must be f32") && e.contains("F64"), "{e}");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &DEV);
    let e = LoraLinear::from_linear(&lin, &lora_cfg(false), vb)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be f32"), "{e}");
    let bad = LoraConfig {
        r: 0,
        ..lora_cfg(false)
    };
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let e = LoraLinear::from_linear(&lin, &bad, vb)
        .unwrap_err()
        .to_string();
    assert!(e.contains("r >= 1"), "{e}");
}

/// A two-layer "model" of each method: saved with save_peft, loaded into fresh layers with
/// load_peft, it gives the same outputs; the files hold PEFT's keys.
#[test]
fn peft_folders_round_trip_for_every_method() {
    let lins = [base(true), {
        let w = randn(&[OUT, IN], 0.2, 21);
        candle_nn::Linear::new(w, None)
    }];
    let paths = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
    ];
    let proj = VeraProjections::new(R, IN, OUT, 3).unwrap();
    let build = |method: &str, vm: &VarMap, seed: u64| -> Vec<AdaptedLinear> {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &DEV);
        let layers: Vec<AdaptedLinear> = lins
            .iter()
            .zip(paths)
            .map(|(lin, p)| {
                let vb = vb.pp(p);
                match method {
                    "lora" => LoraLinear::from_linear(lin, &lora_cfg(true), vb)
                        .unwrap()
                        .into(),
                    "dora" => DoraLinear::from_linear(lin, &lora_cfg(false), vb)
                        .unwrap()
                        .into(),
                    "vera" => VeraLinear::from_linear(lin, &proj, 0.1, vb).unwrap().into(),
                    _ => AdaLoraLinear::from_linear(lin, R, 6.0, vb).unwrap().into(),
                }
            })
            .collect();
        // Random values everywhere, so a value lost in the round trip shows.
        for (i, v) in vm.data().lock().unwrap().values().enumerate() {
            let t = randn(v.dims(), 0.3, seed + i as u64);
            v.set(&t).unwrap();
        }
        layers
    };
    let x = randn(&[4, IN], 1.0, 30);
    for method in ["lora", "dora", "vera", "adalora"] {
        let dir = std::env::temp_dir().join(format!(
            "lorafuse-candle-peft-{method}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let vm = VarMap::new();
        let layers = build(method, &vm, 40);
        if let AdaptedLinear::AdaLora(l) = &layers[0] {
            l.apply_rank_mask(&[true, true, false, true, false])
                .unwrap();
        }
        let named: Vec<(&str, &AdaptedLinear)> = paths.iter().copied().zip(layers.iter()).collect();
        let mut opts = MethodOptions::default();
        let keep0 = vec![true, true, false, true, false];
        if method == "adalora" {
            opts.adalora = AdaLoraOptions {
                total_step: Some(100),
                rank_pattern: Some([(paths[0].to_string(), keep0.clone())].into()),
                ..Default::default()
            };
        }
        save_peft(&dir, &named, &opts).unwrap();
        let cfg_text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        let expect_type = match method {
            "vera" => "\"VERA\"",
            "adalora" => "\"ADALORA\"",
            _ => "\"LORA\"",
        };
        assert!(cfg_text.contains(expect_type), "{method}: {cfg_text}");
        let st = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let keys: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        let key = |suffix: &str| format!("base_model.model.{}.{suffix}", paths[0]);
        match method {
            "lora" => assert!(keys.contains(&key("lora_A.weight")), "{keys:?}"),
            "dora" => assert!(keys.contains(&key("lora_magnitude_vector")), "{keys:?}"),
            "vera" => assert!(keys.contains(&"base_model.vera_A".to_string()), "{keys:?}"),
            _ => {
                // The masked ranks are dropped from the first module only.
                assert_eq!(st.tensor(&key("lora_A")).unwrap().shape(), &[3, IN]);
                let k1 = format!("base_model.model.{}.lora_E", paths[1]);
                assert_eq!(st.tensor(&k1).unwrap().shape(), &[R, 1]);
            }
        }
        let before: Vec<Tensor> = layers.iter().map(|l| l.forward(&x).unwrap()).collect();
        let vm2 = VarMap::new();
        let fresh = build(method, &vm2, 900);
        if method == "vera" {
            // Fresh layers over other projections: loading replaces the shared ones.
            let other = VeraProjections::new(R, IN, OUT, 77).unwrap();
            let vb = VarBuilder::from_varmap(&vm2, DType::F32, &DEV);
            let _ = VeraLinear::from_linear(&lins[0], &other, 0.1, vb.pp("unused")).unwrap();
        }
        let named2: Vec<(&str, &AdaptedLinear)> = paths.iter().copied().zip(fresh.iter()).collect();
        for (l, b) in fresh.iter().zip(&before) {
            assert!(
                max_abs_diff(&l.forward(&x).unwrap(), b) > 1e-4,
                "{method}: fresh equals saved"
            );
        }
        load_peft(&dir, &named2).unwrap();
        for (i, (l, b)) in fresh.iter().zip(&before).enumerate() {
            assert_close(
                &format!("{method} layer {i} after load"),
                &l.forward(&x).unwrap(),
                b,
                1e-6,
            );
        }
        // Loading into layers of another method is refused by name.
        if method == "lora" {
            let vm3 = VarMap::new();
            let other = build("dora", &vm3, 5);
            let named3: Vec<(&str, &AdaptedLinear)> =
                paths.iter().copied().zip(other.iter()).collect();
            let e = load_peft(&dir, &named3).unwrap_err().to_string();
            assert!(e.contains("Lora") && e.contains("Dora"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn save_peft_refuses_mixed_methods_and_empty_sets() {
    let lin = base(false);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let a: AdaptedLinear = LoraLinear::from_linear(&lin, &lora_cfg(false), vb.pp("a"))
        .unwrap()
        .into();
    let b: AdaptedLinear = DoraLinear::from_linear(&lin, &lora_cfg(false), vb.pp("b"))
        .unwrap()
        .into();
    let f: AdaptedLinear = FrozenLinear::from_linear(&lin).unwrap().into();
    let dir = std::env::temp_dir().join(format!("lorafuse-candle-refuse-{}", std::process::id()));
    let e = save_peft(&dir, &[("a", &a), ("b", &b)], &MethodOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("one method"), "{e}");
    let e = save_peft(&dir, &[("f", &f)], &MethodOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no adapted layer"), "{e}");
    assert!(!dir.exists(), "a refused save wrote {}", dir.display());
}

#[test]
fn merged_layers_equal_the_adapted_forward() {
    let lin = base(true);
    let (_vm, l, _, _) = lora_layer(FrozenLinear::from_linear(&lin).unwrap(), false);
    let x = randn(&[4, IN], 1.0, 50);
    let merged = l.merged().unwrap();
    assert_close(
        "lora merged",
        &merged.forward(&x).unwrap(),
        &l.forward(&x).unwrap(),
        1e-5,
    );
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &DEV);
    let d = DoraLinear::from_linear(&lin, &lora_cfg(false), vb.pp("d")).unwrap();
    set_var(&vm, "d.lora_B.weight", &randn(&[OUT, R], 0.3, 51));
    let merged = d.merged().unwrap();
    assert_close(
        "dora merged",
        &merged.forward(&x).unwrap(),
        &d.forward(&x).unwrap(),
        1e-5,
    );
}
