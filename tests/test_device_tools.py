"""--device in the tools (`minivit bench`, `predict`, `gradcheck`), on the strict CuPy stand-in.

Without a GPU, "gpu" is tests/strict_cupy.py (NumPy arrays that refuse implicit host conversion)
put in CuPy's place with backend.use_array_module_for_gpu: a command run with --device gpu then
does all its array work on "device" arrays, and must print what --device cpu prints. The stand-in
records every synchronisation asked of it, so a test can prove that bench's timer waits for the
device before each clock read. Where the GPU cannot be used, --device gpu is one clear line
that says why (backend.gpu_status()).
"""
import contextlib
import io
import types

import numpy as np
import pytest

import strict_cupy
from minivit import backend, bench
from minivit.cli import main
from minivit.config import get_model_preset
from minivit.ops import cross_entropy_backward, cross_entropy_forward

# A ViT small enough to check, train and time in milliseconds.
TINY_VIT = dict(img_size=8, dim=16, depth=1, heads=2, mlp_dim=24)


@pytest.fixture
def stand_in():
    """'gpu' means the strict stand-in inside the test; its record of synchronisations starts empty."""
    with backend.use_array_module_for_gpu(strict_cupy):
        del strict_cupy.synchronizations[:]
        yield strict_cupy


def run_cli(argv):
    """(exit code, stdout, stderr) of `minivit ARGV`, in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def no_gpu_here():
    if backend.gpu_available():
        pytest.skip("this machine has a usable GPU")


# ----------------------------------------------------------------------------- backend.synchronize

def test_synchronize_waits_for_the_device_and_is_a_no_op_on_the_cpu(stand_in):
    backend.synchronize("cpu")
    backend.synchronize(np.zeros(3))
    assert stand_in.synchronizations == []                    # NumPy has finished when it returns
    backend.synchronize("gpu")
    backend.synchronize(backend.to_device(np.zeros(3), "gpu"))
    assert stand_in.synchronizations == ["device 0", "device 0"]
    with pytest.raises(ValueError, match="device must be one of"):
        backend.synchronize("tpu")
    with pytest.raises(TypeError, match="'cpu', 'gpu' or an array, got list"):
        backend.synchronize([1.0])


def test_synchronize_on_a_gpu_that_cannot_be_used_says_why():
    no_gpu_here()
    with pytest.raises(RuntimeError, match="GPU cannot be used: .*" + "CuPy"):
        backend.synchronize("gpu")


# ----------------------------------------------------------------------------- bench: the timer

class Clock:
    """A stand-in for bench's `time` module whose clock reads are written into `log`."""

    def __init__(self, log):
        self.log, self.t = log, 0.0

    def perf_counter(self):
        self.log.append("clock")
        self.t += 1.0
        return self.t


def test_alternate_waits_for_each_device_right_before_every_clock_read(stand_in, monkeypatch):
    log = stand_in.synchronizations                 # the stand-in's waits and the clock, in one record
    monkeypatch.setattr(bench, "time", Clock(log))
    wait_torch = lambda: log.append("torch wait")   # noqa: E731  (torch.cuda.synchronize's place)
    ta, tb = bench.alternate(lambda: log.append("minivit step"), lambda: log.append("torch step"), 3, 1,
                             lambda: backend.synchronize("gpu"), wait_torch)
    assert len(ta) == len(tb) == 3 and all(t == 1.0 for t in ta + tb)
    timed = log[log.index("torch step") + 1:]       # after the warm-up pair
    assert timed[:2] == ["device 0", "torch wait"]  # the warm-up's queued work is done before timing starts
    # then per timed step: its framework's wait, clock, step, the same wait, clock; order a b, b a, a b
    a = ["device 0", "clock", "minivit step", "device 0", "clock"]
    b = ["torch wait", "clock", "torch step", "torch wait", "clock"]
    assert timed[2:] == a + b + b + a + a + b


def test_device_waits_are_no_ops_on_the_cpu_and_backend_synchronize_on_the_gpu(stand_in, torch):
    wait_minivit, wait_torch = bench.device_waits(torch, "cpu")
    wait_minivit()
    wait_torch()
    assert stand_in.synchronizations == []
    wait_minivit, wait_torch = bench.device_waits(torch, "gpu")
    wait_minivit()
    assert stand_in.synchronizations == ["device 0"]
    assert wait_torch is torch.cuda.synchronize      # the one CUDA branch: PyTorch's own wait


def test_profile_waits_for_the_device_before_every_clock_read(stand_in, monkeypatch):
    config = get_model_preset("cifar-lesson", **TINY_VIT)
    model, opt = bench.make_minivit(config, device="gpu")
    images, labels = (backend.to_device(a, "gpu") for a in bench.make_batch(config, 2))
    log = stand_in.synchronizations
    monkeypatch.setattr(bench, "time", Clock(log))
    rows = bench.profile_step(model, opt, images, labels, 1, lambda: backend.synchronize("gpu"))
    assert {"attn.qkv", "optimizer (AdamW)"} <= {label for label, _, _ in rows}
    reads = [i for i, what in enumerate(log) if what == "clock"]
    assert len(reads) > 20 and all(log[i - 1] == "device 0" for i in reads)


# ----------------------------------------------------------------------------- bench: the minivit side on the device

def test_bench_minivit_side_on_the_device_computes_what_it_computes_on_the_cpu(stand_in, torch):
    config = get_model_preset("cifar-lesson", **TINY_VIT)
    images, labels = bench.make_batch(config, 3)
    losses = {}
    for device in ("cpu", "gpu"):
        model, opt = bench.make_minivit(config, device=device)
        assert model.device == device
        # the twin stays on the CPU here (this PyTorch has no CUDA); check_same_function copies
        # each model's inputs and outputs where they need to be
        tmodel, _ = bench.make_torch(model, "cpu")
        assert bench.check_same_function(model, tmodel, images) < 1e-5
        x, y = backend.to_device(images, device), backend.to_device(labels, device)
        losses[device] = [bench.minivit_train_step(model, opt, x, y) for _ in range(3)]
        logits = bench.minivit_infer(model.eval(), x)
        assert backend.device_of(logits) == device
    np.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=1e-5)
    assert losses["cpu"][2] < losses["cpu"][0]                 # the steps train


def test_bench_gpu_needs_pytorch_with_cuda(stand_in, torch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this PyTorch has CUDA")
    with pytest.raises(RuntimeError, match=r"has no CUDA device \(torch.cuda.is_available\(\) is False\)"):
        bench.torch_device(torch, "gpu")
    assert bench.torch_device(torch, "cpu") == "cpu"
    code, _, err = run_cli(["bench", "--preset", "cifar-lesson", "--set", "img_size=8", "--set", "dim=16",
                            "--set", "depth=1", "--set", "heads=2", "--set", "mlp_dim=24", "--batch-size", "2",
                            "--steps", "1", "--warmup", "0", "--device", "gpu"])
    assert code == 2 and err.count("\n") == 1 and "install a CUDA build of PyTorch" in err


def test_tools_refuse_an_unusable_gpu_with_gpu_status(tmp_path, torch):
    no_gpu_here()
    status = backend.gpu_status()
    for argv in (["bench", "--device", "gpu"], ["gradcheck", "--device", "gpu"],
                 ["predict", "--weights", str(tmp_path / "none.npz"), str(tmp_path / "none.png"), "--device", "gpu"]):
        code, out, err = run_cli(argv)
        assert code == 2 and err.count("\n") == 1 and status in err, argv
        assert "GPU cannot be used" in err and out == ""        # refused before anything was built or read


def test_device_option_lists_cpu_and_gpu():
    for command in ("bench", "predict", "gradcheck"):
        with pytest.raises(SystemExit):
            run_cli([command, "--device", "tpu"])


# ----------------------------------------------------------------------------- gradcheck

def test_gradcheck_on_the_device_prints_what_it_prints_on_the_cpu(stand_in):
    from minivit.model import ViT

    argv = ["gradcheck", "--set", "img_size=8", "--set", "dim=32", "--set", "heads=2", "--set", "mlp_dim=64",
            "--samples", "2"]
    code_cpu, out_cpu, _ = run_cli(argv)
    calls = []
    real_forward = ViT.forward

    def forward(self, x, *args, **kwargs):   # record where each pass runs
        calls.append((backend.device_of(x), x.dtype))
        return real_forward(self, x, *args, **kwargs)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ViT, "forward", forward)
        code_gpu, out_gpu, _ = run_cli(argv + ["--device", "gpu"])
    assert code_cpu == code_gpu and "33 tensors checked, 2 entries each" in out_cpu
    head_cpu, *rows_cpu = out_cpu.splitlines()
    head_gpu, *rows_gpu = out_gpu.splitlines()
    assert head_gpu == head_cpu + " (float64 on the GPU)"
    assert rows_gpu == rows_cpu                       # every error, to the printed digit
    assert len(calls) > 50 and set(calls) == {("gpu", np.dtype(np.float64))}


# ----------------------------------------------------------------------------- predict

def test_predict_on_the_device_prints_what_it_prints_on_the_cpu(stand_in, tmp_path):
    from PIL import Image

    from minivit import ViT, ViTConfig
    from minivit.pretrained import save_pretrained

    model = ViT(ViTConfig(img_size=16, patch_size=4, num_classes=6, dim=16, depth=1, heads=2, mlp_dim=24), seed=1)
    for p in model.parameters():
        p.data *= 10.0                                 # sharper than at initialisation: distinct probabilities
    weights = save_pretrained(model, tmp_path / "m.safetensors", class_names=list("abcdef"))
    picture = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(picture)
    argv = ["predict", "--weights", str(weights), str(picture), str(picture), "--top", "4"]
    code_cpu, out_cpu, _ = run_cli(argv)
    code_gpu, out_gpu, _ = run_cli(argv + ["--device", "gpu"])
    assert code_cpu == code_gpu == 0 and out_gpu == out_cpu
    assert len(out_cpu.splitlines()) == 10 and len(set(out_cpu.splitlines()[1:5])) == 4


def test_predict_on_the_device_catches_non_finite_logits(stand_in, tmp_path):
    from PIL import Image

    from minivit import ViT, ViTConfig
    from minivit.pretrained import save_pretrained

    model = ViT(ViTConfig(img_size=8, patch_size=4, num_classes=3, dim=8, depth=1, heads=2, mlp_dim=8), seed=0)
    model.head.bias.data[...] = np.float32(3e38)
    model.head.weight.data[...] = np.float32(3e38)    # overflows float32 on the way out
    weights = save_pretrained(model, tmp_path / "m.safetensors")
    picture = tmp_path / "p.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(picture)
    code, _, err = run_cli(["predict", "--weights", str(weights), str(picture), "--device", "gpu"])
    assert code == 2 and "are not finite" in err
