//! torch's CPU generator (`torch.Generator(device="cpu")`) and its float `uniform_`, bit for
//! bit: what PEFT's VeRA draws its shared projections from
//! (`torch.Generator().manual_seed(projection_prng_key)`, then `tensor.uniform_(-bound, bound,
//! generator=...)` for `vera_A` and then `vera_B`).
//!
//! The engine is the 32-bit Mersenne Twister MT19937 that torch's `CPUGeneratorImpl` wraps,
//! seeded as `manual_seed` seeds it (the low 32 bits of the seed through the reference
//! `init_genrand`). A float sample takes one 32-bit output: `u = (v & (2^24 - 1)) * 2^-24`, then
//! `u * (to - from) + from` in f32, with `from` and `to` rounded to f32 first
//! (`at::uniform_real_distribution<float>`); whether that last step is one rounding or two
//! depends on torch's CPU capability ([`TorchCapability::fuses_multiply_add`]). Checked against
//! torch 2.15 under the `avx2` and `default` capabilities (`tests/golden/torch_rng`).

use super::TorchCapability;

const N: usize = 624;
const M: usize = 397;

/// torch's CPU generator after `manual_seed(seed)`.
#[derive(Clone)]
pub struct TorchGenerator {
    state: [u32; N],
    next: usize,
}

impl TorchGenerator {
    /// `torch.Generator(device="cpu").manual_seed(seed)`: only the low 32 bits of `seed` reach
    /// the engine, as in torch.
    pub fn manual_seed(seed: u64) -> TorchGenerator {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        TorchGenerator { state, next: N }
    }

    /// The next 32-bit output (`CPUGeneratorImpl::random`).
    pub fn random(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// `torch.empty(n).uniform_(from, to, generator=self)` in f32, as torch computes it under
    /// `capability`.
    pub fn uniform_f32(
        &mut self,
        n: usize,
        from: f64,
        to: f64,
        capability: TorchCapability,
    ) -> Vec<f32> {
        let (from, to) = (from as f32, to as f32);
        let width = to - from;
        let fma = capability.fuses_multiply_add();
        (0..n)
            .map(|_| {
                let u = (self.random() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0);
                if fma {
                    u.mul_add(width, from)
                } else {
                    u * width + from
                }
            })
            .collect()
    }

    /// PEFT's `_kaiming_init((rows, cols), generator)` for VeRA: `uniform_(-bound, bound)` with
    /// `bound = sqrt(3) * (sqrt(2) / sqrt(cols))` in f64 (fan_in = cols, gain sqrt(2)), row-major
    /// `[rows, cols]`.
    pub fn peft_kaiming_uniform(
        &mut self,
        rows: usize,
        cols: usize,
        capability: TorchCapability,
    ) -> Vec<f32> {
        let bound = 3f64.sqrt() * (2f64.sqrt() / (cols as f64).sqrt());
        self.uniform_f32(rows * cols, -bound, bound, capability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_is_the_reference_mt19937() {
        // The reference MT19937's 10000th output for the default seed 5489 is 4123659995
        // (the C++ standard's check value for std::mt19937).
        let mut g = TorchGenerator::manual_seed(5489);
        let v = (0..10_000).map(|_| g.random()).last().unwrap();
        assert_eq!(v, 4_123_659_995);
        // Only the low 32 bits of the seed count.
        let (mut a, mut b) = (
            TorchGenerator::manual_seed(7),
            TorchGenerator::manual_seed(7 + (1 << 32)),
        );
        assert_eq!(a.random(), b.random());
    }

    #[test]
    fn uniform_samples_stay_in_range_and_fma_matters() {
        let mut g = TorchGenerator::manual_seed(3);
        let x = g.uniform_f32(10_000, -0.25, 0.75, TorchCapability::Avx2);
        assert!(x.iter().all(|&v| (-0.25..0.75).contains(&v)));
        let mut fused = TorchGenerator::manual_seed(1);
        let mut plain = TorchGenerator::manual_seed(1);
        let b = 0.1234567;
        let f = fused.uniform_f32(4096, -b, b, TorchCapability::Avx2);
        let p = plain.uniform_f32(4096, -b, b, TorchCapability::Default);
        assert!(f.iter().zip(&p).any(|(a, b)| a != b));
        assert!(f.iter().zip(&p).all(|(a, b)| (a - b).abs() <= 1e-7));
    }
}
