"""minivit.experiments: run names, shared runs, resumable state and the CSV of finished runs."""
import csv
import os
from pathlib import Path

import numpy as np
import pytest

from minivit import experiments as ex
from minivit.data import CIFAR10
from minivit.pretrained import parameter_shapes

# A tiny stand-in for the base: 32 x 32 images (the base's size), a 1-block ViT of width 8.
TINY = {"dim": 8, "depth": 1, "heads": 2, "mlp_dim": 8}
QUICK = {"epochs": 2, "batch_size": 20, "warmup": 0.5, "limit_train": 40, "limit_test": 20}


def synthetic_data():
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 100, (n, 3, 32, 32)) + 15 * labels[:, None, None, None]
        return images.astype(np.uint8), labels.astype(np.int64)
    return CIFAR10(*split(40), *split(20), classes=[f"class{k}" for k in range(10)])


def test_run_names_say_only_what_differs_from_the_base():
    runs = ex.pool_lr(seeds=(0, 1))
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) == 12
    assert "pool=cls,seed=0" in names and "lr=0.003,pool=cls,seed=1" in names
    assert "seed=0" in names                       # mean pooling at lr 1e-3 is the base itself
    # the base appears in several experiments under the same name, so it is trained once
    assert "seed=0" in [r.name for r in ex.data_scale(seeds=(0,))]
    assert "seed=1" in [r.name for r in ex.patch_size(seeds=(1,))]


def test_every_variant_is_built_and_differs_as_its_columns_say():
    for make in ex.EXPERIMENTS.values():
        runs = make(seeds=(0,))
        built = [r.build() for r in runs]
        assert len({r.name for r in runs}) == len(runs)
        for run, (config, recipe) in zip(runs, built):
            for key, value in run.variant.items():
                if key == "train_images":
                    assert recipe.limit_train == value
                elif key == "pretrained_on":
                    assert run.classes == tuple(range(int(value[0]), int(value[-1]) + 1))   # "0-4": classes 0 to 4
                elif key == "tokens":
                    assert config.num_tokens == value
                elif hasattr(config, key) and key in run.config:
                    assert getattr(config, key) == value
                elif hasattr(recipe, key):
                    assert getattr(recipe, key) == value


def test_data_scale_runs_cost_the_same_number_of_images_and_warmup_steps():
    for experiment, images in ((ex.data_scale, 100_000), (ex.data_scale_long, 400_000)):
        runs = experiment(seeds=(0,))
        assert [r.variant["train_images"] for r in runs] == [5_000, 10_000, 20_000, 50_000]
        for run in runs:
            _, recipe = run.build()
            assert recipe.limit_train * recipe.epochs == images
            assert recipe.limit_train * recipe.warmup == pytest.approx(20_000)     # 156 steps of 128


def test_a_run_trains_once_resumes_state_and_fills_the_csv(tmp_path):
    data = synthetic_data()
    runs = [ex.Run("tiny", {"pool": pool, "seed": 0}, {**TINY, "pool": pool}, {**QUICK, "seed": 0})
            for pool in ("cls", "mean")]
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    results.mkdir()
    assert [ex.state(r, runs_dir) for r in runs] == ["new", "new"]
    assert ex.write_csv("tiny", runs, runs_dir, results) is None          # nothing finished: no file
    result = ex.execute(runs[0], data, runs_dir)
    assert result.status == "finished" and len(result.history) == 2
    assert [ex.state(r, runs_dir) for r in runs] == ["finished", "new"]
    assert ex.execute(runs[0], data, runs_dir) is None                   # finished runs are skipped
    path = ex.write_csv("tiny", runs, runs_dir, results)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 1                                                 # only finished runs are rows
    row = rows[0]
    assert (row["pool"], row["seed"], row["run"]) == ("cls", "0", runs[0].name)
    config, _ = runs[0].build()
    assert int(row["params"]) == sum(int(np.prod(s)) for s in parameter_shapes(config).values())
    assert float(row["test_acc"]) == pytest.approx(result.history[-1]["test_acc"], abs=1e-4)
    assert (row["train_images"], row["epochs"], row["test_images"]) == ("40", "2", "20")


def test_the_csv_keeps_the_rows_of_runs_finished_in_another_runs_directory(tmp_path):
    data = synthetic_data()
    runs = [ex.Run("tiny", {"pool": pool, "seed": 0}, {**TINY, "pool": pool}, {**QUICK, "seed": 0})
            for pool in ("cls", "mean")]
    results = tmp_path / "results"
    results.mkdir()
    ex.execute(runs[1], data, tmp_path / "machine-a")         # the second run, on one machine
    first = list(csv.DictReader(open(ex.write_csv("tiny", runs, tmp_path / "machine-a", results))))
    with open(results / "tiny.csv", "a") as f:                # a row of a run the experiment no longer has
        f.write(",".join("stale" if k == "run" else first[0][k] for k in first[0]) + "\n")
    ex.execute(runs[0], data, tmp_path / "machine-b")         # the first run, on a fresh machine
    rows = list(csv.DictReader(open(ex.write_csv("tiny", runs, tmp_path / "machine-b", results))))
    assert [r["run"] for r in rows] == [runs[0].name, runs[1].name]     # the experiment's order, stale dropped
    assert rows[1] == first[0]                                            # kept as it was, to the character
    assert ex.write_csv("tiny", runs, tmp_path / "empty", results) is not None
    assert [r["run"] for r in csv.DictReader(open(results / "tiny.csv"))] == [runs[0].name, runs[1].name]


def test_report_summarises_seeds_and_draws_the_figure(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "pool_lr.csv").write_text(
        "pool,lr,seed,params,forward_mflops,test_acc,seconds_per_epoch\n"
        "cls,0.001,0,10,45.42,0.50,60\ncls,0.001,1,10,45.42,0.54,62\nmean,0.001,0,10,45.42,0.60,61\n")
    summary = ex.summary(ex.read_csv("pool_lr", results))
    assert [(s["pool"], s["seeds"]) for s in summary] == [("cls", 2), ("mean", 1)]
    assert summary[0]["test_acc"] == pytest.approx(0.52) and (summary[0]["low"], summary[0]["high"]) == (0.50, 0.54)
    assert ex.main(["pool_lr", "--report", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| cls | 0.001 | 52.0% (50.0-54.0) | 2 | 45.4 | 61 |" in out
    assert (tmp_path / "figures" / "pool_lr.png").read_bytes().startswith(b"\x89PNG")


def test_the_cnn_report_puts_the_vits_data_scale_rows_beside_the_cnns(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "data_scale.csv").write_text("train_images,seed,params,forward_mflops,test_acc,seconds_per_epoch\n"
                                            "5000,0,311338,45.42,0.43,37\n5000,1,311338,45.42,0.45,38\n")
    (results / "data_scale_cnn.csv").write_text("model,train_images,seed,params,forward_mflops,test_acc,seconds_per_epoch\n"
                                                "resnet20,5000,0,269722,81.1,0.61,150\n")
    rows = ex.report_rows("data_scale_cnn", results)
    assert [(r["model"], r["seed"]) for r in rows] == [("vit", "0"), ("vit", "1"), ("resnet20", "0")]
    assert ex.report_rows("data_scale", results) == ex.read_csv("data_scale", results)    # others unchanged
    assert ex.main(["data_scale_cnn", "--report", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "| vit | 5000 | 44.0% (43.0-45.0) | 2 | 45.4 | 38 |" in out and "| resnet20 | 5000 | 61.0% (61.0-61.0) |" in out


def test_named_variants_get_a_mean_bar_each_and_no_line_between_them():
    import matplotlib.pyplot as plt
    rows = [{"model": m, "seed": s, "test_acc": a} for m, s, a in
            [("resnet20", "0", "0.86"), ("resnet20", "1", "0.85"), ("vit", "0", "0.77")]]
    fig = ex.draw("cnn_vs_vit", rows)
    ax = fig.axes[0]
    assert [len(line.get_xdata()) for line in ax.lines] == []             # nothing joins resnet20 to vit
    bars = ax.collections[-1]                                              # drawn last: the means
    assert bars.get_offsets().tolist() == [[0, 85.5], [1, 77.0]]
    assert ax.get_title() == "cnn_vs_vit: 1-2 seeds per variant, a dot per run"
    plt.close(fig)
    numeric = [{"lr": lr, "pool": "cls", "seed": "0", "test_acc": a} for lr, a in [("0.001", "0.5"), ("0.002", "0.6")]]
    fig = ex.draw("pool_lr", numeric)
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [2]   # along a numeric axis: a line
    plt.close(fig)


def test_a_run_with_a_checkpoint_but_short_metrics_is_resumed_not_restarted(tmp_path):
    data = synthetic_data()
    run = ex.Run("tiny", {"seed": 0}, TINY, {**QUICK, "seed": 0})
    runs_dir = tmp_path / "runs"
    ex.execute(run, data, runs_dir)
    weights = (runs_dir / run.name / "checkpoint.npz").read_bytes()
    # as if killed while writing metrics.csv: the checkpoint holds more than the table
    (runs_dir / run.name / "metrics.csv").write_text("epoch\n1\n")
    assert ex.state(run, runs_dir) == "started"
    result = ex.execute(run, data, runs_dir)          # resume=True: a restart would refuse the full directory
    assert result.status == "already finished"
    assert ex.state(run, runs_dir) == "finished"      # train's resume rewrote metrics.csv from the checkpoint
    assert (runs_dir / run.name / "checkpoint.npz").read_bytes() == weights


def test_list_runs_nothing(capsys, tmp_path):
    assert ex.main(["pool_lr", "--list", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("pool_lr") == 12 and "new" in out
    assert not any(tmp_path.iterdir())


def test_only_selects_variants_by_column_values(capsys, tmp_path):
    runs = ex.data_scale_cnn()
    picked = ex.select(runs, ex.parse_only(["model=resnet20", "train_images=5000", "train_images=50000"]))
    assert [(r.variant["train_images"], r.variant["seed"]) for r in picked] == [(5000, 0), (5000, 1), (50000, 0),
                                                                                 (50000, 1)]
    assert all(r.preset == "resnet20" for r in picked)
    assert ex.select(runs, {}) == runs
    assert ex.main(["pool_lr", "--list", "--runs", str(tmp_path), "--only", "pool=cls", "lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert out.count("pool_lr") == 2 and "pool=cls,seed=0" in out and "lr=" not in out
    for bad, message in (("lr", "COLUMN=VALUE"), ("=3", "COLUMN=VALUE"), ("colour=red", "no column 'colour'")):
        with pytest.raises(SystemExit):
            ex.main(["pool_lr", "--list", "--only", bad])
        assert message in capsys.readouterr().err


def test_two_commands_sharing_a_runs_directory_never_train_the_same_run(tmp_path, monkeypatch):
    data = synthetic_data()
    run = ex.Run("tiny", {"seed": 0}, TINY, {**QUICK, "seed": 0})
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    lock = runs_dir / f"{run.name}.lock"
    lock.write_text(str(os.getppid()))                  # a live process (pytest's parent) holds it
    assert ex.execute(run, data, runs_dir) is None and ex.state(run, runs_dir) == "new"
    lock.write_text("999999999")                        # no such process: a stale lock is taken over
    assert ex.execute(run, data, runs_dir).status == "finished"
    assert not lock.exists()                            # released when the run ends


def test_class_subset_relabels_and_the_transfer_run_trains_on_five_classes():
    data = synthetic_data()
    sub = ex.class_subset(data, (7, 2))
    assert sorted(set(sub.train_labels.tolist())) <= [0, 1] and sub.classes == ["class7", "class2"]
    keep = np.isin(data.train_labels, (7, 2))
    np.testing.assert_array_equal(sub.train_images, data.train_images[keep])
    np.testing.assert_array_equal(sub.train_labels, np.where(data.train_labels[keep] == 7, 0, 1))
    (run,) = ex.transfer(seeds=(0,))
    config, recipe = run.build()
    assert run.classes == ex.SOURCE_CLASSES and config.num_classes == 5 and recipe.limit_train is None
    assert not set(ex.SOURCE_CLASSES) & set(ex.TARGET_CLASSES)
    assert recipe.epochs * 25_000 == 100_000                # the base's cost: 100,000 images seen


def test_a_fine_tune_starts_from_its_source_run_resampled_and_needs_it_finished(tmp_path):
    data = synthetic_data()
    runs_dir = tmp_path / "runs"
    source = ex.Run("tiny", {"seed": 0}, TINY, {**QUICK, "seed": 0})
    tune = {mode: ex.Run("tiny", {"mode": mode, "seed": 0}, {**TINY, "img_size": 48},
                         {**QUICK, "image_size": 48, "epochs": 1, "seed": 0}, init=(source, mode))
            for mode in ("bilinear", "pad")}
    assert tune["pad"].name.endswith("init=[" + source.name + "]:pad,seed=0")
    with pytest.raises(RuntimeError, match="has not finished"):
        ex.execute(tune["pad"], data, runs_dir)
    ex.execute(source, data, runs_dir)
    from minivit.checkpoint import load_checkpoint
    from minivit.pretrained import resample_pos_embed
    source_state, _, _ = load_checkpoint(runs_dir / source.name / "checkpoint.npz")
    for mode, run in tune.items():
        assert ex.execute(run, data, runs_dir).status == "finished"
        state, _, meta = load_checkpoint(runs_dir / run.name / "checkpoint.npz")
        assert meta["config"]["img_size"] == 48 and meta["run"]["pos_resample"] == mode
        assert meta["run"]["init"].endswith(source.name + "/checkpoint.npz")
        assert state["pos_embed"].shape == (1, 145, 8)                     # 12 x 12 patches + [CLS]
    # one epoch of fine-tuning moves the weights only a little: each starts near its own resampling
    bilinear = load_checkpoint(runs_dir / tune["bilinear"].name / "checkpoint.npz")[0]["pos_embed"]
    pad = load_checkpoint(runs_dir / tune["pad"].name / "checkpoint.npz")[0]["pos_embed"]
    expected = resample_pos_embed(source_state["pos_embed"].astype(np.float64), 12)
    assert np.abs(bilinear - expected).max() < np.abs(pad - expected).max()


def test_a_run_of_another_kind_of_model_trains_through_the_same_runner(tmp_path):
    data = synthetic_data()
    run = ex.Run("tiny", {"model": "resnet20", "seed": 0}, {"layers": (1, 1, 1), "widths": (4, 8, 8)},
                 {**QUICK, **ex.CNN_RECIPE, "seed": 0}, preset="resnet20")
    assert run.name.startswith("resnet20,") and "optimizer=sgd" in run.name and "layers=" in run.name
    assert ex.execute(run, data, tmp_path / "runs").status == "finished"
    from minivit.checkpoint import read_checkpoint_meta
    meta = read_checkpoint_meta(tmp_path / "runs" / run.name / "checkpoint.npz")
    assert meta["model"] == "resnet" and meta["recipe"]["optimizer"] == "sgd"
    row = ex.row(run, tmp_path / "runs")
    from minivit.resnet import ResNet
    assert row["model"] == "resnet20" and row["params"] == ResNet(run.build()[0]).num_parameters()


def test_the_data_scale_hybrid_is_the_base_vit_on_a_convolutional_stem():
    """data_scale_cnn's hybrid changes only what makes a token: the base ViT's blocks, positions,
    pooling, init and recipe, on 64 tokens (an 8 x 8 map of 1 x 1 patches, as the base's 4 x 4 pixel
    patches give 64); the ResNet keeps He et al.'s SGD recipe. Both see the data-scale experiment's
    images and warmup."""
    from minivit.config import HybridConfig
    from minivit.model import build_model
    runs = ex.data_scale_cnn()
    hybrid = [r for r in runs if r.variant["model"] == "hybrid"]
    assert len(hybrid) == 8 and len(runs) == 16
    for run in hybrid:
        config, recipe = run.build()
        assert isinstance(config, HybridConfig)
        for name in ("dim", "depth", "heads", "mlp_dim", "pos_embed", "init", "pool", "num_classes"):
            assert getattr(config, name) == getattr(ex.BASE_CONFIG, name), name
        n = run.variant["train_images"]
        same_scale = [r for r in ex.data_scale() if r.variant["train_images"] == n and r.variant["seed"] == run.variant["seed"]]
        assert recipe == same_scale[0].build()[1]            # the ViT's recipe at that scale, exactly
    model, vit = build_model(hybrid[0].build()[0]), build_model(ex.BASE_CONFIG)
    assert model.pos_embed.shape == vit.pos_embed.shape == (1, 65, 96)     # 64 tokens + [CLS]'s slot
    assert model.forward(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)


def test_cnn_vs_vit_compares_at_equal_epochs_and_equal_time():
    """cnn_vs_vit: every model on all of CIFAR-10 and tested on all of it, 20 epochs, and ResNet-20
    once more for RESNET20_SAME_TIME_EPOCHS, the recipe ViT's wall time; the hybrid and the ViT
    share the ViT recipe, the ResNets He et al.'s SGD and differ only in their epochs."""
    from minivit import get_preset
    from minivit.config import get_model_preset
    runs = {(r.variant["model"], r.variant["seed"]): r.build() for r in ex.cnn_vs_vit()}
    long = f"resnet20-{ex.RESNET20_SAME_TIME_EPOCHS}ep"
    assert sorted(runs) == [(m, s) for m in ("hybrid", "resnet20", long, "vit") for s in (0, 1)]
    assert 30 <= ex.RESNET20_SAME_TIME_EPOCHS <= 34                      # 20 / 0.60-0.66, see experiments.py
    for (model, seed), (config, recipe) in runs.items():
        epochs = ex.RESNET20_SAME_TIME_EPOCHS if model == long else 20
        assert (recipe.epochs, recipe.limit_train, recipe.limit_test, recipe.seed) == (epochs, None, None, seed)
        assert recipe.optimizer == ("sgd" if model.startswith("resnet") else "adamw")
    vit_config, vit_recipe = runs[("vit", 0)]
    assert vit_config == get_preset("cifar-recipe")
    assert (vit_recipe.batch_size, vit_recipe.lr, vit_recipe.weight_decay, vit_recipe.warmup) == (64, 1e-3, 0.1, 2.0)
    assert runs[("hybrid", 0)][1] == vit_recipe
    assert runs[(long, 0)][0] == runs[("resnet20", 0)][0] == get_model_preset("resnet20")
    assert runs[(long, 0)][1].replace(epochs=20) == runs[("resnet20", 0)][1]
    assert runs[("resnet20", 0)][1].lr == 0.1 and runs[("resnet20", 0)][1].batch_size == 128


def test_step_cost_script_times_each_preset_against_the_first(capsys):
    """scripts/step_cost.py, which sets RESNET20_SAME_TIME_EPOCHS: one line per preset, the first at
    1.00 x itself; a malformed PRESET:BATCH is refused by name."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "scripts" / "step_cost.py"
    spec = importlib.util.spec_from_file_location("step_cost", path)
    step_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_cost)
    step_cost.main(["cifar-lesson:2", "resnet20:2", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["cifar-lesson", "resnet20"]
    assert "1.00 x cifar-lesson's time per image" in lines[0]
    with pytest.raises(SystemExit):
        step_cost.main(["resnet20:none"])
    assert "expected PRESET:BATCH such as resnet20:128, got 'resnet20:none'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step_cost.main(["resnet20:2", "--steps", "0"])
    assert "--steps: expected a whole number of at least 1, got '0'" in capsys.readouterr().err
