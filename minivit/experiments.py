"""The paper's ablations at CIFAR scale: one command per experiment, every variant with two seeds.

    python -m minivit.experiments pool_lr --runs ~/minivit-runs/exp    # run (or continue) one experiment
    python -m minivit.experiments all --runs ~/minivit-runs/exp        # every experiment, in order
    python -m minivit.experiments pool_lr --list                       # its runs and their state
    python -m minivit.experiments data_scale_cnn --runs DIR --only model=resnet20   # some variants only
    python -m minivit.experiments pool_lr --runs DIR --csv-only        # rewrite its CSV from finished runs
    python -m minivit.experiments all --report                         # tables (Markdown) and figures
    mpiexec -n 2 python -m minivit.experiments cnn_vs_vit --runs DIR   # each run data parallel on 2 ranks

Each run is an ordinary `minivit.train` run in RUNS/<run name>. The name says what differs from
the base run, so a run two experiments share (the base itself) is trained once. The command can
be stopped at any moment (Ctrl-C, SIGTERM, the end of a session) and started again: finished
runs are skipped, a run stopped midway resumes from its checkpoint (bit for bit, see train.py).
After every run the experiment's table, lessons/results/<experiment>.csv, is written again from
the finished runs' metrics.csv files: one row per run, so the seed spread is in the table (a row
whose run is not in RUNS keeps its place, so runs made on another machine are not lost);
--report draws lessons/figures/<experiment>.png from it and prints its summary table.

The budget. The paper's ablations are ImageNet runs; on two CPU cores a whole set must fit in
about 8 hours, i.e. a run takes minutes. The base run: a ViT of 0.3M parameters (D=96, 4 blocks,
3 heads, MLP 192, patch 4 -> 64 tokens + [CLS]), on the first 20,000 CIFAR-10 training images for
5 epochs (100,000 images seen, 782 steps of 128), tested on the first 5,000 test images (standard
error of an accuracy near 45%: 0.7 points). About 6 minutes on one idle core (300 images/s). That
is far from converged, and the accuracies are low (40-50%); what the experiments compare is the
*difference* between variants at equal cost, which is what the paper's ablations compare too. An
effect smaller than the spread between seeds is reported as noise.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import distributed
from .config import ViTConfig, get_model_preset
from .data import CIFAR10_MEAN, CIFAR10_STD
from .shapes import count_flops, count_parameters
from .train import CHECKPOINT, METRICS, Recipe, _load_init, _write_atomically, read_metrics_csv, train

RESULTS = Path(__file__).resolve().parent.parent / "lessons" / "results"
SEEDS = (0, 1)

BASE_CONFIG = ViTConfig(img_size=32, patch_size=4, num_classes=10, dim=96, depth=4, heads=3, mlp_dim=192,
                        pool="mean", pos_embed="learned", init="timm")
BASE_RECIPE = Recipe(epochs=5, batch_size=128, lr=1e-3, weight_decay=0.05, warmup=1.0, label_smoothing=0.1,
                     clip_grad=1.0, limit_train=20_000, limit_test=5_000)


@dataclass(frozen=True)
class Run:
    """One training run: the base with some config and recipe fields changed."""
    experiment: str
    variant: dict                           # the columns that tell this run apart, e.g. {"pool": "cls", "lr": 3e-3}
    config: dict = field(default_factory=dict)   # ViTConfig fields changed from BASE_CONFIG
    recipe: dict = field(default_factory=dict)   # Recipe fields changed from BASE_RECIPE (seed included)
    classes: tuple = ()                     # train on these CIFAR-10 classes only (relabelled 0..k-1); () = all
    init: tuple = ()                        # (run, pos_resample): start from that run's final weights
    preset: str = ""                        # another model than the base ViT: a preset of any kind

    @property
    def name(self) -> str:
        """What differs from the base, e.g. "pool=cls,lr=0.003,seed=1": the run's directory name."""
        config, recipe = self.build()
        base = BASE_CONFIG if not self.preset else get_model_preset(self.preset)
        changes = {k: v for k, v in config.to_dict().items() if getattr(base, k) != v}
        changes.update({k: v for k, v in recipe.to_dict().items() if getattr(BASE_RECIPE, k) != v and k != "seed"})
        parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(changes.items())]
        if self.classes:
            parts.append("classes=" + "-".join(map(str, self.classes)))
        if self.init:
            parts.append(f"init=[{self.init[0].name}]:{self.init[1]}")
        return ",".join(([self.preset] if self.preset else []) + parts + [f"seed={recipe.seed}"])

    def build(self) -> tuple[ViTConfig, Recipe]:
        if self.preset:
            return get_model_preset(self.preset, **self.config), BASE_RECIPE.replace(**self.recipe)
        return BASE_CONFIG.replace(**self.config), BASE_RECIPE.replace(**self.recipe)


def _runs(experiment, variants, seeds):
    """variants: list of (columns, config changes, recipe changes); one Run per variant and seed."""
    return [Run(experiment, {**columns, "seed": seed}, config, {**recipe, "seed": seed})
            for columns, config, recipe in variants for seed in seeds]


def pool_lr(seeds=SEEDS):
    """[CLS] token vs global average pooling, each at three learning rates (paper App. D.3, Fig. 9:
    the two need different learning rates; with the right one each, they are equally good)."""
    return _runs("pool_lr", [({"pool": pool, "lr": lr}, {"pool": pool}, {"lr": lr})
                             for pool in ("cls", "mean") for lr in (3e-4, 1e-3, 3e-3)], seeds)


def pos_embed(seeds=SEEDS):
    """No position embedding, learned 1-D, learned 2-D, fixed sin-cos 2-D, relative (paper App.
    D.4, Table 8: 0.614 / 0.642 / 0.640 / - / 0.640 on ImageNet 5-shot)."""
    return _runs("pos_embed", [({"pos_embed": kind}, {"pos_embed": kind}, {})
                               for kind in ("none", "learned", "learned2d", "sincos2d", "relative")], seeds)


def patch_size(seeds=SEEDS):
    """Patches of 8, 4 and 2 pixels: 16, 64 and 256 tokens for the same images and steps."""
    return _runs("patch_size", [({"patch_size": p, "tokens": (32 // p) ** 2 + 1}, {"patch_size": p}, {})
                                for p in (8, 4, 2)], seeds)


def data_scale(seeds=SEEDS):
    """Accuracy against the number of training images, at the same cost: 100,000 images seen
    (5,000 x 20 epochs ... 50,000 x 2), and the same 156 warmup steps. The paper's Figs. 3-4 at
    CIFAR scale, where "more data" can only help once the small sets are seen often enough to
    be memorised."""
    return _runs("data_scale", [({"train_images": n}, {}, {"limit_train": n, "epochs": 100_000 // n,
                                                            "warmup": 20_000 / n})
                                for n in (5_000, 10_000, 20_000, 50_000)], seeds)


def data_scale_long(seeds=SEEDS):
    """The data-scale experiment at four times the cost: 400,000 images seen (5,000 x 80 epochs
    ... 50,000 x 8), the same 156 warmup steps. At 100,000 images the curve is flat because no
    set is fitted yet; with four times the steps the small sets can be memorised and the large
    ones keep improving, if the paper's Figs. 3-4 hold at this scale."""
    return _runs("data_scale_long", [({"train_images": n}, {}, {"limit_train": n, "epochs": 400_000 // n,
                                                                 "warmup": 20_000 / n})
                                     for n in (5_000, 10_000, 20_000, 50_000)], seeds)


# The transfer experiment's split of CIFAR-10: pre-train on these five classes, probe on the others.
SOURCE_CLASSES = (0, 1, 2, 3, 4)       # airplane, automobile, bird, cat, deer
TARGET_CLASSES = (5, 6, 7, 8, 9)       # dog, frog, horse, ship, truck


def transfer(seeds=SEEDS):
    """Pre-training for the few-shot transfer of paper §4.1 at CIFAR scale: the base model trained
    on the 25,000 training images of five classes (4 epochs: the base's 100,000 images seen). A
    linear probe of its frozen features is then fitted on 1-25 images per class of the five
    classes it has never seen (lesson 10, minivit.analysis.few_shot)."""
    return [Run("transfer", {"pretrained_on": "0-4", "seed": seed}, {"num_classes": len(SOURCE_CLASSES)},
                {"limit_train": None, "epochs": 4, "warmup": 0.8, "seed": seed}, classes=SOURCE_CLASSES)
            for seed in seeds]


FINETUNE_SIZE = 48


def finetune_res(seeds=SEEDS):
    """Fine-tuning at a higher resolution (paper §3.2): the base model, trained at 32 px, then
    fine-tuned for 2 epochs at 48 px (bilinear upsampling; patches stay 4 px, so the grid grows
    from 8 x 8 to 12 x 12) with its position embeddings interpolated in 2-D ("bilinear", the
    paper's way) or kept in sequence order with zeros for the new positions ("pad", a loader
    that ignores the 2-D layout); against training at 48 px from scratch for the same number
    of steps as both stages together (7 epochs). The base's own 32 px result is the first row."""
    runs = []
    S = FINETUNE_SIZE
    for seed in seeds:
        base = Run("finetune_res", {"method": "32px (the base)", "seed": seed}, {}, {"seed": seed})
        runs.append(base)
        for mode in ("bilinear", "pad"):
            runs.append(Run("finetune_res", {"method": f"{S}px fine-tune, {mode}", "seed": seed}, {"img_size": S},
                            {"image_size": S, "epochs": 2, "lr": 3e-4, "warmup": 0.2, "seed": seed},
                            init=(base, mode)))
        runs.append(Run("finetune_res", {"method": f"{S}px from scratch", "seed": seed}, {"img_size": S},
                        {"image_size": S, "epochs": 7, "seed": seed}))
    return runs


def class_subset(data, classes):
    """The images of some classes only, labelled 0..len(classes)-1 in the order given."""
    from .data import CIFAR10
    relabel = {c: i for i, c in enumerate(classes)}

    def split(images, labels):
        keep = np.isin(labels, classes)
        return images[keep], np.array([relabel[int(y)] for y in labels[keep]], dtype=labels.dtype)
    return CIFAR10(*split(data.train_images, data.train_labels), *split(data.test_images, data.test_labels),
                   classes=[data.classes[c] for c in classes])


# The CNN's recipe for the comparison (issue 20): He et al.'s SGD with momentum 0.9, but the
# cosine schedule and weight decay 5e-4 that short CIFAR schedules use, no clipping.
CNN_RECIPE = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "clip_grad": 0.0}


# The hybrid of the comparison: the base ViT (BASE_CONFIG's blocks, positions, pooling and init) on
# the 8 x 8 feature map of three CIFAR ResNet stages of one Basic block each (16, 32, 64 channels),
# cut into 1 x 1 patches: the same 64 tokens as the base ViT's 4 x 4 pixel patches, so the only
# change is what makes a token (a convolutional stem instead of one linear map of 48 pixels).
BASE_HYBRID = {"dim": BASE_CONFIG.dim, "depth": BASE_CONFIG.depth, "heads": BASE_CONFIG.heads,
               "mlp_dim": BASE_CONFIG.mlp_dim, "pos_embed": BASE_CONFIG.pos_embed, "init": BASE_CONFIG.init}


def data_scale_cnn(seeds=SEEDS):
    """The data-scale curve of a CNN (ResNet-20, 0.27M parameters, close to the base ViT's
    0.31M; He et al.'s SGD recipe) and of the hybrid (BASE_HYBRID, 0.39M; the ViT's recipe), on
    exactly the data-scale experiment's data, images seen and warmup: the paper's Figs. 3-4
    comparison of a ResNet, a hybrid and a ViT at CIFAR scale."""
    runs = []
    for model, preset, config, recipe in (("resnet20", "resnet20", {}, CNN_RECIPE),
                                          ("hybrid", "cifar-hybrid", BASE_HYBRID, {})):
        for n in (5_000, 10_000, 20_000, 50_000):
            scale = {"limit_train": n, "epochs": 100_000 // n, "warmup": 20_000 / n}
            runs += [Run("data_scale_cnn", {"model": model, "train_images": n, "seed": seed}, config,
                         {**recipe, **scale, "seed": seed}, preset=preset) for seed in seeds]
    return runs


# The 20-epoch CIFAR-10 recipe of `minivit train` as it stood when cnn_vs_vit was defined (75.5% and
# 76.8% for seed 0, README "Training on CIFAR-10"), pinned here so that a new default recipe does
# not change these runs: every field but the seed.
VIT_RECIPE_20 = {"epochs": 20, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 2.0,
                 "label_smoothing": 0.1, "clip_grad": 1.0, "limit_train": None, "limit_test": None}


# ResNet-20's training step costs 0.60-0.66 times the recipe ViT's per image on one core
# (`python scripts/step_cost.py cifar-recipe:64 resnet20:128`, three runs), so the ViT recipe's 20
# epochs take as long as 30-33 of ResNet-20's: 32 is ResNet-20's run at the ViT's wall time. On 2 MPI
# ranks side by side (`bash scripts/rank_speed.sh resnet20:128:sgd cifar-recipe`, 4 rounds) ResNet-20
# trained 1.49-2.11 times the ViT's images/s, median 1.57: 31.4 epochs, so 32 holds there too.
RESNET20_SAME_TIME_EPOCHS = 32


def cnn_vs_vit(seeds=SEEDS):
    """The paper's central comparison on all of CIFAR-10 (issue 20): ResNet-20 (0.27M parameters,
    81 MFLOPs an image) for the same 20 epochs as the ViT recipe, and for the same wall time (32
    epochs, RESNET20_SAME_TIME_EPOCHS); the hybrid (cifar-hybrid: the recipe's ViT, one block fewer,
    on the 8 x 8 map of three one-block ResNet stages, 1.57M, 234 MFLOPs) with the ViT's recipe; and
    the ViT recipe itself (cifar-recipe, 1.79M, 251 MFLOPs). The ResNets train with He et al.'s SGD
    (momentum 0.9, lr 0.1, batch 128, weight decay 5e-4) and a cosine schedule after one epoch of
    warmup. ResNet-56 (251 MFLOPs, the ViT's FLOPs per image) is left out: its step costs twice the
    ViT's per image on these cores (scripts/step_cost.py), about 7-8 hours of one core for 20 epochs."""
    full = {"limit_train": None, "limit_test": None, "epochs": 20}
    cnn = {**CNN_RECIPE, **full, "batch_size": 128, "warmup": 1.0}
    models = (("resnet20", "resnet20", cnn),
              (f"resnet20-{RESNET20_SAME_TIME_EPOCHS}ep", "resnet20", {**cnn, "epochs": RESNET20_SAME_TIME_EPOCHS}),
              ("hybrid", "cifar-hybrid", VIT_RECIPE_20),
              ("vit", "cifar-recipe", VIT_RECIPE_20))
    return [Run("cnn_vs_vit", {"model": model, "seed": seed}, {}, {**recipe, "seed": seed}, preset=preset)
            for seed in seeds for model, preset, recipe in models]


EXPERIMENTS = {"pool_lr": pool_lr, "pos_embed": pos_embed, "patch_size": patch_size, "data_scale": data_scale,
               "data_scale_long": data_scale_long,
               "transfer": transfer, "finetune_res": finetune_res,
               "data_scale_cnn": data_scale_cnn, "cnn_vs_vit": cnn_vs_vit}


# ============================================================================= running

def state(run: Run, runs_dir: Path) -> str:
    """'finished', 'started' (a checkpoint to resume from) or 'new'."""
    out = runs_dir / run.name
    _, recipe = run.build()
    if (out / METRICS).exists() and len(read_metrics_csv(out / METRICS)) >= recipe.epochs:
        return "finished"
    return "started" if (out / CHECKPOINT).exists() else "new"


def execute(run: Run, data, runs_dir: Path, log_every: int = 0):
    """Train the run, or continue it; returns train()'s TrainResult, or None when it is already
    finished or another live process is training it (two commands may share a runs directory:
    say one on each core; a lock file with the owner's process id keeps them apart).

    Under MPI (`mpiexec -n K python -m minivit.experiments ...`) the K ranks train each run
    together, data parallel (minivit.distributed): rank 0 takes the lock for all of them and
    every rank follows its answer, so they skip or train the same runs."""
    comm = distributed.init()
    if state(run, runs_dir) == "finished":
        return None
    runs_dir.mkdir(parents=True, exist_ok=True)
    lock = runs_dir / f"{run.name}.lock"
    took = _take_lock(lock) if comm.rank == 0 else True
    if comm.max(int(not took)):                      # rank 0's answer, on every rank
        print(f"    {run.name}: being trained by process {lock.read_text().strip()}; skipped", flush=True)
        return None
    try:
        config, recipe = run.build()
        if run.classes:
            data = class_subset(data, run.classes)
        info = {"experiment": run.experiment, "variant": run.variant, "command": " ".join(sys.argv),
                "commit": _commit()}
        init_state, mean, std = None, CIFAR10_MEAN, CIFAR10_STD
        if run.init and state(run, runs_dir) == "new":
            source, mode = run.init
            if state(source, runs_dir) != "finished":
                raise RuntimeError(f"{run.name} starts from run {source.name}, which has not finished")
            # the source's final weights (not best.npz: picking the best by test accuracy would
            # let the test set choose), its head kept (same classes), positions resampled by `mode`
            model, loaded = _load_init(runs_dir / source.name / CHECKPOINT, num_classes=config.num_classes,
                                       img_size=config.img_size, seed=recipe.seed, pos_resample=mode)
            if model.config != config:
                raise RuntimeError(f"{run.name}: the resampled model {model.config} is not the run's {config}")
            init_state, mean, std = model.state_dict(), loaded["mean"], loaded["std"]
            info.update(init=str(runs_dir / source.name / CHECKPOINT), pos_resample=mode)
        resume = comm.max(int(state(run, runs_dir) == "started")) == 1     # decided together, before train writes
        return train(config, data, recipe, runs_dir / run.name, resume=resume,
                     init_state=init_state, mean=mean, std=std, log_every=log_every, run_info=info)
    finally:
        if comm.rank == 0:
            lock.unlink(missing_ok=True)


def _take_lock(lock: Path) -> bool:
    """Create the lock file holding our process id; False if a live process holds it. A lock
    left by a process that has died (a session that ended) is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
                os.kill(owner, 0)                          # signal 0: does that process exist?
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)               # stale: its owner is gone
                continue
            except PermissionError:                        # alive, another user's
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def row(run: Run, runs_dir: Path) -> dict:
    """The CSV row of a finished run: its variant, size, cost and accuracies."""
    config, recipe = run.build()
    history = read_metrics_csv(runs_dir / run.name / METRICS)
    seconds = [float(h["epoch_seconds"]) for h in history]
    params = count_parameters(config)
    return {**run.variant,
            "params": params,
            # the cost of a forward pass, from the config alone (matrix products; backward about 2x
            # more): unlike the seconds, which depend on what else the machine was doing
            "forward_mflops": round(count_flops(config) / 1e6, 2),
            "train_images": recipe.limit_train or "all", "epochs": recipe.epochs, "batch_size": recipe.batch_size,
            "lr": recipe.lr, "test_images": recipe.limit_test,
            "test_acc": round(float(history[-1]["test_acc"]), 4),
            "best_test_acc": round(max(float(h["test_acc"]) for h in history), 4),
            "train_acc": round(float(history[-1]["train_acc"]), 4),
            "test_loss": round(float(history[-1]["test_loss"]), 4),
            "seconds_per_epoch": round(statistics.median(seconds), 1),
            "images_per_second": round(statistics.median(float(h["images_per_second"]) for h in history), 1),
            "run": run.name}


def write_csv(experiment: str, runs: list, runs_dir: Path, results: Path = RESULTS) -> Path | None:
    """Write results/<experiment>.csv: one row per finished run, in the experiment's order. A run
    finished in RUNS_DIR gets its row from its metrics.csv; a run of the experiment that is not
    finished there keeps the row the table already had, if any, so that runs trained on another
    machine or in an earlier runs directory (gone with its session) stay in the table."""
    path = results / f"{experiment}.csv"
    kept = {r["run"]: r for r in read_csv(experiment, results) if r.get("run")} if path.exists() else {}
    rows = [row(r, runs_dir) if state(r, runs_dir) == "finished" else kept.get(r.name) for r in runs]
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))      # first seen first: the variant columns lead
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomically(path, buffer.getvalue().encode())
    return path


# ============================================================================= reporting

# How each experiment is drawn: the x axis, the column that makes one line each (or None), log x.
PLOTS = {"pool_lr": ("lr", "pool", True), "pos_embed": ("pos_embed", None, False),
         "patch_size": ("patch_size", None, False), "data_scale": ("train_images", None, True),
         "data_scale_long": ("train_images", None, True),
         "finetune_res": ("method", None, False), "transfer": ("pretrained_on", None, False),
         "data_scale_cnn": ("train_images", "model", True), "cnn_vs_vit": ("model", None, False)}


def read_csv(experiment: str, results: Path = RESULTS) -> list[dict]:
    with open(results / f"{experiment}.csv", newline="") as f:
        return list(csv.DictReader(f))


def report_rows(experiment: str, results: Path = RESULTS) -> list[dict]:
    """The experiment's rows as its table and figure show them. data_scale_cnn's come with the
    ViT's data_scale rows as model "vit" (the same images, images seen and warmup), so the
    paper's comparison is one table and one figure."""
    rows = read_csv(experiment, results)
    if experiment == "data_scale_cnn" and (results / "data_scale.csv").exists():
        rows = [{"model": "vit", **r} for r in read_csv("data_scale", results)] + rows
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """One row per variant: the mean, lowest and highest test accuracy over its seeds."""
    columns = list(rows[0])
    variant_columns = [c for c in columns[:columns.index("params")] if c != "seed"]
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in variant_columns), []).append(r)
    out = []
    for key, group in groups.items():
        acc = [float(r["test_acc"]) for r in group]
        out.append({**dict(zip(variant_columns, key)), "seeds": len(group),
                    "test_acc": statistics.mean(acc), "low": min(acc), "high": max(acc),
                    "seconds_per_epoch": statistics.mean(float(r["seconds_per_epoch"]) for r in group),
                    "forward_mflops": float(group[0].get("forward_mflops") or "nan")})
    return out


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table: accuracy as mean (lowest-highest) over the seeds."""
    variant_columns = list(rows[0])[:list(rows[0]).index("seeds")]
    lines = ["| " + " | ".join(variant_columns) + " | test accuracy, mean (range) | seeds | forward MFLOPs/image "
             "| s/epoch |",
             "|" + "---|" * (len(variant_columns) + 4)]
    for r in rows:
        acc = f"{100 * r['test_acc']:.1f}% ({100 * r['low']:.1f}-{100 * r['high']:.1f})"
        lines.append("| " + " | ".join(str(r[c]) for c in variant_columns)
                     + f" | {acc} | {r['seeds']} | {r['forward_mflops']:.1f} | {r['seconds_per_epoch']:.0f} |")
    return "\n".join(lines)


def draw(experiment: str, rows: list[dict]):
    """The figure of test accuracy: every run a dot (one per seed), and the mean of each variant, a
    line along a numeric axis, a bar across the variant's dots where the variants are names (a line
    between them would draw a trend that names do not have)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x_name, line_name, log_x = PLOTS[experiment]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=80)
    lines = sorted({r[line_name] for r in rows}) if line_name else [None]
    categorical = not _numeric(rows[0][x_name])
    order = list(dict.fromkeys(r[x_name] for r in rows))
    for line in lines:
        mine = [r for r in rows if line is None or r[line_name] == line]
        xs = [order.index(r[x_name]) if categorical else float(r[x_name]) for r in mine]
        ys = [100 * float(r["test_acc"]) for r in mine]
        dots = ax.scatter(xs, ys, s=14, alpha=0.6)
        means = {}
        for x, y in zip(xs, ys):
            means.setdefault(x, []).append(y)
        keys = sorted(means)
        mean_ys = [statistics.mean(means[k]) for k in keys]
        style = dict(color=dots.get_facecolor()[0], label=f"{line_name}={line}" if line is not None else "mean over seeds")
        if categorical:
            ax.scatter(keys, mean_ys, marker="_", s=400, alpha=1.0, **style)   # opaque: the dots are not
        else:
            ax.plot(keys, mean_ys, **style)
    if categorical:
        ax.set_xticks(range(len(order)), [textwrap.fill(name, 14) for name in order])   # long names wrap
        ax.set_xlim(-0.5, len(order) - 0.5)
    if log_x:
        ax.set_xscale("log")
        values = sorted({float(r[x_name]) for r in rows})
        ax.set_xticks(values, [f"{v:g}" for v in values])   # the values run, not 3x10^-4 ... labels
        ax.minorticks_off()
    per_variant = Counter((r[x_name], r[line_name] if line_name else None) for r in rows)
    low, high = min(per_variant.values()), max(per_variant.values())
    seeds = f"{high} seeds" if low == high else f"{low}-{high} seeds"
    ax.set(xlabel=x_name, ylabel="test accuracy (%)", title=f"{experiment}: {seeds} per variant, a dot per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(experiment: str, rows: list[dict], path: Path):
    """draw()'s figure written to path as a PNG."""
    import matplotlib.pyplot as plt
    fig = draw(experiment, rows)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, buffer.getvalue())


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_only(items: list[str]) -> dict[str, set[str]]:
    """["train_images=5000", "train_images=50000", "model=resnet20"] -> {column: allowed values}."""
    wanted: dict[str, set[str]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column or not value:
            raise ValueError(f"--only takes COLUMN=VALUE, e.g. train_images=5000; got {item!r}")
        wanted.setdefault(column, set()).add(value)
    return wanted


def select(runs: list[Run], wanted: dict[str, set[str]]) -> list[Run]:
    """The runs whose variant has one of the wanted values in every wanted column (all if none);
    a column that no run of the experiment has is an error, not an empty selection."""
    for column in wanted:
        if runs and not any(column in run.variant for run in runs):
            known = sorted({c for run in runs for c in run.variant})
            raise ValueError(f"--only {column}=...: the {runs[0].experiment} experiment has no column "
                             f"{column!r}; its columns are {known}")
    return [run for run in runs if all(str(run.variant.get(c)) in values for c, values in wanted.items())]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minivit.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--runs", metavar="DIR", help="where the run directories go (keep it outside the checkout)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), metavar="N")
    parser.add_argument("--data", metavar="PATH", help="CIFAR-10 archive or directory (as for minivit train)")
    parser.add_argument("--list", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument("--csv-only", action="store_true", help="only rewrite the CSVs from finished runs")
    parser.add_argument("--results", metavar="DIR", default=str(RESULTS),
                        help="where the CSVs go (default: lessons/results of this checkout)")
    parser.add_argument("--report", action="store_true",
                        help="print each experiment's table (Markdown) and draw lessons/figures/<experiment>.png")
    parser.add_argument("--only", nargs="+", default=[], metavar="COLUMN=VALUE",
                        help="run (or list) only the variants with these values, e.g. --only train_images=5000 "
                             "train_images=50000 model=resnet20: values of one column are alternatives")
    parser.add_argument("--log-every", type=int, default=0, metavar="N")
    args = parser.parse_args(argv)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    plan = {name: EXPERIMENTS[name](tuple(args.seeds)) for name in names}
    try:
        wanted = parse_only(args.only)
        selected = {name: select(runs, wanted) for name, runs in plan.items()}
    except ValueError as e:
        parser.error(str(e))
    runs_dir = Path(args.runs).expanduser() if args.runs else None
    if args.report:
        results = Path(args.results)
        for name in names:
            if not (results / f"{name}.csv").exists():
                print(f"{name}: no results yet ({results / name}.csv)")
                continue
            rows = report_rows(name, results)
            plot(name, rows, results.parent / "figures" / f"{name}.png")
            print(f"### {name}\n\n{markdown_table(summary(rows))}\n")
        return 0
    if args.list:
        for name, runs in selected.items():
            for run in runs:
                print(f"{name:12s} {run.name:45s} {state(run, runs_dir) if runs_dir else ''}")
        return 0
    if runs_dir is None:
        parser.error("--runs DIR is needed to run or to write CSVs")
    comm = distributed.init()
    if comm.size > 1:
        with comm.only_rank0_prints():                 # K ranks, one report: rank 0's
            return _run_all(args, plan, selected, runs_dir, comm)
    return _run_all(args, plan, selected, runs_dir, comm)


def _run_all(args, plan, selected, runs_dir, comm):
    """Train the selected runs in order (each with all ranks), rewriting each experiment's CSV."""
    def csv_of(name, runs):
        return write_csv(name, runs, runs_dir, Path(args.results)) if comm.rank == 0 else None

    if not args.csv_only:
        from .data import find_cifar10, load_cifar10
        data = load_cifar10(find_cifar10(args.data))
        for name, runs in selected.items():
            for i, run in enumerate(runs):
                print(f"[{name} {i + 1}/{len(runs)}] {run.name}: {state(run, runs_dir)}", flush=True)
                started = time.monotonic()
                result = execute(run, data, runs_dir, args.log_every)
                if result is not None and result.status == "interrupted":
                    csv_of(name, plan[name])
                    return result.exit_code
                if result is not None:
                    print(f"    {result.history[-1]['test_acc']:.4f} test accuracy, "
                          f"{time.monotonic() - started:.0f} s", flush=True)
                csv_of(name, plan[name])
    for name, runs in plan.items():
        path = csv_of(name, runs)
        print(f"{name}: {path or 'no finished runs yet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
