//! The generic backend suite, one module per op family; every check is a
//! `fn check<B: Backend>(be: &B, tol: &Tol)` comparing `be` with the CPU reference (or, in
//! `errors` and `determinism`, with the CPU's errors and with itself), instantiated per backend
//! by `backend_suite!` in `tests/backend_ops.rs`.

pub mod harness;

pub mod adalora_alloc;
pub mod adamw;
pub mod attention;
pub mod bf16;
pub mod dense;
pub mod determinism;
pub mod errors;
pub mod lowrank;
pub mod memory;
pub mod model;
pub mod multi;
pub mod nf4;
pub mod pointwise;
