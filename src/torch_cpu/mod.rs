//! torch's CPU arithmetic where a format or a peer's numbers depend on it, bit for bit:
//! [`sum`], the summation order behind bitsandbytes' double-quant offset, and [`rng`], the
//! generator behind PEFT's VeRA projections. Both depend on the CPU capability torch
//! dispatches to ([`TorchCapability`]).

pub mod rng;
pub mod sum;

/// The CPU kernels torch 2.x dispatches to (`torch.backends.cpu.get_cpu_capability()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchCapability {
    /// The generic kernels: x86-64 without AVX2 and FMA, `ATEN_CPU_CAPABILITY=default`, and
    /// other architectures.
    Default,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 F, VL, BW and DQ with FMA.
    Avx512,
}

impl TorchCapability {
    /// What torch picks on this machine, found once: the best capability the CPU has (torch's
    /// tests in `DispatchStub.cpp`), lowered by `ATEN_CPU_CAPABILITY=default` or `avx2`.
    /// `ATEN_CPU_CAPABILITY=avx512` on a CPU without it runs torch's AVX2 kernels (measured
    /// with torch 2.15), so the CPU caps the variable.
    pub fn detected() -> TorchCapability {
        static CAP: std::sync::OnceLock<TorchCapability> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| Self::requested(std::env::var("ATEN_CPU_CAPABILITY").ok().as_deref()))
    }

    fn requested(var: Option<&str>) -> TorchCapability {
        let cpu = Self::of_cpu();
        match var {
            Some("default") => TorchCapability::Default,
            Some("avx2") if cpu == TorchCapability::Avx512 => TorchCapability::Avx2,
            _ => cpu,
        }
    }

    /// The best capability of this CPU.
    fn of_cpu() -> TorchCapability {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f")
                && has!("avx512vl")
                && has!("avx512bw")
                && has!("avx512dq")
                && has!("fma")
            {
                return TorchCapability::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return TorchCapability::Avx2;
            }
        }
        TorchCapability::Default
    }

    /// The capability a torch process reports (`AVX512`, `AVX2`, `DEFAULT`, any case). torch
    /// may report `AVX512` where the CPU lacks it (when asked through `ATEN_CPU_CAPABILITY`)
    /// and then runs its AVX2 kernels, so the CPU caps the report; names torch does not use on
    /// x86-64 read as `Default`.
    pub fn from_reported(name: &str) -> TorchCapability {
        match name.to_ascii_lowercase().as_str() {
            "avx512" => Self::of_cpu(),
            "avx2" => Self::requested(Some("avx2")),
            _ => TorchCapability::Default,
        }
    }

    /// Lanes of torch's `Vectorized<float>`: 16 under AVX-512, else 8.
    pub fn lanes(self) -> usize {
        match self {
            TorchCapability::Avx512 => 16,
            TorchCapability::Avx2 | TorchCapability::Default => 8,
        }
    }

    /// Whether the compiler fused `a * b + c` into one FMA in torch's per-capability kernels
    /// (they are built with `-mavx2 -mfma` or AVX-512 flags, under GCC's default FP
    /// contraction): the uniform sampler's `x * (to - from) + from` is one rounding there and
    /// two in the `default` kernels (measured with torch 2.15 under both).
    pub fn fuses_multiply_add(self) -> bool {
        self != TorchCapability::Default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_only_lowers_the_cpus_capability() {
        let cpu = TorchCapability::of_cpu();
        assert_eq!(TorchCapability::requested(None), cpu);
        assert_eq!(
            TorchCapability::requested(Some("default")),
            TorchCapability::Default
        );
        assert_eq!(TorchCapability::requested(Some("avx512")), cpu);
        assert_eq!(
            TorchCapability::requested(Some("AVX2")),
            cpu,
            "torch ignores unknown names"
        );
        let avx2 = TorchCapability::requested(Some("avx2"));
        assert!(avx2 == cpu || (cpu == TorchCapability::Avx512 && avx2 == TorchCapability::Avx2));
        assert_eq!(TorchCapability::from_reported("AVX512"), cpu);
        assert_eq!(
            TorchCapability::from_reported("DEFAULT"),
            TorchCapability::Default
        );
        assert_eq!(TorchCapability::Avx512.lanes(), 16);
        assert_eq!(TorchCapability::Default.lanes(), 8);
        assert!(!TorchCapability::Default.fuses_multiply_add());
    }
}
