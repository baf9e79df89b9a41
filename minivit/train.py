"""Train a model on CIFAR-10 and evaluate checkpoints: `minivit train` and `minivit eval`.

One loop trains every kind of model minivit has - ViT, the hybrid ViT (paper §3.1) and ResNet -
through the interface they share (minivit.model.build_model): the same data, augmentation,
checkpoints, resume, curves and eval. The preset names the architecture.

    minivit train                                        # the recipe: cifar-hybrid, 20 epochs, AdamW
    minivit train --preset cifar-recipe                  # the same recipe, the pure ViT (the lessons' weights)
    minivit train --preset cifar-lesson --epochs 5 --set depth=4
    minivit train --preset resnet20 --optimizer sgd --schedule step   # He et al.'s recipe: SGD, lr 0.1 / 10 / 10
    minivit train --resume --out runs/cifar-hybrid-20250101-120000    # continue a stopped run
    minivit train --init runs/a/best.npz --image-size 48 --epochs 5   # fine-tune a 32 px run at 48 px (paper 3.2)
    minivit eval runs/cifar-hybrid-20250101-120000/best.npz           # test accuracy of a saved model
    minivit eval runs/cifar-hybrid-20250101-120000/best.npz --flip    # ... averaged with the mirror image
    mpiexec -n 2 minivit train --out runs/two                        # the same run on 2 processes (pip extra "mpi")

One training step, as the loop in `train` writes it out:

    uint8 images (B, C, S, S) --augment--> uint8 (B, C, S, S)     random crop (pad 4 at 32 px) + horizontal flip
      (--randaug-n, --reprob: RandAugment, random erasing; --mixup-alpha, --cutmix-alpha: the normalised
       batch mixed and the labels made soft targets; minivit.augment)
      --normalize--> float32 (B, C, S, S)                          per channel: (x / 255 - mean) / std
      --model--> logits (B, K) --cross-entropy, label smoothing--> loss
      --backward--> every parameter's .grad --clip--> global norm <= clip_grad
      --AdamW--> new weights, at the learning rate of this step (linear warmup, then cosine to 0)
      (--ema-decay: then the moving average of the weights is updated; minivit.ema)
                 (--optimizer sgd: SGD with momentum; --schedule step: lr / 10 at the milestones)

The output directory (--out) holds:

    checkpoint.npz   the last saved state: weights (and BatchNorm buffers), the optimiser's state,
                     both random generators, the model's kind and config, the settings, a
                     fingerprint of the data and the metrics so far. --resume continues
                     from it, on the same data only (--allow-other-data overrides that on purpose),
                     and first rewrites the three files below from it if a kill left them behind.
    best.npz         the weights with the best test accuracy so far (no optimiser state)
    metrics.csv      one row per epoch
    curves.png       loss and accuracy against epoch
    ema.npz          with --ema-decay: the moving average of the weights after the last epoch
                     (weights only; metrics.csv then has ema_test_loss and ema_test_acc too)

Reproducibility: one NumPy Generator draws the order of the images and the augmentations,
the model's own Generator draws dropout and drop-path masks. Both states go into every
checkpoint, so a run that is stopped and resumed ends with exactly the weights (bit for bit)
of a run that never stopped.

Data parallel (minivit.distributed): under `mpiexec -n K` every process (rank) runs this same
loop on its shard of each batch; the gradients are summed over the ranks, so all take the same
step and hold the same weights. The checkpoint does not depend on K: a run resumes with any K,
bit for bit with the same K, within float rounding with another (the sum's order changes).
BatchNorm (ResNet, the hybrid's backbone) is synchronised: its statistics are summed over the
ranks (SyncBatchNorm), so it normalises with the whole batch's, as one process does, and every
rank keeps the same running averages.

Fine-tuning at a higher resolution (paper section 3.2): --image-size S resizes both splits once,
after loading (bilinear, minivit.data.resize_images), and the model must take S x S images: a new
one through --set img_size=S; a pretrained one (--init: a file of minivit.pretrained's formats, or
the checkpoint.npz / best.npz of a `minivit train` run) gets its position embeddings brought to
the larger grid, by 2-D interpolation (--pos-resample bilinear, the paper's) or by keeping the
old table's first rows and zeros for the new ones (--pos-resample pad, the comparison without).

Shape legend: B batch, C channels, S image side, K classes.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import numbers
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__, distributed
from .augment import (MAX_MAGNITUDE, Mixup, dominant_labels, mix_images, mix_targets, rand_augment, random_erasing,
                      soft_target_cross_entropy_backward, soft_target_cross_entropy_forward)
from .backend import DEVICES, check_device, to_device, to_numpy
from .checkpoint import (DEFAULT_FILE_MODE, checkpoint_config, is_train_checkpoint, load_checkpoint,
                         load_checkpoint_ema, load_vit_checkpoint, read_checkpoint_meta, save_checkpoint)
from .config import list_presets, model_kind
from .data import CIFAR10_MEAN, CIFAR10_STD, augment, find_cifar10, load_cifar10, normalize, resize_images
from .ema import ModelEma
from .model import ViT, build_model
from .ops import cross_entropy_backward, cross_entropy_forward
from .optim import SGD, AdamW, clip_grad_norm, param_groups, warmup_cosine, warmup_step
from .shapes import parse_overrides, preset_with_overrides


def _option(name):
    return "--" + name.replace("_", "-")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{_option(name)} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{_option(name)} must be an integer >= {low}, got {value!r}")


def _check_real(name, value, low=None, low_open=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{_option(name)} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{_option(name)} must be >= {low}, got {value!r}")
    if low_open is not None and value <= low_open:
        raise ValueError(f"{_option(name)} must be > {low_open}, got {value!r}")


@dataclass(frozen=True)
class Recipe:
    """How to train: every setting of `minivit train` that changes the result, except the model.
    The defaults are the CIFAR-10 recipe; `minivit train --help` shows them."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3                  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.1         # AdamW's decoupled decay (SGD: L2), on weight matrices and kernels only
                                      # (optim.param_groups)
    warmup: float = 2.0               # epochs of linear warmup (a fraction is fine), then the schedule
    label_smoothing: float = 0.1      # target: 0.9 on the true class + 0.1 / K spread over all classes
    clip_grad: float = 1.0            # largest global gradient norm; 0 turns clipping off
    seed: int = 0                     # initial weights, data order, augmentation, dropout
    limit_train: int | None = None    # use only the first N training images (quick runs, tests)
    limit_test: int | None = None     # evaluate on the first N test images only
    image_size: int | None = None     # resize both splits to S x S (bilinear) first; None: the data's own size
    optimizer: str = "adamw"          # "adamw" | "sgd": SGD with momentum, weight decay added to the gradient (L2)
    momentum: float = 0.9             # SGD's momentum (AdamW's is its beta1, 0.9)
    nesterov: bool = False            # SGD: Nesterov momentum
    schedule: str = "cosine"          # after warmup: "cosine" decay to 0, or "step": lr / 10 at each milestone
    milestones: tuple = (0.5, 0.75)   # "step": where the lr is divided by 10, as fractions of the run's steps
                                      # (He et al.: at 32k and 48k of 64k iterations)
    # Stronger augmentation and weight averaging (minivit.augment, minivit.ema); all off by default.
    randaug_n: int = 0                # RandAugment: ops per image (0: off), after the crop and flip
    randaug_m: float = 9.0            # RandAugment: their magnitude, 0..10
    reprob: float = 0.0               # random erasing: probability that an image gets a box of mean colour
    mixup_alpha: float = 0.0          # mixup: lambda ~ Beta(alpha, alpha) per batch (0: off)
    cutmix_alpha: float = 0.0         # cutmix: the same for the pasted box's share (0: off)
    mix_prob: float = 1.0             # chance that a batch is mixed at all (with mixup or cutmix on)
    switch_prob: float = 0.5          # with both on: chance that a mixed batch uses cutmix rather than mixup
    ema_decay: float = 0.0            # EMA of the weights: decay per step, e.g. 0.999 (0: off)
    ema_warmup: bool = False          # EMA: timm ModelEmaV3's warmup, decay min(ema_decay, 1 - (1 + t) ** -2/3)

    def __post_init__(self):
        # Messages name the command-line option, since that is where a bad value comes from.
        _check_int("epochs", self.epochs, low=1)
        _check_int("batch_size", self.batch_size, low=1)
        _check_real("lr", self.lr, low_open=0.0)
        _check_real("weight_decay", self.weight_decay, low=0.0)
        _check_real("warmup", self.warmup, low=0.0)
        if self.warmup > self.epochs:
            raise ValueError(f"--warmup ({self.warmup} epochs) must not be longer than --epochs ({self.epochs}); "
                             f"for a short run pass a shorter --warmup, e.g. --warmup {self.epochs / 10:g}")
        _check_real("label_smoothing", self.label_smoothing, low=0.0)
        if self.label_smoothing >= 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}")
        _check_real("clip_grad", self.clip_grad, low=0.0)
        _check_int("seed", self.seed, low=0)
        for name in ("limit_train", "limit_test", "image_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1)
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_option(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        _check_real("momentum", self.momentum, low=0.0)
        if self.momentum >= 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"--nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("--nesterov needs a --momentum above 0")
        if not isinstance(self.milestones, (tuple, list)):
            raise TypeError(f"--milestones must be fractions of the run, e.g. 0.5,0.75, got {self.milestones!r}")
        object.__setattr__(self, "milestones", tuple(self.milestones))    # JSON gives a list back
        for m in self.milestones:
            _check_real("milestones", m)
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"--milestones must be increasing fractions of the run between 0 and 1 (exclusive), "
                             f"e.g. 0.5,0.75, got {','.join(map(str, self.milestones))}")
        _check_int("randaug_n", self.randaug_n, low=0)
        for name, high in (("randaug_m", MAX_MAGNITUDE), ("reprob", 1), ("mix_prob", 1), ("switch_prob", 1)):
            _check_real(name, getattr(self, name), low=0.0)
            if getattr(self, name) > high:
                raise ValueError(f"{_option(name)} must be in [0, {high}], got {getattr(self, name)!r}")
        _check_real("mixup_alpha", self.mixup_alpha, low=0.0)
        _check_real("cutmix_alpha", self.cutmix_alpha, low=0.0)
        _check_real("ema_decay", self.ema_decay, low=0.0)
        if self.ema_decay >= 1:
            raise ValueError(f"--ema-decay must be in [0, 1) (0: off; e.g. 0.999), got {self.ema_decay!r}")
        if not isinstance(self.ema_warmup, bool):
            raise TypeError(f"--ema-warmup must be True or False, got {self.ema_warmup!r}")
        if self.ema_warmup and self.ema_decay == 0:
            raise ValueError("--ema-warmup needs an --ema-decay above 0 (the EMA is off)")

    @property
    def mixup(self) -> Mixup:
        """The batch mixing of this recipe (Mixup.enabled is False unless an alpha is above 0)."""
        return Mixup(self.mixup_alpha, self.cutmix_alpha, self.mix_prob, self.switch_prob, self.label_smoothing)

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")
RECIPE = Recipe()                      # the defaults of `minivit train`
# Recipe fields added after checkpoints were first written, with the value that a checkpoint
# without them was trained with: such a run resumes (and evaluates) as it was started.
RECIPE_FIELDS_ADDED = {"image_size": None, "optimizer": "adamw", "momentum": 0.9, "nesterov": False,
                       "schedule": "cosine", "milestones": (0.5, 0.75), "randaug_n": 0, "randaug_m": 9.0,
                       "reprob": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "switch_prob": 0.5,
                       "ema_decay": 0.0, "ema_warmup": False}
# Options that only mean something beside another one: given without it, they are refused.
NEEDS = {"randaug_m": ("randaug_n", "--randaug-n N above 0 (RandAugment is off)"),
         "mix_prob": ("mixup_alpha|cutmix_alpha", "--mixup-alpha or --cutmix-alpha above 0 (mixing is off)"),
         "switch_prob": ("mixup_alpha&cutmix_alpha", "both --mixup-alpha and --cutmix-alpha above 0 (it chooses "
                                                     "between them)")}
# `--optimizer sgd` without --lr / --weight-decay / --clip-grad: He et al.'s CIFAR values (§4.2),
# not AdamW's (an lr of 1e-3 barely moves SGD, 0.1 of L2 decay would swamp the gradient, and the
# paper does not clip).
SGD_DEFAULTS = {"lr": 0.1, "weight_decay": 1e-4, "clip_grad": 0.0}
POS_RESAMPLE = ("bilinear", "pad")     # --pos-resample: how --init brings position embeddings to a new grid
CROP_PADDING = 4                       # random crop padding at the data's own size (32 px for CIFAR-10)
# The recipe's model: the paper's hybrid (ResNet stages make the tokens, then the ViT blocks), which
# reaches 80% in the recipe's 20 epochs where the pure ViT (cifar-recipe) reaches 75-77% (README).
DEFAULT_PRESET = "cifar-hybrid"
CHECKPOINT = "checkpoint.npz"          # file names inside the output directory
BEST = "best.npz"
METRICS = "metrics.csv"
CURVES = "curves.png"
EMA = "ema.npz"                        # with --ema-decay: the moving average's weights after the last epoch
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "epoch_seconds", "images_per_second")
EMA_COLUMNS = ("ema_test_loss", "ema_test_acc")   # after these, with --ema-decay: the EMA weights' test


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite: training diverged."""


# How many training steps keep their loss, correct count and gradient norm on the device before
# they are read (and checked) together. On a GPU each read is a host wait: the host stops queueing
# kernels until the GPU has finished everything queued, so reading every step leaves the GPU idle
# while the next step's first kernels are launched. 16 steps share one such wait (a few percent
# of a step, spread over 16), while the progress bar stays within 16 steps and a diverged run
# stops at most 15 steps after the step that diverged, with that step named, and before any
# checkpoint. On the CPU the numbers are on the host already and reading costs nothing: every
# step is read, and the bar is always current (a CPU step takes seconds).
READ_EVERY = {"cpu": 1, "gpu": 16}


class _Tally:
    """One epoch's training loss sum, correct count and images seen, summed over the ranks, from
    steps whose numbers wait on the device in `pending` until read() reads them all at once."""

    def __init__(self, comm, recipe, epoch):
        self.comm, self.recipe, self.epoch = comm, recipe, epoch
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.pending = []          # (step, lr, images of this rank's shard, of the batch, loss, correct, grad_norm)

    def add(self, step, lr, shard, batch, loss, correct, grad_norm):
        self.pending.append((step, lr, shard, batch, loss, correct, grad_norm))

    def read(self, saved):
        """Read the pending steps (one all-reduce for all of them with K ranks), check each one's
        loss and gradient norm in step order and add them up, as each step once did by itself."""
        values = []
        for _, _, shard, _, loss, correct, _ in self.pending:
            values += [float(loss) * shard, int(correct)]
        values = self.comm.sum(values)               # every rank reads at the same steps
        for k, (step, lr, _, batch, _, _, grad_norm) in enumerate(self.pending):
            batch_loss, batch_correct = values[2 * k], values[2 * k + 1]
            loss = batch_loss / batch
            if not math.isfinite(loss):
                raise NonFiniteLossError(_diverged("loss", loss, self.epoch, step, lr, saved, self.recipe))
            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                raise NonFiniteLossError(_diverged("gradient norm", float(grad_norm), self.epoch, step, lr, saved,
                                                   self.recipe))
            self.loss_sum += batch_loss
            self.correct += int(batch_correct)
            self.seen += batch
        self.pending = []


@dataclass
class TrainResult:
    status: str                    # "finished", "interrupted" or "already finished"
    epochs_completed: int
    history: list                  # one dict per epoch, with METRIC_COLUMNS
    out_dir: Path
    stopped_by: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM)

    @property
    def exit_code(self) -> int:
        """The shell's convention: 0 when done, 128 + the signal's number when a signal stopped
        the run (130 for Ctrl-C, 143 for SIGTERM). A KeyboardInterrupt that no handler turned
        into a signal (stopped_by None) counts as Ctrl-C."""
        if self.status != "interrupted":
            return 0
        return 128 + (self.stopped_by or signal.SIGINT)


# ============================================================================= the training loop

def train(config, data, recipe: Recipe, out_dir, *, resume: bool = False,
          init_state: dict | None = None, mean=CIFAR10_MEAN, std=CIFAR10_STD,
          device: str = "cpu", log_every: int = 100, run_info: dict | None = None,
          allow_other_data: bool = False, dtype=np.float32, read_every: int | None = None) -> TrainResult:
    """Train the model of `config` (a ViTConfig, HybridConfig or ResNetConfig: build_model) on
    `data` with `recipe`, writing checkpoints and metrics to out_dir.

    data        anything with uint8 train_images / test_images (n, C, S, S) and integer
                train_labels / test_labels (n,), like minivit.data.CIFAR10; with
                recipe.image_size, both splits are resized to it first (config.img_size must match)
    resume      continue the run saved in out_dir/checkpoint.npz (config, recipe and data must
                match it); without it, out_dir must not exist or be empty
    init_state  starting weights ({name: array}, e.g. pretrained ones) instead of a random init
    mean, std   per-channel normalisation of pixels in [0, 1]
    log_every   print a `step | loss | acc | img/s` line every this many steps (0: never)
    run_info    JSON-able notes kept in the checkpoint (preset name, overrides, --init path and
                --pos-resample)
    allow_other_data  resume even though the data's fingerprint differs from the one the run
                started with (same numbers of images, other content), on purpose
    dtype       float32 (the recipe) or float64 (tests that compare two runs to a tight tolerance)
    read_every  read the loss, accuracy and gradient norm from the device every this many steps
                (None: READ_EVERY of the device); the numbers do not depend on it

    Started K times by an MPI launcher (`mpiexec -n K`), the K processes train together, data
    parallel (minivit.distributed): each takes its shard of every batch, the gradients are
    summed, and all take the same step. An error on any of them stops all of them.
    """
    comm = distributed.init()
    with comm.abort_on_error("minivit train"), comm.only_rank0_prints():
        return _train(comm, config, data, recipe, Path(out_dir), resume, init_state, mean, std, device, log_every,
                      run_info, allow_other_data, dtype, read_every)


def _train(comm, config, data, recipe, out_dir, resume, init_state, mean, std, device, log_every, run_info,
           allow_other_data, dtype, read_every) -> TrainResult:
    """train(), as each rank runs it: rank comm.rank of comm.size (0 of 1 without MPI)."""
    checkpoint_path, best_path = out_dir / CHECKPOINT, out_dir / BEST
    comm.use_device(device)                      # K GPU ranks: one GPU each, NCCL between them
    check_device(device)
    if read_every is None:
        read_every = READ_EVERY[device]
    if isinstance(read_every, bool) or not isinstance(read_every, numbers.Integral) or read_every < 1:
        raise ValueError(f"read_every must be an integer >= 1, got {read_every!r}")
    _check_data(data, config, recipe.image_size)
    # The first N images of each split; slicing makes views, nothing is copied.
    train_images = data.train_images[:recipe.limit_train]       # uint8 (n_train, C, S0, S0)
    train_labels = data.train_labels[:recipe.limit_train]       # (n_train,)
    test_images = data.test_images[:recipe.limit_test]          # uint8 (n_test, C, S0, S0)
    test_labels = data.test_labels[:recipe.limit_test]          # (n_test,)
    n_train, n_test = len(train_images), len(test_images)
    B = recipe.batch_size
    steps_per_epoch = math.ceil(n_train / B)     # the last batch of an epoch may be smaller
    total_steps = recipe.epochs * steps_per_epoch
    warmup_steps = round(recipe.warmup * steps_per_epoch)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    # The fingerprint is of the data as loaded, before any resizing: it says which data set the
    # run trains on, and the resizing is the recipe's (image_size, checked on resume as part of
    # it). So a run and its resumption agree, and hashing never touches the larger resized copy.
    fingerprint = data_fingerprint(train_images, train_labels, test_images, test_labels)
    _check_ranks(comm.size, B, n_train, n_test)
    data_side = train_images.shape[-1]           # S0, the data's own image side
    padding, resized = CROP_PADDING, ""
    if recipe.image_size is not None:
        start = time.perf_counter()
        train_images = resize_images(train_images, recipe.image_size)   # uint8 (n_train, C, S, S)
        test_images = resize_images(test_images, recipe.image_size)     # uint8 (n_test, C, S, S)
        resized = (f" (resized from {data_side}x{data_side}, bilinear, in {time.perf_counter() - start:.1f} s)")
        # The crop's padding scales with the image: 4 px at 32 (an eighth of the image) becomes 6
        # at 48 and 8 at 64, so the crop shifts the same part of the scene as at the data's own
        # size, and a run at S differs from a run at 32 px in resolution only, not in how strongly
        # it is augmented. (Without --image-size the padding stays 4 at any size, as it was.)
        padding = CROP_PADDING * recipe.image_size // data_side

    # ---- the model, the optimiser and the two random generators
    notes = []                                   # printed under the settings
    if resume:
        if comm.rank == 0:                       # rank 0 alone changes files; every rank reads
            _clean_for_resume(out_dir)
        state, optim_state, meta = load_checkpoint(checkpoint_path)
        # Read and checked before the model allocates anything (load_checkpoint compares the
        # file's names and shapes with its config first): a small file must not make a big model.
        notes = _check_resume(meta, config, recipe, n_train, n_test, fingerprint, mean, std, checkpoint_path,
                              allow_other_data)
        saved_ranks = meta.get("ranks", 1)
        if saved_ranks != comm.size:
            notes.append(f"the run was saved by {saved_ranks} rank{'s' * (saved_ranks != 1)} and goes on with "
                         f"{comm.size}: the same training, but the gradient's terms are summed in another order, "
                         f"so the weights differ from a run that kept {saved_ranks} by float rounding")
    elif comm.rank == 0:
        _check_new_out_dir(out_dir)
    model = _new_model(config, recipe.seed)      # its Generator draws the initial weights, then dropout masks
    model.astype(dtype)
    if init_state is not None:
        model.load_state_dict(init_state)
    # The data Generator gets its own stream, so changing the model (and with it the number of
    # draws its initialisation takes) does not change the order of the images.
    data_rng = np.random.default_rng([recipe.seed, 1])
    history, start_epoch, progress = [], 0, None
    if resume:
        model.load_state_dict(state)
        model_rng = np.random.default_rng()
        model_rng.bit_generator.state = meta["rng"]["model"]
        model.seed(model_rng)                    # every block draws from this one Generator
        data_rng.bit_generator.state = meta["rng"]["data"]
        start_epoch, history, progress = meta["epoch"], meta["metrics"], meta["progress"]
    model.to(device)
    optimizer = make_optimizer(model, recipe)
    if resume:
        optimizer.load_state_dict(optim_state)
    params = model.parameters()
    # The moving average of the weights (--ema-decay), built after the optimiser packed the
    # parameters into flat buffers, so that its update is one pass over each.
    ema = ModelEma(model, recipe.ema_decay, recipe.ema_warmup) if recipe.ema_decay > 0 else None
    if ema is not None and resume:
        saved_ema = load_checkpoint_ema(checkpoint_path)
        if saved_ema is None:
            raise ValueError(f"cannot resume {checkpoint_path}: the run keeps an EMA of its weights "
                             f"(--ema-decay {recipe.ema_decay}), but the checkpoint holds none")
        ema.load_state_dict(saved_ema)
    mixup = recipe.mixup                         # mixup / cutmix of each batch, when an alpha is above 0
    num_classes = config.num_classes
    fill = tuple(255 * m for m in mean)          # RandAugment and erasing paint the mean colour: 0 once normalised
    best_acc = max((row["test_acc"] for row in history), default=-1.0)

    def save(path, epoch, progress=None, with_optimizer=True):
        """Everything needed to continue (or to evaluate) the run, in one file."""
        rng_state = {"data": data_rng.bit_generator.state, "model": model.rng.bit_generator.state}
        extra = {"recipe": recipe.to_dict(), "metrics": history, "progress": progress,
                 "data": {"train_images": n_train, "test_images": n_test, "fingerprint": fingerprint},
                 "normalize": {"mean": mean, "std": std}, "run": run_info or {},
                 "ranks": comm.size, "minivit_version": __version__}
        save_checkpoint(path, model, optimizer if with_optimizer else None, epoch, rng_state, extra,
                        ema=ema.state_dict() if ema is not None and with_optimizer else None)

    def save_ema(epoch):
        """ema.npz: the averaged weights as a weights-only checkpoint (`minivit eval ema.npz`)."""
        with ema.applied_to(model):
            save(out_dir / EMA, epoch, with_optimizer=False)

    # ---- print the resolved settings (only rank 0's prints are shown)
    preset = (run_info or {}).get("preset")
    resumed = ""
    if resume:
        resumed = (f" (resumed after epoch {start_epoch})" if progress is None else
                   f" (resumed in epoch {start_epoch + 1}, after step {progress['step']})")
    print(f"minivit train{resumed}")
    print(f"  model   {preset + ': ' if preset else ''}{config}")
    print(f"          {model.num_parameters():,} parameters, on the {device}")
    print("  recipe  " + " ".join(f"{k}={v}" for k, v in recipe.to_dict().items()))
    print(f"  data    {n_train} training and {n_test} test images of {'x'.join(map(str, train_images.shape[1:]))}"
          f"{resized}; {steps_per_epoch} steps per epoch, {total_steps} steps, {warmup_steps} of warmup; "
          f"random crop padding {padding}")
    stronger = []                                # the options of minivit.augment and minivit.ema that are on
    if recipe.randaug_n > 0:
        stronger.append(f"RandAugment {recipe.randaug_n} ops at magnitude {recipe.randaug_m:g}")
    if recipe.reprob > 0:
        stronger.append(f"random erasing p {recipe.reprob:g}")
    if mixup.enabled:
        kinds = [f"{kind} alpha {alpha:g}" for kind, alpha in (("mixup", recipe.mixup_alpha),
                                                                ("cutmix", recipe.cutmix_alpha)) if alpha > 0]
        both = f", switch prob {recipe.switch_prob:g}" if len(kinds) == 2 else ""
        stronger.append(f"{' or '.join(kinds)} (mix prob {recipe.mix_prob:g}{both})")
    if ema is not None:
        stronger.append(f"EMA of the weights, decay {recipe.ema_decay:g}{' with warmup' * recipe.ema_warmup}")
    if stronger:
        print("  extra   " + "; ".join(stronger))
    if comm.size > 1:
        per_rank = f"{B // comm.size}" if B % comm.size == 0 else f"{B // comm.size}-{B // comm.size + 1}"
        print(f"  ranks   {comm.size} processes (MPI), data parallel: {per_rank} of the {B} images of each "
              f"batch per rank")
    print(f"  out     {out_dir}")
    for note in notes:
        print(f"note: {note}")
    if resume and comm.rank == 0:
        # The checkpoint is the record of the run; what is derived from it may lag behind when
        # a save was killed between the files, so it is made right before anything else.
        _repair_outputs(out_dir, history, start_epoch, progress, recipe.label_smoothing,
                        lambda: save(best_path, start_epoch, with_optimizer=False))
        if ema is not None and history and progress is None:
            save_ema(start_epoch)                # a kill may have left it an epoch behind the checkpoint
    if start_epoch >= recipe.epochs:
        print(f"the run is already complete ({start_epoch}/{recipe.epochs} epochs); nothing to do")
        return TrainResult("already finished", start_epoch, history, out_dir)

    saved = None                                 # the last checkpoint on disk, for messages
    if resume:
        saved = f"{checkpoint_path} (epoch {start_epoch})" if progress is None else \
            f"{checkpoint_path} (epoch {start_epoch + 1}, stopped after step {progress['step']})"
    bar = None
    with _StopOnSignal() as stop:
        try:
            for epoch in range(start_epoch, recipe.epochs):
                model.train()
                epoch_start = time.perf_counter()
                # A new order of the training images each epoch. A run stopped mid-epoch saved
                # the Generator's state from before this draw, so resuming draws the same order.
                if progress is not None:
                    data_rng.bit_generator.state = progress["order_rng"]
                order_rng = data_rng.bit_generator.state
                order = data_rng.permutation(n_train)                              # (n_train,)
                first_step, train_seconds = 0, 0.0
                tally = _Tally(comm, recipe, epoch)           # this epoch's loss sum, correct count, images
                if progress is not None:      # continue the stopped epoch where it was left
                    data_rng.bit_generator.state = progress["data_rng"]
                    first_step, train_seconds = progress["step"], progress["train_seconds"]
                    tally.loss_sum, tally.correct = progress["loss_sum"], progress["correct"]
                    tally.seen = progress["seen"]
                    progress = None
                seconds_before_resume = train_seconds
                lr = optimizer.lr
                bar = tqdm(total=n_train, initial=tally.seen, unit="img", desc=f"epoch {epoch + 1}/{recipe.epochs}",
                           leave=False, dynamic_ncols=True, mininterval=0.5)

                for step in range(first_step, steps_per_epoch):
                    step_start = time.perf_counter()
                    global_step = epoch * steps_per_epoch + step
                    index = order[step * B:(step + 1) * B]                         # (B,), fewer at the end
                    images = augment(train_images[index], data_rng, padding)       # uint8 (B, C, S, S)
                    if recipe.randaug_n > 0:
                        images = rand_augment(images, data_rng, recipe.randaug_n, recipe.randaug_m, fill)
                    if recipe.reprob > 0:
                        images = random_erasing(images, data_rng, recipe.reprob, fill)  # uint8 (B, C, S, S)
                    # With K ranks each keeps its shard of the batch (lo:hi, b = hi - lo images),
                    # after the whole batch was augmented as one process would; K = 1 keeps all.
                    lo, hi = comm.shard(len(index))
                    x = normalize(to_device(images[lo:hi], device), mean, std, dtype)   # (b, C, S, S)
                    y = to_device(train_labels[index[lo:hi]], device)                   # (b,)
                    if mixup.enabled:
                        # One mixing for the whole batch (the same draw on every rank); each rank
                        # mixes its shard with the partners' normalised images. Accuracy counts
                        # the label that weighs more in each mixed image.
                        mix = mixup.draw(data_rng, len(index), *images.shape[2:])
                        if mix.perm is not None:
                            partner = normalize(to_device(images[mix.perm[lo:hi]], device), mean, std, dtype)
                            x = mix_images(x, partner, mix)                            # (b, C, S, S)
                        labels = train_labels[index]                                   # (B,)
                        target = to_device(mix_targets(labels, num_classes, mix, recipe.label_smoothing)[lo:hi],
                                           device).astype(dtype)                       # (b, K)
                        y = to_device(dominant_labels(labels, mix)[lo:hi], device)     # (b,)
                    lr = optimizer.lr = learning_rate(recipe, global_step, total_steps, warmup_steps)

                    share = (hi - lo) / len(index)            # this rank's part of the batch's mean loss
                    comm.sync_batchnorm(model, share)         # K > 1: BatchNorm over the whole batch
                    comm.seed_dropout(model, recipe.seed, global_step)             # K > 1: masks per rank
                    logits = model(x)                                              # (b, K)
                    if mixup.enabled:
                        loss, loss_cache = soft_target_cross_entropy_forward(logits, target)
                        dlogits = soft_target_cross_entropy_backward(loss_cache)       # (b, K)
                    else:
                        loss, loss_cache = cross_entropy_forward(logits, y, recipe.label_smoothing)
                        dlogits = cross_entropy_backward(loss_cache)                   # (b, K)
                    model.zero_grad()
                    model.backward(dlogits)                                        # fills every p.grad
                    # The gradient of the whole batch's mean loss: the shards' gradients weighted by
                    # their share of the batch, summed over ranks (one all-reduce; nothing with K = 1).
                    comm.sum_gradients(params, share)
                    grad_norm = None
                    if recipe.clip_grad > 0:
                        # Scales all gradients together when their global norm is above clip_grad
                        # (on the device: the norm is read with the loss, below).
                        grad_norm = clip_grad_norm(params, recipe.clip_grad, sync=False)
                    optimizer.step()
                    if ema is not None:
                        ema.update(model, global_step + 1)    # the run's optimiser steps so far, from 1
                    # The loss, the correct count and the norm stay where they were computed (on a
                    # GPU, reading one makes the host wait for the whole step) until read_every
                    # steps have gathered, a line is logged, the epoch ends or a signal stops the
                    # run: then all are read at once, and a non-finite one stops the run with the
                    # step it came from, before any checkpoint is written.
                    tally.add(step, lr, hi - lo, len(index), loss, (logits.argmax(axis=1) == y).sum(), grad_norm)
                    logging = log_every and (global_step + 1) % log_every == 0
                    # A signal may reach the ranks in different steps: they agree to stop after
                    # the same one (the largest signal number; 0 while none came).
                    stop_signal = comm.max(stop.requested or 0)
                    read = len(tally.pending) >= read_every or logging or stop_signal or step == steps_per_epoch - 1
                    if read:
                        tally.read(saved)     # on a GPU this waits for the steps read: timed with them
                    train_seconds += time.perf_counter() - step_start

                    bar.update(len(index))
                    if read:
                        bar.set_postfix(loss=f"{tally.loss_sum / tally.seen:.4f}",
                                        acc=f"{tally.correct / tally.seen:.4f}", refresh=False)
                    if logging:
                        tqdm.write(f"step {global_step + 1}/{total_steps} | loss {tally.loss_sum / tally.seen:.4f} | "
                                   f"acc {tally.correct / tally.seen:.4f} | {tally.seen / train_seconds:.1f} img/s | "
                                   f"lr {lr:.3g}")
                    if stop_signal:
                        # Stopped between two steps: the state is consistent, save it mid-epoch.
                        stopped = {"step": step + 1, "order_rng": order_rng, "data_rng": data_rng.bit_generator.state,
                                   "loss_sum": tally.loss_sum, "correct": tally.correct, "seen": tally.seen,
                                   "train_seconds": train_seconds}
                        if comm.rank == 0:
                            save(checkpoint_path, epoch, progress=stopped)
                        comm.barrier()                # nobody exits before the checkpoint is on disk
                        bar.close()
                        print(f"stopped at epoch {epoch + 1}, step {step + 1}/{steps_per_epoch}; "
                              f"saved {checkpoint_path}")
                        _print_resume_hint(out_dir)
                        return TrainResult("interrupted", epoch, history, out_dir, signal.Signals(stop_signal))
                bar.close()

                # ---- end of the epoch: test, save, report
                # Each rank tests its shard of the test set; the whole set's loss and accuracy are
                # the shards' weighted by their share of it (with K = 1 the weight is 1).
                lo, hi = comm.shard(n_test)
                test_loss, test_acc = evaluate(model, test_images[lo:hi], test_labels[lo:hi], B, mean, std, device)
                test_loss, test_acc = comm.sum([test_loss * ((hi - lo) / n_test), test_acc * ((hi - lo) / n_test)])
                # Wall time of the epoch (training and testing); images_per_second counts the
                # training steps only.
                epoch_seconds = time.perf_counter() - epoch_start + seconds_before_resume
                row = {"epoch": epoch + 1, "lr": lr, "train_loss": tally.loss_sum / tally.seen,
                       "train_acc": tally.correct / tally.seen, "test_loss": test_loss, "test_acc": test_acc,
                       "epoch_seconds": epoch_seconds, "images_per_second": tally.seen / train_seconds}
                ema_note = ""
                if ema is not None:
                    # The averaged weights on the same test images (their test time is not in epoch_seconds).
                    with ema.applied_to(model):
                        ema_loss, ema_acc = evaluate(model, test_images[lo:hi], test_labels[lo:hi], B, mean, std,
                                                     device)
                    ema_loss, ema_acc = comm.sum([ema_loss * ((hi - lo) / n_test), ema_acc * ((hi - lo) / n_test)])
                    row.update(ema_test_loss=ema_loss, ema_test_acc=ema_acc)
                    ema_note = f" | ema test loss {ema_loss:.4f} acc {ema_acc:.4f}"
                history.append(row)
                # The checkpoint first: it is the record of the run; metrics.csv and curves.png
                # are redrawn from its history, so they never get ahead of it. Rank 0 alone
                # writes; the barrier keeps the others from going on before the files are there.
                if comm.rank == 0:
                    save(checkpoint_path, epoch + 1)
                    if test_acc > best_acc:
                        save(best_path, epoch + 1, with_optimizer=False)
                    if ema is not None:
                        save_ema(epoch + 1)
                    write_metrics_csv(out_dir / METRICS, history)
                    plot_curves(out_dir / CURVES, history, recipe.label_smoothing)
                comm.barrier()
                saved = f"{checkpoint_path} (epoch {epoch + 1})"
                best_acc = max(best_acc, test_acc)
                print(f"epoch {epoch + 1}/{recipe.epochs} | "
                      f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                      f"test loss {test_loss:.4f} acc {test_acc:.4f}{ema_note} | "
                      f"{epoch_seconds:.1f} s, {row['images_per_second']:.1f} img/s | lr {lr:.3g}")
                stop_signal = comm.max(stop.requested or 0)     # as after each step: all ranks agree
                if stop_signal:
                    print(f"stopped after epoch {epoch + 1}; saved {checkpoint_path}")
                    _print_resume_hint(out_dir)
                    return TrainResult("interrupted", epoch + 1, history, out_dir, signal.Signals(stop_signal))
        except KeyboardInterrupt:
            # A second Ctrl-C or SIGTERM (or a Ctrl-C outside the main thread's handler) can land
            # in the middle of a step, when the weights may be half updated: nothing is saved now.
            if bar is not None:
                bar.close()
            print(f"\ninterrupted; the step in progress was not saved. "
                  + (f"The last checkpoint is {saved}." if saved else "No checkpoint was written yet."))
            if saved:
                _print_resume_hint(out_dir)
            # With K ranks the others may wait in an all-reduce this rank never reaches: end them all.
            comm.abort(128 + (stop.requested or signal.SIGINT))
            return TrainResult("interrupted", len(history), history, out_dir, stop.requested)
        finally:
            if bar is not None:     # also on an error such as a diverged loss
                bar.close()

    best = max(history, key=lambda r: r["test_acc"])
    print(f"done: test accuracy {history[-1]['test_acc']:.4f} after {len(history)} epoch{'s' * (len(history) != 1)} "
          f"(best {best['test_acc']:.4f} at epoch {best['epoch']}); results in {out_dir}")
    return TrainResult("finished", len(history), history, out_dir)


def _new_model(config, seed):
    """build_model(config, seed), a ViT through this module's name `ViT` (which tests replace
    with an instrumented subclass)."""
    return ViT(config, seed=seed) if model_kind(config) == "vit" else build_model(config, seed)


def make_optimizer(model, recipe: Recipe):
    """The recipe's optimiser over optim.param_groups: weight decay on weight matrices and
    convolution kernels only (not on biases, LayerNorm or BatchNorm, positions, [CLS])."""
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                   weight_decay=recipe.weight_decay)
    return AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)


def learning_rate(recipe: Recipe, step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning rate of training step `step` (0-based, counted over the whole run): linear
    warmup over warmup_steps, then cosine decay to 0 (optim.warmup_cosine), or for the "step"
    schedule recipe.lr divided by 10 at each milestone, the fraction m of the run meaning step
    round(m * total_steps) (optim.warmup_step)."""
    if recipe.schedule == "step":
        milestones = [min(max(round(m * total_steps), 1), total_steps) for m in recipe.milestones]
        return warmup_step(step, total_steps, warmup_steps, recipe.lr, milestones)
    return warmup_cosine(step, total_steps, warmup_steps, recipe.lr)


def predict(model, images, batch_size, mean=CIFAR10_MEAN, std=CIFAR10_STD, device="cpu", flip=False):
    """Logits for uint8 images (n, C, S, S), as a NumPy (n, K) array: eval mode (no dropout), no augmentation.

    flip=True is test-time augmentation: every image is classified a second time mirrored left to
    right, and the two logits are averaged. Training flips images at random, so to the model both
    views are equally ordinary pictures of the same thing."""
    was_training = model.training
    model.eval()
    logits = []
    for start in tqdm(range(0, len(images), batch_size), desc="test", unit="batch", leave=False,
                      dynamic_ncols=True, mininterval=0.5):
        x = normalize(to_device(images[start:start + batch_size], device), mean, std, model.dtype)  # (B, C, S, S)
        out = model(x)                                                                   # (B, K)
        if flip:
            out = (out + model(x[..., ::-1].copy())) / 2                                 # mirror the width axis
        logits.append(to_numpy(out))
    model.clear_cache()              # forward keeps activations for a backward that will not come
    model.train(was_training)
    return np.concatenate(logits)                                                        # (n, K)


def evaluate(model, images, labels, batch_size, mean=CIFAR10_MEAN, std=CIFAR10_STD, device="cpu", flip=False):
    """(mean cross-entropy, accuracy) on uint8 images, from `predict`."""
    return score(predict(model, images, batch_size, mean, std, device, flip), labels)


def score(logits, labels):
    """(mean cross-entropy, accuracy) of NumPy logits (n, K) against labels (n,).

    The loss is the plain cross-entropy (no label smoothing), so it can be compared across runs."""
    loss, _ = cross_entropy_forward(logits, labels)
    return float(loss), float((logits.argmax(axis=1) == labels).mean())


def confusion_matrix(labels, predictions, num_classes):
    """counts[i, j] = how many images of true class i were classified as class j (rows add up to the
    number of images of each class; the diagonal holds the correct ones)."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)      # one count per (truth, guess) pair, repeats included
    return counts


def format_confusion(counts, classes):
    """The confusion matrix as a text table, with each class's accuracy and its most common mistake."""
    corner = "truth \\ guess"
    width = max(len(corner), *(len(c) for c in classes))
    short = [c[:5] for c in classes]
    lines = [corner.ljust(width) + "".join(f"{c:>6}" for c in short) + "   accuracy  most often taken for"]
    for i, name in enumerate(classes):
        row = counts[i]
        total = max(int(row.sum()), 1)
        wrong = row.copy()
        wrong[i] = -1                                 # the most common *wrong* guess
        j = int(wrong.argmax())
        mistake = f"{classes[j]} ({row[j] / total:.1%})" if row[j] > 0 else "-"
        lines.append(name.ljust(width) + "".join(f"{v:>6}" for v in row) + f"   {row[i] / total:>7.1%}   {mistake}")
    return "\n".join(lines)


def _diverged(what, value, epoch, step, lr, saved, recipe):
    return (f"the {what} is {value} at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}): training diverged "
            f"and was stopped. "
            + (f"The last good checkpoint is {saved}. " if saved else "No checkpoint was written yet. ")
            + _divergence_hint(recipe))


def _divergence_hint(recipe):
    """What to try next, given the settings that diverged: no advice to set what is already set."""
    tries = [f"a lower --lr (it was {recipe.lr:g})"]
    if recipe.warmup < recipe.epochs:            # --warmup may not be longer than --epochs
        tries.append(f"a longer --warmup (it was {recipe.warmup:g} epochs)")
    if recipe.clip_grad == 0:
        tries.append("--clip-grad 1 (clipping was off)")
    elif recipe.clip_grad > 1:
        tries.append(f"--clip-grad 1 (it was {recipe.clip_grad:g})")
    hint = "Try " + (tries[0] if len(tries) == 1 else ", ".join(tries[:-1]) + " or " + tries[-1]) + "."
    if 0 < recipe.clip_grad <= 1:
        hint += f" (Gradients were already clipped to a norm of {recipe.clip_grad:g}.)"
    return hint


def _print_resume_hint(out_dir):
    print(f"resume with: minivit train --resume --out {out_dir}")


class _StopOnSignal:
    """Within `with`, the first Ctrl-C (SIGINT) or SIGTERM only sets `.requested` to the signal:
    the loop finishes the step it is in and saves a checkpoint, so nothing half-updated is ever
    saved. SIGTERM is what `kill`, `docker stop`, Slurm and systemd send, so a run stopped by a
    scheduler keeps its last step too. A second signal raises KeyboardInterrupt at once.
    (Signal handlers can only be set in the main thread; elsewhere both keep their usual behaviour.)"""

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}     # the signals handled, as printed

    def __enter__(self):
        self.requested = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.NAMES:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum)
        tqdm.write(f"{self.NAMES[self.requested]}: stopping after this step and saving a checkpoint "
                   f"(a second Ctrl-C or SIGTERM quits at once)")

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


# ============================================================================= checks

def _check_image_size(config, image_size):
    """--image-size S resizes the images to S x S; the model must be made for that size."""
    if image_size is not None and config.img_size != image_size:
        raise ValueError(f"--image-size {image_size} resizes the images to {image_size}x{image_size}, but the model "
                         f"takes {config.img_size}x{config.img_size} images; add --set img_size={image_size}")


def _check_data(data, config, image_size=None):
    """The data fits the model: as it is, or once resized to image_size x image_size."""
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        if not isinstance(getattr(data, name, None), np.ndarray):
            raise TypeError(f"data.{name} must be a NumPy array, got {type(getattr(data, name, None)).__name__}")
    _check_image_size(config, image_size)
    expected = (config.in_chans, config.img_size, config.img_size)
    for split in ("train", "test"):
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise TypeError(f"data.{split}_images must be uint8 (n, C, S, S), got {images.dtype} {images.shape}")
        square = images.shape[2] == images.shape[3] and images.shape[1] == config.in_chans
        if image_size is not None and not square:     # resize_images makes square images of square ones
            raise ValueError(f"--image-size resizes square images with {config.in_chans} channels, but the "
                             f"{split} images are {'x'.join(map(str, images.shape[1:]))}")
        if image_size is None and tuple(images.shape[1:]) != expected:
            resize = f", or --image-size {config.img_size} to resize the images to the model's size" * square
            raise ValueError(f"the model takes images of {'x'.join(map(str, expected))} but the {split} images are "
                             f"{'x'.join(map(str, images.shape[1:]))}; for CIFAR-10 use a cifar-* preset "
                             f"(or --set img_size=32 --set num_classes=10){resize}")
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise ValueError(f"data.{split}_labels must be integers of shape ({len(images)},), "
                             f"got {labels.dtype} {labels.shape}")
        if len(images) == 0:
            raise ValueError(f"the {split} split is empty")
        if labels.min() < 0 or labels.max() >= config.num_classes:
            raise ValueError(f"{split} labels go from {labels.min()} to {labels.max()}, but the model has "
                             f"num_classes={config.num_classes}")


def _check_ranks(ranks, batch_size, n_train, n_test):
    """With K ranks every batch (the last, smaller one too) and the test set need K images or more:
    each rank takes a share of them, and a rank with none would have no mean loss to take."""
    last = n_train - (math.ceil(n_train / batch_size) - 1) * batch_size     # the last batch of an epoch
    for what, n in (("batch", min(batch_size, last)), ("test set", n_test)):
        if n < ranks:
            raise ValueError(f"{ranks} ranks need at least {ranks} images in every batch and in the test set, but "
                             f"the smallest {what} has {n}" + (f" (the last batch of an epoch: {n_train} images in "
                             f"batches of {batch_size})" if what == "batch" and last < batch_size else "")
                             + "; use fewer ranks, or change --batch-size or --limit-train / --limit-test")


def _check_new_out_dir(out_dir: Path):
    """Never write a new run over an old one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    _remove_stale_temp_files(out_dir)            # a killed first save leaves only its hidden temp file
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if (out_dir / CHECKPOINT).exists():
            raise ValueError(f"{out_dir} already holds a run ({CHECKPOINT}); continue it with "
                             f"`minivit train --resume --out {out_dir}`, or choose a new --out")
        raise ValueError(f"{out_dir} is not empty; choose a new --out (a new run goes into an empty directory)")
    out_dir.mkdir(parents=True, exist_ok=True)


# save_checkpoint and _write_atomically write each file to a hidden temporary file beside it,
# named by tempfile.mkstemp: "." + the file's name + "." + 8 random characters + ".tmp", then
# rename it over the file. A save killed before the rename leaves that temporary file behind.
_STALE_TEMP = re.compile(r"\.(?:%s)\.[a-z0-9_]{8}\.tmp"
                         % "|".join(map(re.escape, (CHECKPOINT, BEST, METRICS, CURVES, EMA))))


def _remove_stale_temp_files(out_dir: Path) -> list[str]:
    """Remove the temporary files that killed saves left in out_dir, and return their names.

    Only names of this module's own pattern go (e.g. .checkpoint.npz.k3x9_a0q.tmp); anything else
    is left alone. A temporary file can only be stale here: one run writes to an out_dir at a time."""
    if not out_dir.is_dir():
        return []
    removed = []
    for entry in sorted(out_dir.iterdir()):
        if _STALE_TEMP.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        print(f"removed {len(removed)} unfinished temporary file{'s' * (len(removed) != 1)} of an interrupted "
              f"save from {out_dir}: {', '.join(removed)}")
    return removed


def _clean_for_resume(out_dir: Path):
    """Before resuming: remove stale temporary files, and explain a run whose first save never finished."""
    removed = _remove_stale_temp_files(out_dir)
    if not (out_dir / CHECKPOINT).exists() and any(name.startswith(f".{CHECKPOINT}.") for name in removed):
        raise ValueError(f"nothing to resume in {out_dir}: the run was stopped during its first save of "
                         f"{CHECKPOINT}, so no checkpoint was completed (the unfinished temporary file is now "
                         f"removed); start the run again with --out {out_dir} and without --resume")


def data_fingerprint(train_images, train_labels, test_images, test_labels) -> str:
    """A short hash that tells one data set from another (16 hex digits), cheap even for all of
    CIFAR-10 (tens of milliseconds: nothing is copied but a sample).

    It covers every label, 64 fixed pixel positions of every image, and every pixel of up to 64
    images spread over each split: another data set of the same size, the same one shuffled, or
    one with other labels all change it. (A change confined to unsampled pixels does not.)"""
    h = hashlib.sha256()
    for images, labels in ((train_images, train_labels), (test_images, test_labels)):
        n = len(images)
        flat = images.reshape(n, -1)                                             # (n, C*S*S), a view
        h.update(repr((tuple(images.shape), str(images.dtype))).encode())
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        columns = np.unique(np.linspace(0, flat.shape[1] - 1, 64).astype(np.int64))
        rows = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(np.int64))
        h.update(flat.take(columns, axis=1).tobytes())                           # (n, 64); faster than flat[:, cols]
        h.update(np.ascontiguousarray(flat[rows]).tobytes())                     # (64, C*S*S)
    return h.hexdigest()[:16]


def _saved_recipe(meta) -> dict:
    """The recipe a checkpoint was trained with, fields added since it was saved filled in
    (and JSON's lists made tuples again, as in Recipe)."""
    saved = meta.get("recipe")
    if not isinstance(saved, dict):
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in {**RECIPE_FIELDS_ADDED, **saved}.items()}


def _check_resume(meta, config, recipe, n_train, n_test, fingerprint, mean, std, path, allow_other_data=False):
    """A resumed run must continue with exactly what it was started with. Returns notes to print."""
    problems, notes = [], []
    if "progress" not in meta or "rng" not in meta or meta.get("optimizer") is None:
        raise ValueError(f"{path} is not a training checkpoint that can be resumed (best.npz holds weights only)")
    saved_config = checkpoint_config(meta)      # a run saved before a new option gets its default
    saved = saved_config.to_dict()
    if model_kind(saved_config) != model_kind(config):
        problems.append(f"model differs (saved a {model_kind(saved_config)}, given a {model_kind(config)})")
    elif saved != config.to_dict():
        diff = {k: (v, config.to_dict().get(k)) for k, v in saved.items() if config.to_dict().get(k) != v}
        problems.append(f"model config differs (saved vs given: {diff})")
    saved_recipe = _saved_recipe(meta)
    if saved_recipe != recipe.to_dict():
        diff = {k: (v, recipe.to_dict().get(k)) for k, v in saved_recipe.items() if recipe.to_dict().get(k) != v}
        problems.append(f"recipe differs (saved vs given: {diff})")
    saved_data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    saved_fingerprint = saved_data.get("fingerprint")
    if {k: saved_data.get(k) for k in ("train_images", "test_images")} != {"train_images": n_train,
                                                                           "test_images": n_test}:
        problems.append(f"data differs (saved {saved_data.get('train_images')} train / "
                        f"{saved_data.get('test_images')} test images, given {n_train} train / {n_test} test images)")
    elif saved_fingerprint is None:
        notes.append(f"{path} has no fingerprint of its data (saved by an older minivit), so it cannot be checked "
                     f"that this is the data the run started with; the next checkpoint records it")
    elif saved_fingerprint != fingerprint:
        if allow_other_data:
            notes.append(f"continuing on other data than the run started with (fingerprint {fingerprint}, "
                         f"the run's was {saved_fingerprint}), as --allow-other-data asks")
        else:
            problems.append(f"data differs: the same numbers of images, but not the images or labels the run "
                            f"started with (fingerprint {fingerprint}, the run's is {saved_fingerprint}); pass the "
                            f"run's data (--data), or --allow-other-data to continue on this data on purpose")
    if meta.get("normalize") != {"mean": list(mean), "std": list(std)}:
        problems.append(f"normalisation differs (saved {meta.get('normalize')})")
    if problems:
        raise ValueError(f"cannot resume {path}: " + "; ".join(problems))
    return notes


def _repair_outputs(out_dir: Path, history, epoch, progress, label_smoothing, save_best):
    """Make metrics.csv, curves.png and best.npz agree with the checkpoint just resumed from.

    At the end of an epoch checkpoint.npz is saved first, then best.npz (if the epoch is the best
    so far), metrics.csv and curves.png. A run killed between those saves has a checkpoint that
    is ahead of the rest; resuming rewrites the two tables from the checkpoint's history, and
    best.npz from the checkpoint's weights when its epoch is the best one. `save_best()` saves
    the resumed model as best.npz."""
    if not history:
        return
    write_metrics_csv(out_dir / METRICS, history)
    plot_curves(out_dir / CURVES, history, label_smoothing)
    best_epoch = max(history, key=lambda r: r["test_acc"])["epoch"]   # the first of equals, as in the loop
    try:
        best_saved = read_checkpoint_meta(out_dir / BEST)["epoch"]
    except (OSError, ValueError, KeyError):        # missing or unreadable: rewrite it if possible
        best_saved = None
    if best_saved == best_epoch:
        return
    held = f"holds epoch {best_saved}" if best_saved is not None else "is missing or unreadable"
    if best_epoch == epoch and progress is None:     # the resumed weights are those of the best epoch
        save_best()
        print(f"repaired {out_dir / BEST}: it {held}, but the best test accuracy is at epoch {best_epoch}, "
              f"the checkpoint's; rewritten from the checkpoint")
    else:
        print(f"warning: {out_dir / BEST} {held}, but the best test accuracy is at epoch {best_epoch}, whose "
              f"weights are not saved any more; it is left as it is")


# ============================================================================= metrics and curves

def write_metrics_csv(path, history):
    """metrics.csv, one row per epoch, rewritten whole from the history each time."""
    text = io.StringIO()
    columns = METRIC_COLUMNS + (EMA_COLUMNS if history and all(k in history[0] for k in EMA_COLUMNS) else ())
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in columns})
    _write_atomically(path, text.getvalue().encode())


def read_metrics_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(path, history, label_smoothing=0.0):
    """curves.png: loss and accuracy against epoch, train and test."""
    # matplotlib.figure.Figure draws off-screen (Agg for .png) without pyplot, so no global
    # backend is switched and no window can open.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    smoothed = f", label smoothing {label_smoothing}" if label_smoothing else ""
    loss_ax.plot(epochs, [r["train_loss"] for r in history], "o-", label=f"train (augmented{smoothed})")
    loss_ax.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [r["train_acc"] for r in history], "o-", label="train (augmented)")
    acc_ax.plot(epochs, [r["test_acc"] for r in history], "o-", label="test")
    if history and "ema_test_acc" in history[0]:
        loss_ax.plot(epochs, [r["ema_test_loss"] for r in history], "o--", label="test, EMA weights")
        acc_ax.plot(epochs, [r["ema_test_acc"] for r in history], "o--", label="test, EMA weights")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    _write_atomically(path, png.getvalue())


def _write_atomically(path, content: bytes):
    """Write to a temporary file beside path, then rename it over path (never a half file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, DEFAULT_FILE_MODE)          # mkstemp made it private (0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ============================================================================= command line

def _load_data(data_path, limit_train, limit_test):
    """(CIFAR-10, where it was found), from --data / $MINIVIT_DATA / the cache (or downloaded)."""
    path = find_cifar10(data_path)
    # load_cifar10's limit cuts both splits; read only as much as the larger of the two needs.
    limit = None if limit_train is None or limit_test is None else max(limit_train, limit_test)
    return load_cifar10(path, limit=limit), Path(path).resolve()


def register(subparsers):
    r = RECIPE
    p = subparsers.add_parser(
        "train", help="train a ViT, hybrid or ResNet on CIFAR-10 (the recipe's hybrid ViT by default)",
        description="Train a model (ViT, hybrid ViT or ResNet: the preset names it) on CIFAR-10 with AdamW (or SGD "
                    "with momentum), linear warmup + cosine decay (or step decay), label smoothing, random crop + "
                    "flip. Writes checkpoint.npz, best.npz, metrics.csv and curves.png to --out.")
    p.add_argument("--preset", default=None,
                   help=f"model preset (default {DEFAULT_PRESET}); by kind: {list_presets()}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a field of the preset's config, e.g. --set depth=4, --set layers=2,2,2 (repeatable)")
    # Recipe options default to None, meaning "not given": the recipe's value is used, and a
    # resumed run can tell an option given on the command line from a default.
    p.add_argument("--epochs", type=int, metavar="N", help=f"number of epochs (default {r.epochs})")
    p.add_argument("--batch-size", type=int, metavar="N", help=f"images per step (default {r.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {r.lr})")
    p.add_argument("--weight-decay", type=float, metavar="WD",
                   help=f"weight decay: AdamW's decoupled one, SGD's L2 (default {r.weight_decay}; "
                        f"{SGD_DEFAULTS['weight_decay']} with --optimizer sgd)")
    p.add_argument("--warmup", type=float, metavar="EPOCHS",
                   help=f"epochs of linear warmup, fractions allowed (default {r.warmup})")
    p.add_argument("--label-smoothing", type=float, metavar="S", help=f"label smoothing (default {r.label_smoothing})")
    p.add_argument("--clip-grad", type=float, metavar="NORM",
                   help=f"max global gradient norm, 0 = off (default {r.clip_grad})")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help=f"adamw, or sgd (with momentum; then --lr, --weight-decay and --clip-grad default to He et "
                        f"al.'s {SGD_DEFAULTS['lr']}, {SGD_DEFAULTS['weight_decay']} and {SGD_DEFAULTS['clip_grad']:g} "
                        f"(off)) (default {r.optimizer})")
    p.add_argument("--momentum", type=float, help=f"SGD's momentum (default {r.momentum})")
    p.add_argument("--nesterov", action="store_true", default=None, help="SGD: Nesterov momentum")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help=f"after warmup: cosine decay to 0, or step: lr / 10 at each of --milestones "
                        f"(default {r.schedule})")
    p.add_argument("--milestones", metavar="F,F",
                   help=f"with --schedule step: fractions of the run where the lr is divided by 10 "
                        f"(default {','.join(map(str, r.milestones))}, He et al.'s 32k and 48k of 64k iterations)")
    p.add_argument("--randaug-n", type=int, metavar="N",
                   help=f"RandAugment (minivit.augment): N ops per image after the crop and flip, drawn from 14 "
                        f"(Cubuk et al. 2020) (default {r.randaug_n}: off)")
    p.add_argument("--randaug-m", type=float, metavar="M",
                   help=f"RandAugment's magnitude, 0..{MAX_MAGNITUDE} (default {r.randaug_m:g})")
    p.add_argument("--reprob", type=float, metavar="P",
                   help=f"random erasing: probability that an image gets one box of its mean colour (timm's "
                        f"--reprob) (default {r.reprob:g}: off)")
    p.add_argument("--mixup-alpha", type=float, metavar="A",
                   help=f"mixup: blend each batch with a permutation of itself, lambda ~ Beta(A, A); the labels are "
                        f"blended alike (default {r.mixup_alpha:g}: off)")
    p.add_argument("--cutmix-alpha", type=float, metavar="A",
                   help=f"cutmix: paste a box of another image of the batch, lambda ~ Beta(A, A) the share kept "
                        f"(default {r.cutmix_alpha:g}: off)")
    p.add_argument("--mix-prob", type=float, metavar="P",
                   help=f"with mixup or cutmix: probability that a batch is mixed (default {r.mix_prob:g})")
    p.add_argument("--switch-prob", type=float, metavar="P",
                   help=f"with both mixup and cutmix: probability that a mixed batch uses cutmix "
                        f"(default {r.switch_prob:g})")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help=f"keep an exponential moving average of the weights, decay D per step (e.g. 0.999); "
                        f"tested each epoch beside the weights, saved as ema.npz (default {r.ema_decay:g}: off)")
    p.add_argument("--ema-warmup", action="store_true", default=None,
                   help="with --ema-decay: timm ModelEmaV3's warmup of the decay, min(D, 1 - (1 + t) ** -2/3) "
                        "at step t")
    p.add_argument("--seed", type=int, metavar="N", help=f"random seed (default {r.seed})")
    p.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images only")
    p.add_argument("--limit-test", type=int, metavar="N", help="test on the first N test images only")
    p.add_argument("--image-size", type=int, metavar="S",
                   help="resize the images to S x S (bilinear) before training, e.g. 48 or 64 to fine-tune at a "
                        "higher resolution; the model must take S (--set img_size=S, or --init) (default: the "
                        "data's own 32)")
    p.add_argument("--init", metavar="PATH", help="start from pretrained weights (minivit.pretrained formats): "
                   "new 10-class head, position embeddings resampled to the image size (32, or --image-size)")
    p.add_argument("--pos-resample", choices=POS_RESAMPLE, default=None,
                   help="with --init at another image size: how the position embeddings reach the new grid; "
                        "bilinear = interpolated in 2-D (the paper's), pad = the old table's first rows, zeros "
                        "for the new ones (learned embeddings only) (default bilinear)")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10 archive or directory (default: $MINIVIT_DATA, "
                   "the cache, or download)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<preset>-<date>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out DIR from its checkpoint.npz")
    p.add_argument("--allow-other-data", action="store_true",
                   help="with --resume: continue even though the data differs from the data the run started with "
                        "(its fingerprint is checked)")
    p.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (NumPy) or gpu (CuPy) (default cpu)")
    p.add_argument("--log-every", type=int, default=100, metavar="N",
                   help="print a step | loss | acc | img/s line every N steps, 0 = never (default 100)")
    p.set_defaults(func=_run_train)

    e = subparsers.add_parser("eval", help="test accuracy of a checkpoint",
                              description="Evaluate a checkpoint (checkpoint.npz or best.npz) on the CIFAR-10 test "
                                          "images (by default the same ones its training run tested on): test loss, "
                                          "accuracy, and the confusion matrix with each class's accuracy.")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="a .npz file written by minivit train")
    e.add_argument("--data", metavar="PATH", help="CIFAR-10 archive or directory (default: where training found it)")
    e.add_argument("--limit-test", type=int, metavar="N", help="first N test images (default: as in training)")
    e.add_argument("--batch-size", type=int, metavar="N", help="images per batch (default: as in training)")
    e.add_argument("--flip", action="store_true",
                   help="test-time augmentation: also classify each image mirrored and average the two logits")
    e.add_argument("--device", choices=DEVICES, default="cpu")
    e.set_defaults(func=_run_eval)


def _fractions(text):
    """--milestones 0.5,0.75 -> (0.5, 0.75); Recipe checks the values."""
    try:
        return tuple(float(v) for v in text.split(",")) if text.strip() else ()
    except ValueError:
        raise ValueError(f"--milestones takes fractions separated by commas, e.g. 0.5,0.75, got {text!r}") from None


def _run_train(args) -> int:
    # Under `mpiexec -n K` every rank runs this; an error on any of them stops them all, and
    # only rank 0 prints (minivit.distributed). Without a launcher, comm does nothing.
    comm = distributed.init()
    with comm.abort_on_error("minivit train"), comm.only_rank0_prints():
        return _run_train_on_rank(args, comm)


def _run_train_on_rank(args, comm) -> int:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if getattr(args, f.name) is not None}
    if "milestones" in given:
        given["milestones"] = _fractions(given["milestones"])
    if args.log_every < 0:
        raise ValueError(f"--log-every must be >= 0, got {args.log_every}")
    if args.allow_other_data and not args.resume:
        raise ValueError("--allow-other-data only applies with --resume (a new run records the data it is given)")
    if args.pos_resample is not None and not args.init and not args.resume:
        raise ValueError(f"--pos-resample {args.pos_resample} only applies with --init PATH (it says how pretrained "
                         f"position embeddings are brought to a new image size)")
    if not args.resume:
        _check_optimizer_options(given)
    if args.resume:
        # A resumed run continues with its saved model and recipe; options that would change
        # them are refused rather than quietly ignored.
        if not args.out:
            raise ValueError("--resume needs --out DIR, the directory of the run to continue")
        if comm.rank == 0:                       # rank 0 alone changes files
            _clean_for_resume(Path(args.out))
        meta = read_checkpoint_meta(Path(args.out) / CHECKPOINT)
        saved = _saved_recipe(meta)
        changed = {k: v for k, v in given.items() if saved.get(k) != v}
        for name, value in (("preset", args.preset), ("set", args.overrides), ("init", args.init),
                            ("pos_resample", args.pos_resample)):
            if value:
                changed[name] = value
        if changed:
            raise ValueError(f"--resume continues {args.out} with its saved settings; remove "
                             + ", ".join(f"{_option(k)} {v}" for k, v in changed.items())
                             + " (or start a new run with a new --out)")
        config, recipe = checkpoint_config(meta), Recipe(**_saved_recipe(meta))
        mean, std = meta["normalize"]["mean"], meta["normalize"]["std"]
        # Without --data, look where the run found its data first (if that is still there).
        saved_data = (meta.get("run") or {}).get("data")
        data_path = args.data or (saved_data if saved_data and Path(saved_data).exists() else None)
        data, data_path = _load_data(data_path, recipe.limit_train, recipe.limit_test)
        # The checkpoints name the data the run goes on with (moved, or other data on purpose).
        run_info = {**(meta.get("run") or {}), "data": str(data_path)}
        result = train(config, data, recipe, args.out, resume=True, mean=mean, std=std, device=args.device,
                       log_every=args.log_every, run_info=run_info, allow_other_data=args.allow_other_data)
        return result.exit_code

    defaults = SGD_DEFAULTS if given.get("optimizer") == "sgd" else {}
    recipe = RECIPE.replace(**{**defaults, **given})    # validates every value
    init_state, mean, std = None, CIFAR10_MEAN, CIFAR10_STD
    if args.init:
        if args.preset:
            raise ValueError("--init takes the model from the pretrained file; leave out --preset")
        preset = Path(args.init).stem
        overrides = parse_overrides(args.overrides)      # --init loads ViTs
    else:
        preset = args.preset or DEFAULT_PRESET
        config = preset_with_overrides(preset, args.overrides)
        _check_image_size(config, recipe.image_size)    # before the data is loaded
    out_dir = Path(args.out) if args.out else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if comm.rank == 0:
        _check_new_out_dir_early(out_dir)        # fail before loading data, not after
    data, data_path = _load_data(args.data, recipe.limit_train, recipe.limit_test)
    if args.init:
        # A new zero-initialised head for the data set's classes, position embeddings resampled
        # to the image size it trains at (the data's own, or --image-size) the way --pos-resample
        # says; --set can still change shape-free options such as drop_path.
        pos_resample = args.pos_resample or "bilinear"
        img_size = recipe.image_size or data.train_images.shape[-1]
        pretrained, info = _load_init(args.init, num_classes=len(data.classes), img_size=img_size,
                                      seed=recipe.seed, pos_resample=pos_resample)
        config = pretrained.config.replace(**overrides)
        _check_image_size(config, recipe.image_size)    # only a --set img_size=... can make them differ
        init_state = pretrained.state_dict()
        mean, std = info["mean"], info["std"]    # normalise as the pretrained model was trained
        old, new = info["checkpoint_img_size"] // config.patch_size, config.grid_size
        if old == new:
            grid = f"grid {new}x{new} as saved"
        elif config.pos_embed in ("sincos2d", "none"):
            grid = f"grid {old}x{old} -> {new}x{new} (pos_embed={config.pos_embed}: nothing to resample)"
        else:
            grid = f"grid {old}x{old} -> {new}x{new}, position embeddings resampled ({pos_resample})"
        print(f"init: {args.init} ({info['format']}), head {info['head']}, {grid}, normalisation mean {mean} "
              f"std {std}")
    run_info = {"preset": preset, "overrides": args.overrides, "init": args.init,
                "pos_resample": pos_resample if args.init else None, "data": str(data_path),
                "command": "minivit " + " ".join(sys.argv[1:])}
    result = train(config, data, recipe, out_dir, init_state=init_state, mean=mean, std=std, device=args.device,
                   log_every=args.log_every, run_info=run_info)
    return result.exit_code


def _check_optimizer_options(given: dict):
    """Options that only mean something with another --optimizer or --schedule, or beside an
    option that is off (NEEDS), are refused, not silently ignored."""
    optimizer, schedule = given.get("optimizer", RECIPE.optimizer), given.get("schedule", RECIPE.schedule)
    for name in ("momentum", "nesterov"):
        if name in given and optimizer != "sgd":
            raise ValueError(f"{_option(name)} applies to --optimizer sgd only (the optimizer is {optimizer})")
    if "milestones" in given and schedule != "step":
        raise ValueError(f"--milestones applies to --schedule step only (the schedule is {schedule})")
    for name, (needed, what) in NEEDS.items():
        if name not in given:
            continue
        values = [given.get(n, getattr(RECIPE, n)) for n in re.split(r"[|&]", needed)]
        on = all(v > 0 for v in values) if "&" in needed else any(v > 0 for v in values)
        if not on:
            raise ValueError(f"{_option(name)} applies with {what}")


def _load_init(path, num_classes, img_size, seed, pos_resample):
    """(model, info) of minivit.pretrained.load_pretrained for --init PATH, which may also be the
    checkpoint.npz or best.npz of a `minivit train` run: its weights and normalisation then pass
    through a temporary timm-format file (save_pretrained), so that load_pretrained's new head and
    position resampling apply to them exactly as to any other file."""
    from .pretrained import load_pretrained, save_pretrained
    path = Path(path)
    if not is_train_checkpoint(path):
        return load_pretrained(path, num_classes=num_classes, img_size=img_size, seed=seed, pos_resample=pos_resample)
    source, meta = load_vit_checkpoint(path, "--init starts ViTs from ViT weights (it resamples their position "
                                             "embeddings), so it cannot be the source")
    norm = meta.get("normalize") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    with tempfile.TemporaryDirectory() as folder:
        weights = save_pretrained(source, Path(folder) / "init.safetensors", mean=norm["mean"], std=norm["std"])
        model, info = load_pretrained(weights, num_classes=num_classes, img_size=img_size, seed=seed,
                                      pos_resample=pos_resample)
    info.update(format=f"minivit train checkpoint, epoch {meta['epoch']}", source=str(path))
    return model, info


def _check_new_out_dir_early(out_dir: Path):
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        _check_new_out_dir(out_dir)              # raises with the precise reason


def _run_eval(args) -> int:
    state, _, meta = load_checkpoint(args.checkpoint)       # checked against its config before anything is built
    config = checkpoint_config(meta)
    saved = _saved_recipe(meta)
    limit_test = args.limit_test if args.limit_test is not None else saved.get("limit_test")
    batch_size = args.batch_size if args.batch_size is not None else saved.get("batch_size", RECIPE.batch_size)
    if limit_test is not None:
        _check_int("limit_test", limit_test, low=1)
    _check_int("batch_size", batch_size, low=1)
    norm = meta.get("normalize") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}

    model = _new_model(config, 0)
    model.load_state_dict(state)                 # the BatchNorm running averages too: eval normalises with them
    model.to(args.device)
    saved_data = (meta.get("run") or {}).get("data")     # where training found its data
    data_path = args.data or (saved_data if saved_data and Path(saved_data).exists() else None)
    data = load_cifar10(find_cifar10(data_path), limit=limit_test)
    image_size = saved.get("image_size")         # the run trained (and tested) on images resized to this
    _check_data(data, config, image_size)
    n, labels, images = len(data.test_images), data.test_labels, data.test_images
    if image_size is not None:
        side = images.shape[-1]
        images = resize_images(images, image_size)                       # uint8 (n, C, S, S)
        print(f"resized the {n} test images from {side}x{side} to {image_size}x{image_size} (bilinear), as in "
              f"training")
    logits = predict(model, images, batch_size, norm["mean"], norm["std"], args.device, args.flip)
    loss, acc = score(logits, labels)
    print(f"{args.checkpoint}: epoch {meta['epoch']}, {n} test images{' (and their mirror images)' * args.flip} | "
          f"test loss {loss:.4f} | test acc {acc:.4f} ({round(acc * n)}/{n} correct)")
    print(format_confusion(confusion_matrix(labels, logits.argmax(axis=1), len(data.classes)), data.classes))
    return 0
