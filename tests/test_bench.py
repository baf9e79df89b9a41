"""`minivit bench` on tiny models: the PyTorch twin computes minivit's function, and the
command runs end to end (timing, memory in subprocesses, profile, JSON)."""
import json

import numpy as np
import pytest

from minivit import ViT, get_preset, modules
from minivit.cli import main

TINY = ["--preset", "cifar-lesson", "--set", "img_size=8", "--set", "dim=16", "--set", "depth=1",
        "--set", "heads=2", "--set", "mlp_dim=24"]


@pytest.mark.parametrize("overrides", [
    {},
    dict(qkv_bias=False, gelu="tanh", pool="mean", pos_embed="sincos2d", ln_eps=1e-5),
    dict(pos_embed="none", dropout=0.1, drop_path=0.2),
])
def test_torch_twin_matches_minivit(torch, overrides):
    from minivit import bench

    config = get_preset("cifar-lesson", img_size=16, dim=24, depth=2, heads=3, mlp_dim=40, **overrides)
    model = ViT(config, seed=0)
    images, labels = bench.make_batch(config, 3)
    tmodel = bench.torch_twin(model)
    assert bench.check_same_function(model, tmodel, images) < 1e-5
    # and one training step gives the same loss and gradients (dropout off: eval-mode masks)
    model.eval()
    tmodel.eval()
    from minivit.ops import cross_entropy_backward, cross_entropy_forward

    logits = model(images)
    loss, cache = cross_entropy_forward(logits, labels)
    model.backward(cross_entropy_backward(cache))
    tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(images)), torch.from_numpy(labels))
    tloss.backward()
    assert abs(float(loss) - tloss.item()) < 1e-5
    tgrads = dict(tmodel.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, tgrads[name].grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)


def test_bench_command_runs(torch, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--batch-size", "2", "--steps", "2", "--warmup", "1", "--threads", "1",
                 "--profile", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("train step", "inference", "peak memory", "RSS growth", "traced peak", "attn.qkv", "optimizer"):
        assert expected in text
    result = json.loads(out.read_text())
    assert result["ops"] == "fast" and result["threads"] == 1
    for key in ("train", "infer"):
        assert result[key]["minivit_img_s"] > 0 and result[key]["torch_img_s"] > 0 and result[key]["ratio"] > 0
    for framework in ("minivit", "torch"):
        assert result["memory"][framework]["rss_growth"] > 0
    assert modules.get_ops_kind() == "fast"          # the command leaves the switch as it found it


def test_bench_reference_ops_without_memory(torch, capsys):
    assert main(["bench", *TINY, "--batch-size", "2", "--steps", "1", "--warmup", "0", "--ops", "reference",
                 "--no-memory", "--no-infer"]) == 0
    text = capsys.readouterr().out
    assert "ops=reference" in text and "peak memory" not in text and "inference" not in text
    assert modules.get_ops_kind() == "fast"


def test_bench_rejects_bad_arguments(torch, capsys):
    assert main(["bench", *TINY, "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main(["bench", *TINY, "--set", "num_classes=0", "--no-memory"]) == 2
    assert "num_classes" in capsys.readouterr().err
