"""One trainer for every model: `minivit train` and `minivit eval` on a ResNet and on the hybrid
ViT (through the CLI, on test_train.py's synthetic 16 x 16 data), exact resume with BatchNorm's
running averages and SGD's momentum, the step schedule's learning rates against a list worked out
by hand, the weight decay groups, the model kind in checkpoints (and files without one: ViTs), and
clear errors.
"""
import signal

import numpy as np
import pytest
from test_train import assert_same_run, fake_cifar, rewrite_meta, synthetic_data  # noqa: F401 (fixture)

from minivit import model as model_mod
from minivit import train as train_mod
from minivit.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from minivit.cli import main
from minivit.config import HybridConfig, ViTConfig
from minivit.model import HybridViT, build_model
from minivit.optim import SGD, AdamW
from minivit.resnet import ResNet, ResNetConfig
from minivit.train import RECIPE, Recipe, make_optimizer, read_metrics_csv, train

# Two stages of one block each: 16 -> 16 -> 8; a hybrid's map is then 8 x 8 = 64 tokens + [CLS].
RESNET = ResNetConfig(block="basic", layers=(1, 1), widths=(4, 8), stem="cifar", shortcut="A", num_classes=10,
                      img_size=16)
HYBRID = HybridConfig(img_size=16, patch_size=1, num_classes=10, dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.1,
                      backbone_block="basic", backbone_layers=(1, 1), backbone_widths=(4, 8), backbone_stem="cifar",
                      backbone_shortcut="A")
RESNET_ARGS = ["--preset", "resnet20", "--set", "img_size=16", "--set", "layers=1,1", "--set", "widths=4,8"]
HYBRID_ARGS = ["--preset", "cifar-hybrid", "--set", "img_size=16", "--set", "dim=16", "--set", "depth=1",
               "--set", "heads=2", "--set", "mlp_dim=32", "--set", "dropout=0.1", "--set", "backbone_layers=1,1",
               "--set", "backbone_widths=4,8"]
# 40 training images in batches of 16: 3 steps per epoch, 6 in all; the lr steps down twice.
SGD_ARGS = ["--epochs", "2", "--batch-size", "16", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "step",
            "--warmup", "0.5", "--nesterov", "--log-every", "0"]
SGD_RECIPE = Recipe(epochs=2, batch_size=16, lr=0.05, weight_decay=1e-4, warmup=0.5, optimizer="sgd",
                    nesterov=True, schedule="step")
ADAMW_RECIPE = Recipe(epochs=2, batch_size=16, lr=3e-3, warmup=0.5, seed=3)


@pytest.fixture
def no_curves(monkeypatch):
    """Skip drawing curves.png (matplotlib: a third of a tiny run's time); the tests that look
    for it do not use this."""
    monkeypatch.setattr(train_mod, "plot_curves", lambda path, history, label_smoothing=0.0: None)


def ctrl_c_at_training_forward(kind, n, monkeypatch):
    """build_model makes a model of `kind` that sends itself a Ctrl-C in its n-th training forward pass."""
    base = model_mod.MODEL_CLASSES[kind]
    calls = [0]

    class Stopping(base):
        def forward(self, x, *args):
            out = super().forward(x, *args)
            if self.training:
                calls[0] += 1
                if calls[0] == n:
                    signal.raise_signal(signal.SIGINT)
            return out
    monkeypatch.setitem(model_mod.MODEL_CLASSES, kind, Stopping)


# ============================================================================= through the CLI

@pytest.mark.parametrize("args, kind, cls", [(RESNET_ARGS, "resnet", ResNetConfig), (HYBRID_ARGS, "hybrid", HybridConfig)],
                         ids=["resnet", "hybrid"])
def test_cli_trains_stops_resumes_bit_exact_and_evaluates(tmp_path, monkeypatch, capsys, fake_cifar, args, kind, cls):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["train", *args, *SGD_ARGS, "--out", str(straight)]) == 0
    assert (straight / "curves.png").exists()
    monkeypatch.setattr(train_mod, "plot_curves", lambda path, history, label_smoothing=0.0: None)   # time
    with monkeypatch.context() as m:
        ctrl_c_at_training_forward(kind, 5, m)                       # in epoch 2, step 2: saved after it
        assert main(["train", *args, *SGD_ARGS, "--out", str(stopped)]) == 130
    state, optim_state, meta = load_checkpoint(stopped / "checkpoint.npz")
    assert (meta["model"], meta["epoch"], meta["progress"]["step"]) == (kind, 1, 2)
    assert optim_state["optimizer"] == "SGD"
    assert main(["train", "--resume", "--out", str(stopped)]) == 0
    assert_same_run(straight, stopped)                               # weights, buffers, momentum, rng, metrics

    state, optim_state, meta = load_checkpoint(straight / "checkpoint.npz")
    config = checkpoint_config(meta)
    assert type(config) is cls and meta["recipe"]["optimizer"] == "sgd" and meta["recipe"]["nesterov"] is True
    means = [k for k in state if k.endswith("running_mean")]
    assert means and all(int(state[k.replace("running_mean", "num_batches_tracked")]) == 6 for k in means)
    assert not np.allclose(state[means[0]], 0)                       # the averages were trained and saved
    assert any(k.startswith("momentum_buffer.") for k in optim_state)
    rows = read_metrics_csv(straight / "metrics.csv")
    assert len(rows) == 2 and (straight / "best.npz").exists()

    capsys.readouterr()
    assert main(["eval", str(straight / "checkpoint.npz")]) == 0
    assert f"test acc {rows[-1]['test_acc']:.4f}" in capsys.readouterr().out


def test_sgd_defaults_come_from_the_resnet_paper(tmp_path, capsys, fake_cifar, no_curves):
    out = tmp_path / "run"
    assert main(["train", *RESNET_ARGS, "--optimizer", "sgd", "--epochs", "1", "--batch-size", "16",
                 "--warmup", "0", "--log-every", "0", "--out", str(out)]) == 0
    recipe = load_checkpoint(out / "checkpoint.npz")[2]["recipe"]
    assert (recipe["lr"], recipe["weight_decay"], recipe["clip_grad"], recipe["momentum"], recipe["nesterov"]) == \
           (0.1, 1e-4, 0.0, 0.9, False)
    assert "optimizer=sgd" in capsys.readouterr().out


# ============================================================================= the learning rate and the optimiser

def test_step_schedule_learning_rates_by_hand(tmp_path, monkeypatch, no_curves):
    """6 steps, warmup 0.5 epoch = round(1.5) = 2 steps, milestones 0.5 and 0.75 of 6 steps =
    steps 3 and round(4.5) = 4 (round half to even): lr 0.05 * [1/2, 1, 1, 1/10, 1/100, 1/100]."""
    seen = []

    class RecordingSGD(SGD):
        def step(self):
            seen.append(self.lr)
            super().step()
    monkeypatch.setattr(train_mod, "SGD", RecordingSGD)
    result = train(RESNET, synthetic_data(), SGD_RECIPE, tmp_path)
    np.testing.assert_allclose(seen, [0.025, 0.05, 0.05, 0.005, 0.0005, 0.0005], rtol=1e-12)
    assert [row["lr"] for row in result.history] == [seen[2], seen[5]]          # the last lr of each epoch
    # the cosine schedule of the same run: warmup, then 0.05 * (1 + cos(pi * k / 4)) / 2 for k = 0..3
    seen.clear()
    train(RESNET, synthetic_data(), SGD_RECIPE.replace(schedule="cosine"), tmp_path / "cosine")
    cosine = [0.025, 0.05] + [0.05 * (1 + np.cos(np.pi * k / 4)) / 2 for k in range(4)]
    np.testing.assert_allclose(seen, cosine, rtol=1e-12)


def test_weight_decay_groups_know_batchnorm():
    """Decayed: convolution kernels and weight matrices only; never BatchNorm's scale and shift,
    biases, positions or [CLS]; the hybrid's backbone likewise."""
    for model in (ResNet(RESNET), HybridViT(HYBRID.replace(pos_embed="learned"))):
        optimizer = make_optimizer(model, SGD_RECIPE.replace(weight_decay=0.01))
        assert type(optimizer) is SGD and optimizer.momentum == 0.9 and optimizer.nesterov
        names = {id(p): name for name, p in model.named_parameters()}
        decay = {names[id(p)]: wd for p, wd in zip(optimizer.params, optimizer.weight_decays)}
        assert sorted(decay) == sorted(names.values())
        kernels = {name for name in names.values()
                   if name.endswith(("conv1.weight", "conv2.weight", "downsample.0.weight", "fc.weight", "qkv.weight",
                                     "proj.weight", "fc1.weight", "fc2.weight", "head.weight"))}
        assert any(".bn1." in n or n.startswith(("bn1", "patch_embed.backbone.bn1")) for n in decay)
        assert decay == {name: 0.01 if name in kernels else 0.0 for name in names.values()}, model
    assert type(make_optimizer(ResNet(RESNET), RECIPE)) is AdamW                    # the default stays AdamW


def test_recipe_defaults_are_unchanged_and_new_fields_validated():
    assert (RECIPE.optimizer, RECIPE.schedule, RECIPE.momentum, RECIPE.nesterov, RECIPE.milestones) == \
           ("adamw", "cosine", 0.9, False, (0.5, 0.75))
    assert Recipe(milestones=[0.3]).milestones == (0.3,)                        # a list from JSON
    for change, message in [({"optimizer": "adam"}, "--optimizer must be one of adamw, sgd, got 'adam'"),
                            ({"schedule": "linear"}, "--schedule must be one of cosine, step"),
                            ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
                            ({"momentum": 0.0, "nesterov": True}, "--nesterov needs a --momentum above 0"),
                            ({"milestones": (0.75, 0.5)}, "--milestones must be increasing fractions"),
                            ({"milestones": (0.5, 1.0)}, "--milestones must be increasing fractions")]:
        with pytest.raises(ValueError, match=message):
            Recipe(**change)


# ============================================================================= checkpoints: the model kind

@pytest.mark.parametrize("config, kind", [(RESNET, "resnet"), (HYBRID, "hybrid"),
                                          (ViTConfig(img_size=16, patch_size=4, num_classes=10, dim=8, depth=1, heads=2),
                                           "vit")])
def test_checkpoint_records_the_kind_and_rebuilds_the_model(tmp_path, config, kind):
    model = build_model(config, seed=2)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    model(x)                                                             # moves BatchNorm's averages
    optimizer = make_optimizer(model, SGD_RECIPE)
    save_checkpoint(tmp_path / "c.npz", model, optimizer, 1, {})
    state, optim_state, meta = load_checkpoint(tmp_path / "c.npz")
    assert meta["model"] == kind and checkpoint_config(meta) == config
    assert list(state) == list(model.state_dict())
    again = build_model(checkpoint_config(meta), seed=9)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.eval()(x), model.eval()(x))


def test_a_checkpoint_without_a_kind_is_a_vit_and_still_resumes_and_evaluates(tmp_path, capsys, fake_cifar, no_curves):
    """The format before kinds (and the new recipe fields) were recorded: meta.json without
    "model", a recipe without optimizer/momentum/nesterov/schedule/milestones."""
    out = tmp_path / "old"
    vit_args = ["--preset", "cifar-lesson", "--set", "img_size=16", "--set", "dim=16", "--set", "depth=1",
                "--set", "heads=2", "--set", "mlp_dim=32"]
    assert main(["train", *vit_args, "--epochs", "1", "--batch-size", "16", "--warmup", "0.5", "--log-every", "0",
                 "--out", str(out)]) == 0
    new_fields = ("optimizer", "momentum", "nesterov", "schedule", "milestones")

    def make_old(meta):
        del meta["model"]
        meta["recipe"] = {k: v for k, v in meta["recipe"].items() if k not in new_fields}
    for name in ("checkpoint.npz", "best.npz"):
        rewrite_meta(out / name, make_old)
    capsys.readouterr()
    assert main(["eval", str(out / "best.npz")]) == 0
    assert "test acc" in capsys.readouterr().out
    # the run, had it been started for 2 epochs: resumed in the old format, it goes on as a ViT
    rewrite_meta(out / "checkpoint.npz", lambda meta: meta["recipe"].update(epochs=2))
    assert main(["train", "--resume", "--out", str(out), "--optimizer", "adamw"]) == 0      # the same: accepted
    meta = load_checkpoint(out / "checkpoint.npz")[2]
    assert meta["epoch"] == 2 and meta["model"] == "vit" and meta["recipe"]["optimizer"] == "adamw"


def test_resume_refuses_another_kind_of_model(tmp_path, no_curves):
    train(RESNET, synthetic_data(), ADAMW_RECIPE.replace(epochs=1), tmp_path)
    with pytest.raises(ValueError, match="model differs \\(saved a resnet, given a hybrid\\)"):
        train(HYBRID, synthetic_data(), ADAMW_RECIPE.replace(epochs=1), tmp_path, resume=True)


def test_a_resnet_checkpoint_is_checked_before_anything_is_built(tmp_path, monkeypatch, capsys, no_curves):
    train(RESNET, synthetic_data(), ADAMW_RECIPE.replace(epochs=1), tmp_path)
    rewrite_meta(tmp_path / "checkpoint.npz", lambda meta: meta["config"].update(layers=[10**9, 1]))
    def refuse_to_build(*args, **kwargs):
        raise AssertionError("the ResNet was built before the file's weights were checked against its config")
    monkeypatch.setitem(model_mod.MODEL_CLASSES, "resnet", refuse_to_build)
    assert main(["eval", str(tmp_path / "checkpoint.npz")]) == 2
    assert "the config has 1000000001 residual blocks (layers=(1000000000, 1)), the weights 2" in \
           capsys.readouterr().err
    rewrite_meta(tmp_path / "checkpoint.npz", lambda meta: meta["config"].update(layers=[1, 1], widths=[4, 16]))
    assert main(["eval", str(tmp_path / "checkpoint.npz")]) == 2
    assert "'model/layer2.0.conv1.weight' has shape (8, 4, 3, 3)" in capsys.readouterr().err


# ============================================================================= clear errors

@pytest.mark.parametrize("args, message", [
    (["--preset", "resnet21"], "unknown preset 'resnet21'; known presets: vit: vit-ti16"),
    (["--preset", "resnet21"], "hybrid: r50-vit-b16, cifar-hybrid; resnet: resnet20"),
    (["--preset", "resnet20", "--set", "depth=3"], "unknown config option 'depth' of a resnet model (ResNetConfig)"),
    (["--preset", "cifar-hybrid", "--set", "layers=1,1"], "unknown config option 'layers' of a hybrid model"),
    (["--preset", "resnet20", "--set", "layers=2,x"], "'2,x' is not a valid value for layers (expected integers "
                                                      "separated by commas)"),
    (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only (the optimizer is adamw)"),
    (["--optimizer", "sgd", "--milestones", "0.5"], "--milestones applies to --schedule step only"),
    (["--schedule", "step", "--milestones", "0.5,x"], "--milestones takes fractions separated by commas"),
    (["--schedule", "step", "--milestones", "0.9,0.5"], "--milestones must be increasing fractions"),
])
def test_cli_errors_name_the_kind_and_the_option(tmp_path, capsys, fake_cifar, args, message):
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minivit train: error: "), err
    assert message in err[0]


def test_init_refuses_a_resnet_run(tmp_path, capsys, fake_cifar, no_curves):
    train(RESNET, synthetic_data(), ADAMW_RECIPE.replace(epochs=1), tmp_path / "resnet")
    assert main(["train", "--init", str(tmp_path / "resnet" / "checkpoint.npz"), "--out", str(tmp_path / "ft")]) == 2
    assert "holds a resnet model; --init starts ViTs from ViT weights" in capsys.readouterr().err


def test_minivit_train_without_a_preset_trains_the_recipes_hybrid(tmp_path, monkeypatch, capsys):
    """`minivit train` with no --preset trains the recipe's model (README "Training on CIFAR-10"): the
    hybrid cifar-hybrid, with the recipe's settings for everything not given."""
    from minivit.config import get_model_preset
    from minivit.data import synthetic_cifar10
    data = synthetic_cifar10(n_train=64, n_test=32, seed=0)
    monkeypatch.setattr(train_mod, "find_cifar10", lambda path=None, download=True: "synthetic")
    monkeypatch.setattr(train_mod, "load_cifar10", lambda path, limit=None: data)
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--batch-size", "32", "--warmup", "0.5", "--out", str(out)]) == 0
    _, _, meta = load_checkpoint(out / "checkpoint.npz")
    assert meta["model"] == "hybrid" and checkpoint_config(meta) == get_model_preset("cifar-hybrid")
    assert Recipe(**meta["recipe"]) == RECIPE.replace(epochs=1, batch_size=32, warmup=0.5)
    assert "cifar-hybrid" in capsys.readouterr().out
