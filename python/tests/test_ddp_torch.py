"""lorafuse.torch layers under data parallelism on the CPU (gloo): a chain of LoraLinear,
DoraLinear, VeraLinear and AdaLoraLinear trained for 5 AdamW steps by 2 processes, each on its
half of a fixed batch, ends with the parameters (max abs diff <= 1e-6) of the same 5 steps on
the whole batch in one process; both ranks end identical; every parameter moved; and after the
steps each layer's forward is still a plain-torch composition of its current parameters
(atol 1e-5: nothing cached in the kernels goes stale).

Two launchers run ddp_worker.py: torchrun (``python -m torch.distributed.run --standalone``,
torch's DistributedDataParallel), and ``accelerate launch`` with ``Accelerator()`` /
``accelerator.prepare`` in accelerate's MULTI_CPU mode. In the torchrun run rank 1 first gets
different parameters and buffers (base weights included) and runs a forward that fills the
kernels' cache of the frozen base weights with them: DDP's initial broadcast of rank 0's state
must reach the kernels too.

accelerate 1.15 spawns several CPU processes only through ``mpirun`` (``--cpu`` /
``distributed_type: MULTI_CPU`` go to its single-process launcher unless ``--mpirun_hostfile``
is given; this torch has no MPI backend either). Its torchrun-based launcher (``--multi_gpu``)
with ``ACCELERATE_USE_CPU=true`` does give two processes in MULTI_CPU mode over gloo, which is
what the second test uses (and checks: the worker asserts ``distributed_type == MULTI_CPU``).

Needs torch and peft (see scripts/test-python-torch.sh), and accelerate for the second test;
skipped with the reason otherwise, a failure when LORAFUSE_REQUIRE contains `torch`.
"""

import os
import pathlib
import subprocess
import sys

import pytest

try:
    import peft  # noqa: F401  (the torch suite's requirement, as test_torch.py)
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    msg = f"torch/peft not importable ({e}); run `bash scripts/test-python-torch.sh`"
    if "torch" in os.environ.get("LORAFUSE_REQUIRE", ""):
        raise ImportError(f"LORAFUSE_REQUIRE=torch: {msg}") from e
    pytest.skip(msg, allow_module_level=True)

import ddp_worker as w

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "ddp_worker.py"
PARAM_ATOL = 1e-6
STALE_ATOL = 1e-5
TIMEOUT = 600


def _env(tmp_path):
    env = dict(os.environ)
    # 2 processes on a small machine: one thread each (torch and lorafuse's rayon pool).
    env.update(OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # No user-level accelerate config (it would change `accelerate launch`'s defaults).
    env["HF_HOME"] = str(tmp_path / "hf_home")
    return env


def _run(cmd, env, cwd):
    print("$", " ".join(cmd))
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    tail = "\n".join((p.stdout + p.stderr).splitlines()[-60:])
    print(tail)
    assert p.returncode == 0, f"exit {p.returncode}:\n{tail}"
    return p


def _maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def single_process():
    """The same 5 steps on the whole batch in this process, and the initial parameters."""
    model = w.Chain()
    init = w.trainable(model)
    x, y = w.batch()
    losses = w.train(model, w.optimizer(model), x, y)
    stale = w.stale(model, x)
    print(f"single process: losses {[round(v, 6) for v in losses]} stale {stale}")
    return {"init": init, "params": w.trainable(model), "losses": losses, "stale": stale}


def _check(tag, out_dir, ref):
    ranks = [torch.load(out_dir / f"{tag}_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    names = sorted(ref["params"])
    # What trains: LoRA A/B, DoRA A/B/magnitude, VeRA lambdas, AdaLoRA A/B/E, and the 4 base
    # biases (nn.Linear's bias requires grad; lorafuse.torch freezes only the weight): 14 tensors.
    assert len(names) == 14, names
    for r in ranks:
        assert sorted(r["params"]) == names
    # Every parameter moved, so a run that trains nothing cannot pass.
    for n in names:
        moved = _maxdiff(ref["params"][n], ref["init"][n])
        assert moved > 1e-3, f"{n} moved only {moved:.3g}"
    # Gradients reached DDP's all-reduce: the two ranks saw different halves, yet end equal.
    for n in names:
        d = _maxdiff(ranks[1]["params"][n], ranks[0]["params"][n])
        assert d == 0.0, f"{tag}: rank 1 and rank 0 differ on {n} by {d:.3g}"
    assert ranks[0]["losses"] != ranks[1]["losses"], "both ranks got the same rows"
    # ... and the data-parallel run is the whole-batch run.
    worst = 0.0
    for n in names:
        d = _maxdiff(ranks[0]["params"][n], ref["params"][n])
        print(f"  {tag} {n}: max abs diff vs single process {d:.3g}")
        worst = max(worst, d)
        assert d <= PARAM_ATOL, f"{tag}: {n} differs from the single-process run by {d:.3g}"
    # Rank losses average to the whole-batch loss at step 0 (same parameters, equal halves).
    step0 = (ranks[0]["losses"][0] + ranks[1]["losses"][0]) / 2
    assert abs(step0 - ref["losses"][0]) <= 1e-5 * max(1.0, abs(ref["losses"][0]))
    # After the optimizer steps, each layer's forward is its current parameters' composition.
    for where, stale in [("single process", ref["stale"])] + [(f"rank {r['rank']}", r["stale"]) for r in ranks]:
        assert sorted(stale) == ["adalora", "dora", "lora", "vera"]
        for layer, err in stale.items():
            assert err <= STALE_ATOL, f"{tag} {where}: {layer} forward vs plain torch {err:.3g}"
    print(f"{tag}: worst parameter diff vs single process {worst:.3g}, info {ranks[0]['info']}")
    return ranks


def test_torchrun_ddp_matches_single_process(single_process, tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        str(WORKER), "--launcher", "torchrun", "--out", str(tmp_path), "--desync-rank1",
    ]
    _run(cmd, _env(tmp_path), HERE)
    ranks = _check("torchrun", tmp_path, single_process)
    assert ranks[0]["info"]["backend"] == "gloo"


def test_accelerate_multi_cpu_matches_single_process(single_process, tmp_path):
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        msg = f"accelerate not importable ({e}); the torch suite's peers venv has it (scripts/setup-peers.sh)"
        if "torch" in os.environ.get("LORAFUSE_REQUIRE", ""):
            pytest.fail(f"LORAFUSE_REQUIRE=torch: {msg}")
        pytest.skip(msg)
    env = _env(tmp_path)
    # Accelerator() takes the CPU path (MULTI_CPU, gloo) from this, in every process.
    env["ACCELERATE_USE_CPU"] = "true"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0", "--num_cpu_threads_per_process", "1",
        str(WORKER), "--launcher", "accelerate", "--out", str(tmp_path),
    ]
    _run(cmd, env, HERE)
    ranks = _check("accelerate", tmp_path, single_process)
    info = ranks[0]["info"]
    assert info["distributed_type"] == "DistributedType.MULTI_CPU" and info["backend"] == "gloo", info
    assert info["wrapped"] == "DistributedDataParallel", info
