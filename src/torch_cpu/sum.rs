//! torch's CPU `sum` and `mean` of an f32 vector, in torch's exact order of additions.
//!
//! bitsandbytes' double quantization subtracts `offset = absmax.mean()` before it quantizes the
//! absmax, and stores that offset; for the stored value to be bnb's to the last bit, the sum
//! behind the mean must add the same numbers in the same order as torch 2.x does on the CPU
//! (`cascade_sum` in `aten/src/ATen/native/cpu/SumKernel.cpp`, reached through
//! `TensorIterator::parallel_reduce`). That order depends on two things of the process that
//! runs torch, which [`TorchCpuOrder`] holds:
//!
//! * the width of torch's `Vectorized<float>` under its CPU capability
//!   ([`TorchCapability::lanes`]): 16 lanes for AVX-512, 8 for AVX2 and `default`;
//! * torch's intra-op thread count, once the vector has at least 32768 (`GRAIN_SIZE`) values:
//!   torch then sums one chunk per thread and adds the per-thread sums in a second pass.
//!
//! [`TorchCpuOrder::detected`] picks both as torch would on this machine (its environment
//! variables included). The sums were checked against torch 2.15 under the `avx2` and
//! `default` capabilities with 1 to 16 threads on vectors of 1 to 300001 values, and against
//! the AVX-512 golden files (`tests/golden/nf4_*`).

use super::TorchCapability;
use std::sync::OnceLock;

/// torch's `at::internal::GRAIN_SIZE`: vectors shorter than this are summed on one thread.
pub const GRAIN_SIZE: usize = 32768;

/// The two properties of a torch process that fix its CPU summation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TorchCpuOrder {
    /// The CPU capability torch dispatched to (its vector width).
    pub capability: TorchCapability,
    /// torch's intra-op threads (`torch.get_num_threads()`), at least 1.
    pub threads: usize,
}

impl TorchCpuOrder {
    /// The order torch would use in this process, found once: [`TorchCapability::detected`],
    /// and as threads the number of physical cores (as torch's `intraop_default_num_threads`
    /// counts them), or fewer where `MKL_NUM_THREADS`, else `OMP_NUM_THREADS`, asks for fewer
    /// (torch 2.15 caps either at the core count: measured).
    ///
    /// A torch that called `torch.set_num_threads(n)` sums vectors of 32768 values or more in
    /// another order; [`torch_sum_f32`] takes the order explicitly for that case.
    pub fn detected() -> TorchCpuOrder {
        static ORDER: OnceLock<TorchCpuOrder> = OnceLock::new();
        *ORDER.get_or_init(|| TorchCpuOrder {
            capability: TorchCapability::detected(),
            threads: {
                let cores = physical_cores();
                env_threads("MKL_NUM_THREADS")
                    .or_else(|| env_threads("OMP_NUM_THREADS"))
                    .map_or(cores, |n| n.min(cores))
            },
        })
    }

    /// The order of a torch process whose `torch.backends.cpu.get_cpu_capability()` is
    /// `capability` (see [`TorchCapability::from_reported`]) and whose
    /// `torch.get_num_threads()` is `threads`.
    pub fn for_torch(capability: &str, threads: usize) -> TorchCpuOrder {
        TorchCpuOrder {
            capability: TorchCapability::from_reported(capability),
            threads: threads.max(1),
        }
    }
}

/// torch's `get_env_num_threads`: a positive integer, else nothing.
fn env_threads(var: &str) -> Option<usize> {
    std::env::var(var)
        .ok()?
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
}

/// Physical cores (cpuinfo's cores: distinct sets of hardware-thread siblings), else the
/// logical CPUs the OS reports.
fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu") else {
        return logical;
    };
    let mut cores = std::collections::BTreeSet::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_cpu = name
            .strip_prefix("cpu")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_cpu {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(entry.path().join("topology/thread_siblings_list")) {
            cores.insert(s.trim().to_string());
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len()
    }
}

/// torch's `x.mean()` of a 1-D f32 tensor on the CPU: `sum(x).div_(n)`, the f32 sum of
/// [`torch_sum_f32`] divided by `n` in f32 (torch computes a CPU float mean as sum, then divide).
/// Empty `x` gives NaN, as torch does.
pub fn torch_mean_f32(x: &[f32], order: TorchCpuOrder) -> f32 {
    torch_sum_f32(x, order) / x.len() as f32
}

/// torch's `x.sum()` of a contiguous 1-D f32 tensor on the CPU, bit for bit under `order`.
///
/// One thread (fewer than [`GRAIN_SIZE`] values, or `order.threads == 1`): the vector is summed
/// by `vectorized_inner_sum` when it holds at least `lanes` values (whole vectors of `lanes`
/// through torch's 4-way interleaved, 4-level cascade `row_sum`, then the scalar tail in order,
/// then the lanes in order), else by the scalar `row_sum`. More threads: `min(threads,
/// ceil(n / GRAIN_SIZE))` chunks of `ceil(n / chunks)` values, each summed as above into its
/// thread's slot of a `threads`-long buffer of zeros, and that buffer summed the same way.
pub fn torch_sum_f32(x: &[f32], order: TorchCpuOrder) -> f32 {
    match order.capability.lanes() {
        16 => sum_in::<16>(x, order.threads),
        _ => sum_in::<8>(x, order.threads),
    }
}

/// [`torch_sum_f32`] with `L`-lane vectors.
fn sum_in<const L: usize>(x: &[f32], threads: usize) -> f32 {
    let threads = threads.max(1);
    if x.len() < GRAIN_SIZE || threads == 1 {
        return serial_sum::<L>(x);
    }
    let chunks = threads.min(x.len().div_ceil(GRAIN_SIZE));
    let chunk = x.len().div_ceil(chunks);
    let mut slots = vec![0f32; threads];
    for (slot, part) in slots.iter_mut().zip(x.chunks(chunk)) {
        *slot += serial_sum::<L>(part);
    }
    0.0 + serial_sum::<L>(&slots)
}

/// One thread's `cascade_sum` of a contiguous run (the loop body of `parallel_reduce`).
fn serial_sum<const L: usize>(x: &[f32]) -> f32 {
    if x.len() < L {
        // No whole vector: the scalar row_sum.
        return row_sum::<1>(x.len(), |i| [x[i]])[0];
    }
    let acc = lane_sums::<L>(x);
    let nvec = x.len() / L;
    let mut total = 0f32;
    for &v in &x[nvec * L..] {
        total += v;
    }
    for v in acc {
        total += v;
    }
    total
}

/// The per-lane sums of the whole `L`-lane vectors of `x` (torch's `row_sum` over vectors).
fn lane_sums<const L: usize>(x: &[f32]) -> [f32; L] {
    row_sum::<L>(x.len() / L, |i| std::array::from_fn(|l| x[i * L + l]))
}

fn add_lanes<const L: usize>(a: &mut [f32; L], b: &[f32; L]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// torch's `row_sum`: the `size` elements seen as `[size / 4, 4]`, summed by `multi_row_sum`,
/// the leftovers added to column 0, then columns 1..4 added to column 0.
fn row_sum<const L: usize>(size: usize, load: impl Fn(usize) -> [f32; L]) -> [f32; L] {
    const ILP: usize = 4;
    let size_ilp = size / ILP;
    let mut partial = multi_row_sum::<L, ILP>(size_ilp, |i, k| load(i * ILP + k));
    for i in size_ilp * ILP..size {
        add_lanes(&mut partial[0], &load(i));
    }
    let [mut p0, rest @ ..] = partial;
    for p in &rest {
        add_lanes(&mut p0, p);
    }
    p0
}

/// torch's `multi_row_sum`: `NR` running sums with a 4-level cascade of partial sums.
#[allow(clippy::needless_range_loop)] // mirrors torch's loops index for index
fn multi_row_sum<const L: usize, const NR: usize>(
    size: usize,
    load: impl Fn(usize, usize) -> [f32; L],
) -> [[f32; L]; NR] {
    const LEVELS: usize = 4;
    // c10's CeilLog2, which is 1 for sizes up to 2.
    let ceil_log2 = if size <= 2 {
        1
    } else {
        64 - ((size - 1) as u64).leading_zeros() as usize
    };
    let level_power = 4.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; NR]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..NR {
                add_lanes(&mut acc[0][k], &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..NR {
                let lower = acc[j - 1][k];
                add_lanes(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0.0; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..NR {
            add_lanes(&mut acc[0][k], &load(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..NR {
            let upper = acc[j][k];
            add_lanes(&mut acc[0][k], &upper);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(lanes: usize, threads: usize) -> TorchCpuOrder {
        let capability = if lanes == 16 {
            TorchCapability::Avx512
        } else {
            TorchCapability::Avx2
        };
        TorchCpuOrder {
            capability,
            threads,
        }
    }

    #[test]
    fn reported_capabilities_give_their_orders() {
        assert_eq!(TorchCpuOrder::for_torch("AVX2", 0), order(8, 1));
        assert_eq!(TorchCpuOrder::for_torch("DEFAULT", 3).capability.lanes(), 8);
        let d = TorchCpuOrder::detected();
        assert!(d.threads >= 1, "{d:?}");
    }

    #[test]
    fn exact_values_sum_exactly_in_every_order() {
        // Small integers add without rounding in any order, so every order gives n(n+1)/2.
        for n in [
            0usize, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 40_000, 70_001,
        ] {
            let x: Vec<f32> = (1..=n).map(|i| (i % 64) as f32).collect();
            let want: f32 = x.iter().map(|&v| v as f64).sum::<f64>() as f32;
            for o in [order(8, 1), order(16, 1), order(8, 3), order(16, 2)] {
                assert_eq!(torch_sum_f32(&x, o), want, "n {n} {o:?}");
            }
        }
    }

    #[test]
    fn lanes_and_threads_change_the_rounding() {
        // Values of many magnitudes, whose sums round: some length must tell the orders apart,
        // or the parameters do nothing.
        let x: Vec<f32> = (0..100_000u32)
            .map(|i| {
                let h = i.wrapping_mul(2_654_435_761);
                (h >> 8) as f32 * 2f32.powi((h % 23) as i32 - 30)
            })
            .collect();
        let lens = [17, 100, 1000, 5000];
        assert!(
            lens.iter()
                .any(|&n| torch_sum_f32(&x[..n], order(8, 1)).to_bits()
                    != torch_sum_f32(&x[..n], order(16, 1)).to_bits()),
            "8 and 16 lanes agree on every length"
        );
        let sums: Vec<u32> = [1, 2, 3, 5]
            .map(|t| torch_sum_f32(&x, order(8, t)).to_bits())
            .to_vec();
        assert!(
            sums.iter().any(|&s| s != sums[0]),
            "threads change nothing: {sums:?}"
        );
        // Below the grain size the thread count changes nothing.
        assert_eq!(
            torch_sum_f32(&x[..GRAIN_SIZE - 1], order(8, 1)).to_bits(),
            torch_sum_f32(&x[..GRAIN_SIZE - 1], order(8, 5)).to_bits()
        );
    }
}
