//! What only the wgpu backend has, beyond the generic suite (`tests/backend_ops.rs`, which
//! compares every op with the CPU reference on wgpu in each mode): an allocation beyond the
//! adapter's limits is an error and leaves the device usable, and the readback counter
//! (`Wgpu::readbacks`): several tensors read back in one readback, and the device-resident
//! AdaLoRA allocator reading nothing back over a whole schedule. Skips loudly without a
//! Vulkan/Metal/DX12 adapter; `LORAFUSE_REQUIRE=wgpu` fails. (f16 frozen weights:
//! `wgpu_f16.rs`; training end to end: `wgpu_finetune.rs`.)
#![cfg(feature = "wgpu")]

mod common;
#[path = "common/gpu.rs"]
mod gpu;
#[path = "common/adalora_twin.rs"]
mod twin;

use gpu::*;
use lorafuse::adapter::device_rank_allocator::DeviceRankAllocator;
use lorafuse::{Backend, Tensor, Wgpu};

#[test]
fn out_of_memory_is_an_error_and_the_device_stays_usable() {
    let Some(be) = wgpu("out_of_memory_is_an_error_and_the_device_stays_usable") else {
        return;
    };
    // 256 GiB: beyond any adapter's buffer limit.
    let e = be.zeros(&[1 << 36]).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("wgpu"), "{e}");
    let e = be.upload(&[1.0; 8], &[2, 4]).and_then(|t| be.download(&t));
    assert_eq!(
        e.unwrap(),
        vec![1.0; 8],
        "the device works after the failed allocation"
    );
}

#[test]
fn download_many_reads_back_once() {
    let Some(be) = wgpu("download_many_reads_back_once") else {
        return;
    };
    let a = be.upload(&rand_vec(1000, 1), &[10, 100]).unwrap();
    let b = be.upload(&[3.5], &[1]).unwrap();
    let empty = be.zeros(&[0, 3]).unwrap();
    let frozen = be.upload_frozen(&[0.5, -1.25, 2.0], &[3]).unwrap();
    let c = be.upload(&rand_vec(7, 2), &[7]).unwrap();
    let ts = [&a, &b, &empty, &frozen, &c];
    let one_by_one: Vec<Vec<f32>> = ts.iter().map(|t| be.download(t).unwrap()).collect();
    let before = be.readbacks();
    let all = be.download_many(&ts).unwrap();
    assert_eq!(be.readbacks() - before, 1, "one readback for every tensor");
    // (with a frozen f16 tensor among them; download_many's values are checked generically)
    assert_eq!(all, one_by_one);
    // Nothing to read: no readback.
    let before = be.readbacks();
    assert_eq!(
        be.download_many(&[&empty]).unwrap(),
        vec![Vec::<f32>::new()]
    );
    assert_eq!(be.readbacks(), before);
}

/// The allocator's results against the CPU are in the suite (`adalora_alloc::device_allocator`);
/// here: over the same kind of schedule without recording, no readback at any step (masks
/// included), and one when the rank pattern is asked for.
#[test]
fn device_allocator_reads_nothing_back() {
    let Some(be) = wgpu("device_allocator_reads_nothing_back") else {
        return;
    };
    let sc = twin::scenario(3);
    let names: Vec<(&str, usize)> = sc.layers.iter().map(|l| (l.0.as_str(), l.1)).collect();
    let mut alloc =
        DeviceRankAllocator::new(&be, sc.schedule, sc.betas.0, sc.betas.1, &names).unwrap();
    let t: Vec<[Tensor<Wgpu>; 6]> = sc
        .layers
        .iter()
        .enumerate()
        .map(|(i, &(_, r, din, dout))| {
            let shapes = [[r, din], [r, din], [dout, r], [dout, r], [r, 1], [r, 1]];
            std::array::from_fn(|k| {
                let s = &shapes[k];
                be.upload(&rand_vec(s[0] * s[1], (10 * i + k) as u64), s)
                    .unwrap()
            })
        })
        .collect();
    let mut es: Vec<Tensor<Wgpu>> = t.iter().map(|d| d[4].clone()).collect();
    let before = be.readbacks();
    for step in 1..=sc.steps {
        let mut views = twin::device_views(&sc, &mut es, &t);
        alloc.update_and_allocate(&be, step, &mut views).unwrap();
    }
    be.synchronize().unwrap();
    assert_eq!(be.readbacks(), before, "the allocator read something back");
    // The pattern, when asked for: one readback.
    assert!(alloc.rank_pattern(&be).unwrap().is_some());
    assert_eq!(be.readbacks(), before + 1);
}
