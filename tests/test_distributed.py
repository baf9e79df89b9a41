"""Data-parallel training over MPI: `mpiexec -n 2` against one process, faults and signals.

Each test launches 2 ranks with MPICH's mpiexec, running this very file as a script (the
`__main__` part at the bottom): every rank trains a tiny ViT on a synthetic data set through
minivit.train, and writes a hash of its final weights to rank<r>.json in the run's directory. Every launch has a
timeout, so a hang fails the test instead of blocking CI.

Where mpi4py or mpiexec is missing these tests skip, unless CI or MINIVIT_REQUIRE_REFERENCE is
set (as .ci/run does), where they fail: CI must run them.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minivit import ViT, ViTConfig
from minivit.config import HybridConfig
from minivit import train as train_mod
from minivit.checkpoint import load_checkpoint
from minivit.data import CIFAR10
from minivit.train import Recipe, train

HERE = Path(__file__).resolve()
TIMEOUT = 120                                    # seconds for one mpiexec launch, start to end
# No dropout: with it the ranks draw their own masks, a different random draw than one process's.
CONFIG = ViTConfig(img_size=16, patch_size=4, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32)
# 40 training images in batches of 15: 3 steps per epoch (15, 15, 10), so rank 0 gets 7 of 15
# and rank 1 gets 8: uneven shards, whose gradients must be weighted by 7/15 and 8/15.
RECIPE = Recipe(epochs=2, batch_size=15, lr=3e-3, warmup=0.5, seed=3)
# A tiny hybrid ViT (two one-block ResNet stages, then one ViT block on their 8 x 8 map): its
# backbone's BatchNorm mixes the images of a batch, so 2 ranks must share its statistics.
HYBRID = HybridConfig(img_size=16, patch_size=1, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32,
                      backbone_block="basic", backbone_layers=(1, 1), backbone_widths=(4, 8), backbone_stem="cifar",
                      backbone_shortcut="A")
# The same through the command line (float32), with drop-path on: resuming must restore the masks.
CLI_ARGS = ["--preset", "cifar-lesson", "--set", "img_size=16", "--set", "dim=16", "--set", "depth=1",
            "--set", "heads=2", "--set", "mlp_dim=32", "--set", "drop_path=0.1",
            "--epochs", "2", "--batch-size", "15", "--lr", "3e-3", "--warmup", "0.5", "--log-every", "2"]


def synthetic_data():
    """uint8 images whose brightness depends on the class (as in test_train.py)."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 100, (n, 3, 16, 16)) + 15 * labels[:, None, None, None]
        return images.astype(np.uint8), labels.astype(np.int64)
    return CIFAR10(*split(40), *split(24), classes=[f"class{k}" for k in range(10)])


def use_synthetic_data(patch):
    """The command line loads synthetic_data() instead of CIFAR-10 (patch: monkeypatch.setattr or setattr)."""
    data = synthetic_data()
    patch(train_mod, "find_cifar10", lambda path=None, download=True: "synthetic")
    patch(train_mod, "load_cifar10", lambda path, limit=None: data)


def mpiexec():
    """The MPI launcher beside this Python (the mpich wheel puts it there), or on the PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@pytest.fixture(scope="module")
def launcher():
    problems = []
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        problems.append(f"mpi4py does not import ({exc})")
    if not mpiexec():
        problems.append("no mpiexec")
    if problems:
        message = "; ".join(problems) + ' (pip install -e ".[mpi]")'
        if os.environ.get("CI") or os.environ.get("MINIVIT_REQUIRE_REFERENCE"):
            pytest.fail(f"the MPI tests must run in CI, but: {message}")
        pytest.skip(message)
    return mpiexec()


def launch(launcher, spec, ranks=2, wait=True):
    """Start `mpiexec -n ranks python THIS_FILE SPEC`; with wait, return (returncode, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "MINIVIT_MPI"}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MINIVIT_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [launcher, "-n", str(ranks), sys.executable, str(HERE), json.dumps(spec)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=HERE.parents[1])
    return finish(proc) if wait else proc


def finish(proc):
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)          # hydra: the first Ctrl-C is passed on, the second aborts
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"mpiexec did not finish within {TIMEOUT} s (a hang)\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def rank_reports(directory, ranks=2):
    return [json.loads((Path(directory) / f"rank{r}.json").read_text()) for r in range(ranks)]


def weights(out_dir):
    state, optim_state, meta = load_checkpoint(Path(out_dir) / "checkpoint.npz")
    return state, meta


def assert_close_runs(dir_a, dir_b, rtol):
    state_a, meta_a = weights(dir_a)
    state_b, meta_b = weights(dir_b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        np.testing.assert_allclose(state_a[name], state_b[name], rtol=rtol, atol=rtol * 1e-2, err_msg=name)
    for row_a, row_b in zip(meta_a["metrics"], meta_b["metrics"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-9), key


def assert_same_weights(dir_a, dir_b):
    state_a, _ = weights(dir_a)
    state_b, _ = weights(dir_b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert np.array_equal(state_a[name], state_b[name]), f"{name} differs"


def wait_for(path, proc):
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            code, out, err = finish(proc)
            pytest.fail(f"{path.name} never appeared (exit {code})\nstdout:\n{out}\nstderr:\n{err}")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- equivalence

def test_two_ranks_match_one_process_and_each_other(launcher, tmp_path, capsys):
    """6 steps of AdamW in float64 on uneven shards, clipping on: K = 2 ends where K = 1 ends, but
    for the order in which the gradient's terms are summed; both ranks hold the same weights, bit
    for bit; the checkpoint records the number of ranks."""
    train(CONFIG, synthetic_data(), RECIPE, tmp_path / "one", dtype=np.float64)
    code, out, err = launch(launcher, {"mode": "train", "out": str(tmp_path / "two")})
    assert code == 0, err
    # The weights are of order 1; summed in another order, float64 rounding (1e-16) moved them by
    # at most 6e-15 after 6 steps (measured), so 1e-12 is tight. A gradient weighted wrongly (the
    # plain mean of the two shards' means, 7 and 8 images) moves them by 4e-3 (tried).
    assert_close_runs(tmp_path / "one", tmp_path / "two", rtol=1e-10)
    ranks = rank_reports(tmp_path / "two")
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert [r["status"] for r in ranks] == ["finished", "finished"]
    assert weights(tmp_path / "two")[1]["ranks"] == 2 and weights(tmp_path / "one")[1]["ranks"] == 1
    assert out.count("minivit train") == 1                        # rank 0 alone prints
    assert "ranks   2 processes (MPI), data parallel: 7-8 of the 15 images of each batch per rank" in out


def test_two_ranks_train_batchnorm_as_one_process(launcher, tmp_path):
    """The hybrid's backbone BatchNorm on the same uneven shards (7 and 8 of 15 images): its
    statistics are summed over the ranks (SyncBatchNorm), so 2 ranks end where 1 process ends,
    weights and running averages alike, and test as it does; both ranks hold the same state (the
    digest covers the buffers). Measured: 2e-14 at most. Normalising each shard by its own
    statistics instead (no sync) moves the weights by up to 0.02 and the running averages by
    0.03-0.04, and the two ranks' running averages differ (tried)."""
    train(HYBRID, synthetic_data(), RECIPE, tmp_path / "one", dtype=np.float64)
    code, out, err = launch(launcher, {"mode": "train", "model": "hybrid", "out": str(tmp_path / "two")})
    assert code == 0, err
    assert_close_runs(tmp_path / "one", tmp_path / "two", rtol=1e-10)
    state, _ = weights(tmp_path / "two")
    assert any(name.endswith("running_var") for name in state)
    ranks = rank_reports(tmp_path / "two")
    assert ranks[0]["digest"] == ranks[1]["digest"]


# ----------------------------------------------------------------------------- faults

def test_an_error_on_one_rank_stops_all_with_its_message_and_keeps_the_checkpoint(launcher, tmp_path, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    # Rank 1 raises in its 5th training step (epoch 2, step 2), after epoch 1 was saved.
    started = time.monotonic()
    code, stdout, err = launch(launcher, {"mode": "cli", "out": str(out), "args": CLI_ARGS + ["--out", str(out)],
                                          "fail": [1, 5]})
    assert time.monotonic() - started < TIMEOUT
    assert code == 2, (stdout, err)                               # RuntimeError: like minivit.cli's exit 2
    assert "minivit train: error: rank 1: injected fault in step 5" in err
    assert "epoch 1/2 |" in stdout and "epoch 2/2 |" not in stdout
    # The last checkpoint is whole, and the run resumes from it (here in one process).
    state, meta = weights(out)
    assert meta["epoch"] == 1 and meta["progress"] is None
    use_synthetic_data(monkeypatch.setattr)
    from minivit.cli import main
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert "(resumed after epoch 1)" in capsys.readouterr().out
    assert weights(out)[1]["epoch"] == 2


# ----------------------------------------------------------------------------- signals

def test_sigterm_to_mpiexec_stops_every_rank_after_the_same_saved_step(launcher, tmp_path):
    """SIGTERM to the launcher (Slurm, docker stop, kill): hydra passes it to every rank; they stop
    after the same step, rank 0 saves, the exit code is 143. Resumed with 2 ranks, the run ends
    with the same weights, bit for bit (drop-path on), as a run that was never stopped."""
    whole = tmp_path / "whole"
    code, _, err = launch(launcher, {"mode": "cli", "out": str(whole), "args": CLI_ARGS + ["--out", str(whole)]})
    assert code == 0, err

    out, ready = tmp_path / "run", tmp_path / "ready"
    # From its 2nd training step on, each step takes 0.3 s longer: time for the signal to arrive.
    proc = launch(launcher, {"mode": "cli", "out": str(out), "args": CLI_ARGS + ["--out", str(out)],
                             "ready": [2, str(ready)], "slow_from": 2}, wait=False)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGTERM)
    code, stdout, err = finish(proc)
    assert code == 143, (stdout, err)
    assert stdout.count("SIGTERM: stopping after this step") == 1          # rank 0's, alone
    assert stdout.count("stopped at epoch 1, step") == 1
    ranks = rank_reports(out)
    assert [r["status"] for r in ranks] == ["interrupted", "interrupted"]
    assert ranks[0]["digest"] == ranks[1]["digest"]                          # stopped after the same step
    step = weights(out)[1]["progress"]["step"]
    assert step in (2, 3)                 # the signal comes in step 2, or in 3 on a busy machine

    code, stdout, err = launch(launcher, {"mode": "cli", "out": str(out), "args": ["--resume", "--out", str(out)]})
    assert code == 0, err
    assert f"(resumed in epoch 1, after step {step})" in stdout
    assert_same_weights(whole, out)


def test_a_signal_to_one_rank_stops_both_after_the_same_step_and_resumes_with_one(launcher, tmp_path):
    """SIGTERM to rank 1 alone: the ranks agree on the stop (a tiny all-reduce each step), so
    neither waits for the other forever. The 2-rank checkpoint then resumes in one process and
    ends where an uninterrupted 1-process run ends, within float64 rounding."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    proc = launch(launcher, {"mode": "train", "out": str(out), "ready": [2, str(ready)], "slow_from": 2},
                  wait=False)
    wait_for(ready, proc)
    os.kill(json.loads(ready.read_text())["pids"][1], signal.SIGTERM)
    code, stdout, err = finish(proc)
    assert code == 143, (stdout, err)
    ranks = rank_reports(out)
    assert [r["status"] for r in ranks] == ["interrupted", "interrupted"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert weights(out)[1]["ranks"] == 2

    train(CONFIG, synthetic_data(), RECIPE, out, resume=True, dtype=np.float64)      # K = 1 goes on
    train(CONFIG, synthetic_data(), RECIPE, tmp_path / "one", dtype=np.float64)
    assert_close_runs(tmp_path / "one", out, rtol=1e-10)


def test_a_one_process_checkpoint_resumes_on_two_ranks(launcher, tmp_path, monkeypatch):
    """The other way round: stopped in one process (SIGTERM in step 4), resumed by 2 ranks."""
    calls = [0]

    class StopInStep4(ViT):
        def forward(self, x):
            if self.training:
                calls[0] += 1
                if calls[0] == 4:
                    signal.raise_signal(signal.SIGTERM)
            return super().forward(x)
    with monkeypatch.context() as m:
        m.setattr(train_mod, "ViT", StopInStep4)
        result = train(CONFIG, synthetic_data(), RECIPE, tmp_path / "run", dtype=np.float64)
    assert result.exit_code == 143 and weights(tmp_path / "run")[1]["progress"]["step"] == 1
    code, stdout, err = launch(launcher, {"mode": "train", "out": str(tmp_path / "run"), "resume": True})
    assert code == 0, err
    assert "the run was saved by 1 rank and goes on with 2" in stdout
    train(CONFIG, synthetic_data(), RECIPE, tmp_path / "one", dtype=np.float64)
    assert_close_runs(tmp_path / "one", tmp_path / "run", rtol=1e-10)


def test_an_experiment_under_mpiexec_trains_each_run_with_both_ranks(launcher, tmp_path):
    """`mpiexec -n 2 python -m minivit.experiments ...`: rank 0 takes a run's lock for both ranks,
    both train it together (the checkpoint says 2 ranks; the same weights on both) and the lock
    is gone after; a run whose lock a live process holds is skipped by both ranks alike (a rank
    that went ahead alone would hang in the first all-reduce, and the launch would time out)."""
    from minivit import experiments as ex
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    locked = ex.Run("tiny", {"seed": 4}, CONFIG.to_dict(), {**RECIPE.to_dict(), "seed": 4})
    (runs_dir / f"{locked.name}.lock").write_text(str(os.getpid()))        # this live test process holds it
    code, out, err = launch(launcher, {"mode": "experiment", "out": str(runs_dir)})
    assert code == 0, err
    reports = rank_reports(runs_dir)
    assert reports[0] == reports[1]                                  # same statuses, same final weights
    assert reports[0]["statuses"] == ["finished", None]
    free_name = reports[0]["names"][0]
    state, optim_state, meta = load_checkpoint(runs_dir / free_name / "checkpoint.npz")
    assert meta["ranks"] == 2 and len(meta["metrics"]) == RECIPE.epochs
    assert not (runs_dir / f"{free_name}.lock").exists()              # released by rank 0
    assert (runs_dir / f"{locked.name}.lock").exists() and not (runs_dir / locked.name).exists()


def test_too_many_ranks_for_the_last_batch_is_refused_by_rank_0(launcher, tmp_path):
    """Every rank needs at least one image of every batch: 40 images in batches of 13 leave 1 at the end."""
    out = tmp_path / "run"
    code, stdout, err = launch(launcher, {"mode": "cli", "out": str(out),
                                          "args": CLI_ARGS + ["--batch-size", "13", "--out", str(out)]})
    assert code == 2
    assert "2 ranks need at least 2 images in every batch" in err and "the last batch of an epoch" in err


def test_without_a_launcher_mpi4py_is_never_imported():
    """A plain `minivit train` needs no MPI: without a launcher's variables, init() gives Single."""
    from minivit import distributed
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARIABLES + ("MINIVIT_MPI",)}
    code = ("import sys; from minivit import distributed, train; c = distributed.init(); "
            "print(type(c).__name__, c.rank, c.size, 'mpi4py' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["Single", "0", "1", "False"], done.stderr


def test_sum_gradients_all_reduces_the_optimizers_flat_gradient_where_it_is():
    """With the parameters packed by an optimiser and every gradient in place (as a backward pass
    leaves them), the one all-reduce runs on the optimiser's own flat gradient buffer, scaled in
    place, and every p.grad stays its view into it, ready for the flat step; with a gradient assigned
    by hand it goes through the communicator's own buffer as before. A stand-in all-reduce doubles
    its buffer, as two ranks with the same gradients would sum them."""
    from minivit.distributed import MPIComm
    from minivit.modules import Parameter
    from minivit.optim import SGD

    calls = []
    comm = MPIComm.__new__(MPIComm)              # no MPI: only the packing around the all-reduce is tested
    comm._flat, comm._nccl = None, None
    comm._allreduce_ = lambda flat: (calls.append(flat), flat.__imul__(2))
    rng = np.random.default_rng(0)
    params = [Parameter(rng.standard_normal(s)) for s in [(3, 2), (4,), (2, 2, 2)]]
    grads = [rng.standard_normal(p.shape) for p in params]
    SGD(params, lr=0.1)                          # packs them
    for p, g in zip(params, grads):
        p.accumulate(g)
    comm.sum_gradients(params, 0.25)
    (flat,) = calls
    assert flat is params[0]._slot[0].grad
    for p, g in zip(params, grads):
        assert p.grad is p._slot[2]
        np.testing.assert_array_equal(p.grad, g * 0.25 * 2)

    calls.clear()
    params[1].grad = grads[1].copy()             # by hand: not in the flat buffer
    comm.sum_gradients(params, 0.5)
    (flat,) = calls
    assert flat is comm._flat and flat is not params[0]._slot[0].grad
    np.testing.assert_array_equal(params[1].grad, grads[1] * 0.5 * 2)
    np.testing.assert_array_equal(params[0].grad, grads[0] * 0.25 * 2 * 0.5 * 2)


# ----------------------------------------------------------------------------- one rank, as a script

def _rank_main(spec):
    """What each rank runs: train() (float64) or the command line (float32) on synthetic_data(),
    with a ViT that can fail or be slowed down in a given training step; then rank<r>.json."""
    from minivit import distributed
    comm = distributed.init()
    out = Path(spec["out"])
    models, steps = [], [0]

    class Scripted(ViT):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            models.append(self)

        def forward(self, x):
            if self.training:
                steps[0] += 1
                if spec.get("fail") == [comm.rank, steps[0]]:
                    raise RuntimeError(f"injected fault in step {steps[0]}")
                if spec.get("ready") and spec["ready"][0] == steps[0]:
                    pids = comm.comm.allgather(os.getpid())     # both ranks are in this step
                    if comm.rank == 0:
                        Path(spec["ready"][1]).write_text(json.dumps({"pids": pids}))
                if spec.get("slow_from") and steps[0] >= spec["slow_from"]:
                    time.sleep(0.3)
            return super().forward(x)
    train_mod.ViT = Scripted
    config = CONFIG
    if spec.get("model") == "hybrid":
        config, build = HYBRID, train_mod.build_model
        train_mod.build_model = lambda *args, **kwargs: models.append(build(*args, **kwargs)) or models[-1]
    if spec["mode"] == "experiment":
        _experiment_main(spec, comm, models)
    if spec["mode"] == "train":
        result = train(config, synthetic_data(), RECIPE, out, resume=spec.get("resume", False), dtype=np.float64)
        status, code = result.status, result.exit_code
    else:
        from minivit.cli import main
        use_synthetic_data(lambda module, name, value: setattr(module, name, value))
        results = []
        real_train = train_mod.train
        train_mod.train = lambda *args, **kwargs: results.append(real_train(*args, **kwargs)) or results[-1]
        code = main(["train", *spec["args"]])
        status = results[-1].status if results else "error"
    digest = hashlib.sha256()
    for name, value in models[-1].state_dict().items():
        digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
    report = {"status": status, "exit_code": code, "digest": digest.hexdigest()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{comm.rank}.json").write_text(json.dumps(report))
    sys.exit(code)


def _experiment_main(spec, comm, models):
    """minivit.experiments.execute on every rank: the run that is free trained by both ranks
    together, the one whose lock a live process holds skipped by both."""
    from minivit import experiments as ex
    runs_dir = Path(spec["out"])
    free, locked = (ex.Run("tiny", {"seed": seed}, CONFIG.to_dict(), {**RECIPE.to_dict(), "seed": seed})
                    for seed in (3, 4))
    statuses = []
    for run in (free, locked):
        result = ex.execute(run, synthetic_data(), runs_dir)
        statuses.append(None if result is None else result.status)
    digest = hashlib.sha256()
    for name, value in models[-1].state_dict().items():
        digest.update(name.encode() + np.ascontiguousarray(value).tobytes())
    report = {"statuses": statuses, "digest": digest.hexdigest(), "names": [free.name, locked.name]}
    (runs_dir / f"rank{comm.rank}.json").write_text(json.dumps(report))
    sys.exit(0)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    _rank_main(json.loads(sys.argv[1]))
