//! Finite-difference checking shared by the gradient tests (tests/cpu_grad*.rs).
//!
//! Each check builds a scalar `L = sum(out * g)` with a fixed random `g`, perturbs sampled
//! coordinates by ±eps and compares `(L+ - L-) / 2eps` with the analytic gradient.

#![allow(dead_code)] // each test binary uses a different subset

/// The finite-difference step.
pub const EPS: f32 = 1e-2;

/// Deterministic values in [-1, 1).
pub fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Compares the analytic gradient `grad` of `f` at `x` with central differences on up to 24
/// coordinates spread over the tensor (and always the last one).
pub fn check(name: &str, x: &[f32], grad: &[f32], f: &dyn Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), grad.len(), "{name}: grad length");
    let n = x.len();
    let step = (n / 24).max(1);
    let mut worst = 0.0f64;
    for i in (0..n).step_by(step).chain(std::iter::once(n - 1)) {
        let mut xp = x.to_vec();
        xp[i] += EPS;
        let lp = f(&xp);
        xp[i] -= 2.0 * EPS;
        let lm = f(&xp);
        let fd = (lp - lm) / (2.0 * EPS as f64);
        let an = grad[i] as f64;
        let err = (fd - an).abs() / (1e-2 + fd.abs().max(an.abs()));
        worst = worst.max(err);
        assert!(
            err < 2e-2,
            "{name}[{i}]: finite difference {fd:.6} vs analytic {an:.6}"
        );
    }
    println!("{name}: {n} elements, worst relative error {worst:.2e}");
}

pub fn err_msg<T>(r: lorafuse::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}
