//! Learning-rate schedules.

/// Linear warmup then linear decay to 0, exactly transformers'
/// `get_linear_schedule_with_warmup`: the multiplier at 0-based step k is `k / warmup` while
/// `k < warmup`, then `max(0, (total - k) / (total - warmup))`. As in a transformers training
/// loop, step 0 therefore runs with lr 0 when `warmup > 0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearWarmupDecay {
    pub peak_lr: f32,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LinearWarmupDecay {
    /// Learning rate for 0-based optimizer step `k`.
    pub fn lr(&self, k: usize) -> f32 {
        let mult = if k < self.warmup_steps {
            k as f64 / self.warmup_steps.max(1) as f64
        } else {
            let rest = self.total_steps.saturating_sub(self.warmup_steps).max(1);
            (self.total_steps.saturating_sub(k) as f64 / rest as f64).max(0.0)
        };
        (self.peak_lr as f64 * mult) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_linear_schedule() {
        let s = LinearWarmupDecay {
            peak_lr: 2e-4,
            warmup_steps: 5,
            total_steps: 60,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1) - 4e-5).abs() < 1e-12);
        assert!((s.lr(5) - 2e-4).abs() < 1e-12);
        assert!((s.lr(59) - 2e-4 / 55.0).abs() < 1e-10);
        assert_eq!(s.lr(60), 0.0);
        assert_eq!(s.lr(100), 0.0);
    }
}
