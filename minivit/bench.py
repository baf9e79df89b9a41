"""`minivit bench`: a training step and inference of minivit (NumPy) beside PyTorch eager.

    minivit bench --preset cifar-lesson --batch-size 128
    minivit bench --preset resnet20 --batch-size 128 --threads 1     # any preset: ViT, hybrid, ResNet
    minivit bench --preset cifar-hybrid --batch-size 64
    minivit bench --preset vit-b16 --batch-size 8 --steps 6 --profile
    minivit bench --preset cifar-lesson --ops reference      # the clear ops of ops.py
    minivit bench --preset cifar-recipe --batch-size 512 --device gpu   # CuPy beside PyTorch CUDA

What is timed, for each framework, on the same images, labels and weights:
  train step   zero_grad, forward, mean cross-entropy, backward, AdamW update
               (BatchNorm in training mode: batch statistics, running averages updated)
  inference    forward in eval mode (BatchNorm with its running averages; PyTorch under
               torch.inference_mode())
The optimizer is the same for every kind of model and in both frameworks: AdamW with lr
1e-3, betas (0.9, 0.999), eps 1e-8 and weight decay 0.05 on every parameter (a fixed
update to time, not `minivit train`'s recipe, which for every kind is AdamW too but with
weight decay on weights only, gradient clipping and label smoothing).

The PyTorch models are written below with torch.nn and timm's / torchvision's names:
build_torch_vit (pre-norm blocks, fused qkv Linear, explicit q k^T -> softmax -> @ v
attention, exact or tanh GELU, LayerNorm with the config's eps, [CLS] + position
embedding, patch Conv2d), build_torch_resnet (torchvision's layout: stem, stages of basic
or bottleneck blocks, shortcut A, B, C or none, BatchNorm with the config's eps and
momentum) and build_torch_hybrid (the ViT with the ResNet's feature map as its image).
The twin loads minivit's weights and BatchNorm buffers by name and must compute the same
function before anything is timed (check_same_function: logits in eval mode and, where
there is BatchNorm, with batch statistics too, and the running averages that updates).
Both use float32 and the same thread count: torch.set_num_threads(N) for PyTorch,
threadpoolctl for NumPy's BLAS (without threadpoolctl, OPENBLAS_NUM_THREADS must be set
before Python starts). --ops switches the ops (fast: fastops.py and cnn_fastops.py;
reference: ops.py and cnn_ops.py), for the ViT's blocks and the ResNet's convolutions alike.

The machine is shared and timings drift, so the two frameworks run alternately in one
process (minivit, torch, torch, minivit, minivit, torch, ...) after a warm-up, and the
report gives the median images/s of each, their ratio minivit / PyTorch, and the spread
(min..max) of the ratios of the pairs run back to back.

--device gpu runs minivit on CuPy and PyTorch on CUDA (a CUDA build of PyTorch is needed),
TF32 off in both (CuPy's default; PyTorch's matmul and cuDNN flags set to False), so both
compute in float32. A GPU runs the work queued by a call after the call returns, so every
clock read is preceded by a wait for the device (backend.synchronize for minivit,
torch.cuda.synchronize for PyTorch); on the CPU those waits are no-ops.

Peak memory of a training step is measured in a fresh subprocess per framework (so
neither sees the other's allocations):
  RSS growth   peak resident memory (VmHWM) minus resident memory just before the first
               step, over 2 steps: gradients, optimizer state, activations kept for
               backward and temporaries, as the operating system sees them (memory that
               malloc keeps for reuse counts too).
  traced peak  the peak of the arrays allocated during one later step and alive at once
               (optimizer state already there, so: activations, gradients, temporaries):
               tracemalloc for NumPy (NumPy reports every array buffer to it), the
               profiler's allocation records (profile_memory=True) for PyTorch.

--profile adds where minivit's training step spends its time, op by op (forward and
backward), found by wrapping the active ops (fastops or ops), cnn_ops and the modules with
timers.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from . import cnn_fastops, cnn_ops, fastops, modules
from .backend import DEVICES, check_device, synchronize, to_device, to_numpy
from .config import HybridConfig, ViTConfig, config_from_dict, get_model_preset, list_presets, model_kind
from .model import build_model
from .resnet import BatchNorm2d, ResNetConfig
from .ops import cross_entropy_backward, cross_entropy_forward
from .optim import AdamW

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.05
OPTIMIZER = (f"AdamW (lr {LR:g}, betas {BETAS}, eps {EPS:g}, weight decay {WEIGHT_DECAY:g} on every parameter) "
             f"in both, for every kind of model (not minivit train's recipe)")
MIB = 2**20


# ----------------------------------------------------------------------------- threads

def set_threads(n: int, torch=None) -> str:
    """Use n threads in NumPy's BLAS (and PyTorch's intra-op pool). Returns how it was done."""
    if torch is not None:
        torch.set_num_threads(n)
    fastops.set_num_threads(n)          # the threads of fastops' blockwise elementwise work
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        return (f"NumPy BLAS threads from the environment (OPENBLAS_NUM_THREADS={env}); "
                f"pip install threadpoolctl to set them from --threads")
    threadpool_limits(n, user_api="blas")
    blas = [f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info() if i["user_api"] == "blas"]
    return "NumPy BLAS via threadpoolctl: " + ", ".join(blas)


# ----------------------------------------------------------------------------- the PyTorch twin

def build_torch_vit(config: ViTConfig, pos_table=None):
    """The same Vision Transformer in plain torch.nn, with minivit's (timm's) parameter names.
    pos_table: the fixed sine-cosine table of a "sincos2d" config (None: computed here)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    if pos_table is None and config.pos_embed == "sincos2d":
        pos_table = _pos_table(config)

    class DropPath(nn.Module):
        """Stochastic depth as timm: one keep-or-drop decision per sample, kept ones scaled up."""

        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            keep = 1.0 - self.p
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
            return x * mask

    class Attention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.heads = c.heads
            self.scale = c.head_size**-0.5
            self.qkv = nn.Linear(c.dim, 3 * c.dim, bias=c.qkv_bias)
            self.attn_drop = nn.Dropout(c.attn_dropout)
            self.proj = nn.Linear(c.dim, c.dim)
            self.proj_drop = nn.Dropout(c.dropout)

        def forward(self, x):
            B, N, D = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)                                    # each (B, H, N, hs)
            att = (q * self.scale) @ k.transpose(-2, -1)               # (B, H, N, N)
            att = self.attn_drop(att.softmax(dim=-1))
            y = (att @ v).transpose(1, 2).reshape(B, N, D)             # (B, N, D)
            return self.proj_drop(self.proj(y))

    class Mlp(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1 = nn.Linear(c.dim, c.hidden_dim)
            self.act = nn.GELU(approximate="none" if c.gelu == "exact" else "tanh")
            self.fc2 = nn.Linear(c.hidden_dim, c.dim)
            self.drop = nn.Dropout(c.dropout)

        def forward(self, x):
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    class Block(nn.Module):
        def __init__(self, c, drop_path):
            super().__init__()
            self.norm1 = nn.LayerNorm(c.dim, eps=c.ln_eps)
            self.attn = Attention(c)
            self.norm2 = nn.LayerNorm(c.dim, eps=c.ln_eps)
            self.mlp = Mlp(c)
            self.drop_path = DropPath(drop_path)

        def forward(self, x):
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))

    class PatchEmbed(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.proj = nn.Conv2d(c.in_chans, c.dim, kernel_size=c.patch_size, stride=c.patch_size)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)               # (B, G*G, D)

    class TorchViT(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.config = c
            self.patch_embed = PatchEmbed(c)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
            if c.pos_embed == "learned":
                self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, c.dim))
            elif c.pos_embed == "sincos2d":
                self.register_buffer("pos_table", torch.as_tensor(np.asarray(pos_table)), persistent=False)
            self.pos_drop = nn.Dropout(c.dropout)
            rates = np.linspace(0.0, c.drop_path, c.depth) if c.depth > 1 else [c.drop_path]
            self.blocks = nn.ModuleList([Block(c, float(r)) for r in rates])
            self.norm = nn.LayerNorm(c.dim, eps=c.ln_eps)
            self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes > 0 else nn.Identity()

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)   # (B, N, D)
            if self.config.pos_embed == "learned":
                x = x + self.pos_embed
            elif self.config.pos_embed == "sincos2d":
                x = x + self.pos_table
            x = self.pos_drop(x)
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
            x = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(dim=1)
            return self.head(x)

    return TorchViT(config)


def build_torch_resnet(config: ResNetConfig):
    """The same ResNet in plain torch.nn, laid out like torchvision's (nn.Sequential stages
    layer1.., `downsample` = Sequential(conv, bn)), so its state_dict has minivit's (and
    torchvision's) names in the same order. forward_features(x, pool=False) returns the last
    stage's feature map, as ResNet.forward_features does (the hybrid's backbone)."""
    from torch import nn
    from torch.nn import functional as F

    c = config

    class PadShortcut(nn.Module):
        """Option A: every stride-th pixel, the new channels zeros, half before and the rest after."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.cin, self.cout, self.stride = cin, cout, stride

        def forward(self, x):
            front = (self.cout - self.cin) // 2
            sub = x[:, :, ::self.stride, ::self.stride]                             # (B, Cin, Hout, Wout)
            return F.pad(sub, (0, 0, 0, 0, front, self.cout - self.cin - front))    # (B, Cout, Hout, Wout)

    def shortcut(cin, cout, stride):
        """The block's shortcut: a module, or None in a plain network (shortcut "none")."""
        changes = stride != 1 or cin != cout
        if c.shortcut == "none":
            return None
        if c.shortcut == "C" or (c.shortcut == "B" and changes):
            return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))
        return PadShortcut(cin, cout, stride) if changes else nn.Identity()

    def bn(channels):
        return nn.BatchNorm2d(channels, eps=c.bn_eps, momentum=c.bn_momentum)

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = bn(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = bn(planes)
            self.downsample = shortcut(cin, planes, stride)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))                   # (B, planes, Hout, Wout)
            out = self.bn2(self.conv2(out))
            return F.relu(out if self.downsample is None else out + self.downsample(x))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = bn(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = bn(planes)
            self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
            self.bn3 = bn(4 * planes)
            self.downsample = shortcut(cin, 4 * planes, stride)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))                   # (B, planes, H, W)
            out = F.relu(self.bn2(self.conv2(out)))                 # (B, planes, Hout, Wout)
            out = self.bn3(self.conv3(out))                         # (B, 4 planes, Hout, Wout)
            return F.relu(out if self.downsample is None else out + self.downsample(x))

    class TorchResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = c
            imagenet = c.stem == "imagenet"
            self.conv1 = nn.Conv2d(c.in_chans, c.widths[0], 7 if imagenet else 3, 2 if imagenet else 1,
                                   3 if imagenet else 1, bias=False)
            self.bn1 = bn(c.widths[0])
            self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
            block = BasicBlock if c.block == "basic" else Bottleneck
            cin = c.widths[0]
            self.stage_names = []
            for i, (depth, width) in enumerate(zip(c.layers, c.widths)):
                blocks = []
                for j in range(depth):
                    blocks.append(block(cin, width, 2 if i > 0 and j == 0 else 1))
                    cin = width * block.expansion
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
                self.stage_names.append(f"layer{i + 1}")
            self.fc = nn.Linear(cin, c.num_classes) if c.num_classes > 0 else None

        def forward_features(self, x, pool=True):
            x = self.maxpool(F.relu(self.bn1(self.conv1(x))))       # (B, C0, S/4, S/4) imagenet, (B, C0, S, S) cifar
            for name in self.stage_names:
                x = getattr(self, name)(x)                          # (B, width * expansion, H, W)
            return x.mean(dim=(2, 3)) if pool else x                # (B, F) or (B, F, h, w)

        def forward(self, x):
            x = self.forward_features(x)                            # (B, F)
            return x if self.fc is None else self.fc(x)             # (B, K)

    return TorchResNet()


def build_torch_hybrid(config: HybridConfig, pos_table=None):
    """The same hybrid ViT in plain torch.nn, with timm's names: build_torch_vit's model whose
    patch_embed is a HybridEmbed, build_torch_resnet's backbone (no fc) and then `proj`, a
    P x P convolution with stride P over its feature map."""
    from torch import nn

    c = config

    class HybridEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_torch_resnet(c.backbone_config)              # first: timm's order
            self.proj = nn.Conv2d(c.num_features, c.dim, kernel_size=c.patch_size, stride=c.patch_size)

        def forward(self, x):
            fmap = self.backbone.forward_features(x, pool=False)              # (B, F, h, w)
            return self.proj(fmap).flatten(2).transpose(1, 2)                 # (B, G*G, D)

    # The ViT that reads the feature map as its image (HybridConfig.vit_config); its own patch
    # embedding is replaced, in the same place among the modules, so the names keep their order.
    tmodel = build_torch_vit(c.vit_config, pos_table)
    tmodel.patch_embed = HybridEmbed()
    return tmodel


def build_torch(config, pos_table=None):
    """The PyTorch twin of any kind of model (ViT, hybrid, ResNet), freshly initialised by PyTorch."""
    kind = model_kind(config)
    if kind == "resnet":
        return build_torch_resnet(config)
    return (build_torch_hybrid if kind == "hybrid" else build_torch_vit)(config, pos_table)


def torch_twin(model):
    """A PyTorch model computing the same function as `model` (a ViT, HybridViT or ResNet),
    with a copy of its weights and BatchNorm buffers."""
    import torch

    tmodel = build_torch(model.config, getattr(model, "pos_table", None))
    state = {name: torch.from_numpy(to_numpy(v).copy()) for name, v in model.state_dict().items()}
    tmodel.load_state_dict(state, strict=True)
    return tmodel


def _batchnorm_train_mode(model, tmodel):
    """Everything in eval mode except BatchNorm, which uses the batch's statistics and updates
    its running averages: a deterministic forward pass (no dropout) through training-mode BN."""
    from torch import nn

    model.eval()
    tmodel.eval()
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            m.training = True
    for m in tmodel.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()


def check_same_function(model, tmodel, images, tol=1e-4) -> float:
    """images: a NumPy batch, copied to each model's device. Both models give the same logits (float32: up to ~1e-4 of their scale) in eval mode and,
    where there is BatchNorm, also with BatchNorm in training mode (the batch's statistics),
    after which the running averages and batch counters both updated must agree too (the same
    normalisation for the next steps). Returns the largest difference found, each relative to
    max(1, largest |value| of the twin's array)."""
    import torch

    def compare(what, ours, theirs):
        ours, theirs = to_numpy(ours).astype(np.float64), np.asarray(theirs, np.float64)
        scale = max(1.0, float(np.abs(theirs).max()))
        diff = float(np.abs(ours - theirs).max()) / scale
        if not diff <= tol:
            raise RuntimeError(f"minivit and the PyTorch twin disagree: max |{what} difference| / max(1, |{what}|) "
                               f"= {diff:.3g}")
        return diff

    modes = ["eval"]
    if any(isinstance(m, BatchNorm2d) for m in model.modules()):
        modes.append("batchnorm train")
    worst = 0.0
    tdevice = next(tmodel.parameters()).device
    for mode in modes:
        if mode == "eval":
            model.eval()
            tmodel.eval()
        else:
            _batchnorm_train_mode(model, tmodel)
        ours = model(to_device(images, model.device))
        model.clear_cache()
        with torch.no_grad():
            theirs = tmodel(torch.from_numpy(images).to(tdevice)).cpu().numpy()
        worst = max(worst, compare(f"logits ({mode})", ours, theirs))
    params = dict(model.named_parameters())
    ours_state = model.state_dict()
    for name, buffer in tmodel.state_dict().items():       # persistent buffers: BatchNorm's
        if name not in params:
            worst = max(worst, compare(name, ours_state[name], buffer.cpu().numpy()))
    model.eval()
    tmodel.eval()
    return worst


# ----------------------------------------------------------------------------- one step of each

def minivit_train_step(model, opt, images, labels):
    model.zero_grad()
    logits = model(images)                                       # (B, K)
    loss, cache = cross_entropy_forward(logits, labels)
    model.backward(cross_entropy_backward(cache))
    opt.step()
    return float(loss)


def minivit_infer(model, images):
    logits = model(images)
    model.clear_cache()   # eval forward passes still keep caches (a backward may follow); drop them
    return logits


def torch_train_step(tmodel, topt, timages, tlabels):
    import torch.nn.functional as F

    topt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(tmodel(timages), tlabels)
    loss.backward()
    topt.step()
    return loss.item()


def torch_infer(tmodel, timages):
    import torch

    with torch.inference_mode():
        return tmodel(timages)


def make_batch(config, batch_size: int, seed: int = 0):
    rng = np.random.default_rng([seed, 1])
    images = rng.standard_normal((batch_size, config.in_chans, config.img_size, config.img_size), dtype=np.float32)
    labels = rng.integers(0, max(config.num_classes, 1), size=batch_size)
    return images, labels


def make_minivit(config, seed=0, device="cpu"):
    model = build_model(config, seed=seed).to(device)
    opt = AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    return model, opt


def make_torch(model, device="cpu"):
    """The twin and its AdamW, on torch's `device` ("cpu" or "cuda")."""
    import torch

    tmodel = torch_twin(model).to(device)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    return tmodel, topt


# ----------------------------------------------------------------------------- alternating timing

def _no_wait():
    pass


def alternate(fa, fb, steps: int, warmup: int, sync_a=_no_wait, sync_b=_no_wait):
    """Run the two alternately, warm-up pairs first (untimed); returns the two lists of seconds.

    The order flips every pair (a b, b a, a b, ...), so neither always runs right after
    the other (whose threads may still be spinning down, whose data fills the caches).
    sync_a / sync_b wait until a's / b's device has finished what was queued (a GPU runs a
    call's kernels after the call returns); each is called right before every clock read
    around its framework's step, so a time is the step's work and nothing queued before it."""
    for _ in range(warmup):
        fa()
        fb()
    sync_a()
    sync_b()
    gc.collect()
    ta, tb = [], []
    for i in range(steps):
        pair = ((fa, sync_a, ta), (fb, sync_b, tb)) if i % 2 == 0 else ((fb, sync_b, tb), (fa, sync_a, ta))
        for f, sync, times in pair:
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t0)
    return ta, tb


def torch_device(torch, device: str) -> str:
    """PyTorch's device for minivit's ("cpu" or "gpu" -> "cuda"). On CUDA, TF32 is switched off
    for matrix products and cuDNN convolutions, so PyTorch computes in float32 as CuPy does by
    default (CUPY_TF32 unset)."""
    if check_device(device) == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"minivit bench --device gpu compares with PyTorch on CUDA, but this PyTorch "
                           f"({torch.__version__}) has no CUDA device (torch.cuda.is_available() is False); "
                           f"install a CUDA build of PyTorch")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "cuda"


def device_waits(torch, device: str):
    """(minivit's wait, PyTorch's wait) for the devices of --device: each a function that returns
    once its framework's queued work is done (no-ops on the CPU)."""
    if device == "cpu":
        return _no_wait, _no_wait
    return (lambda: synchronize(device)), torch.cuda.synchronize


def summarize(ta, tb, batch_size):
    """Median images/s of each, their ratio, and the spread (min, max) of the per-pair ratios."""
    pair = sorted(b / a for a, b in zip(ta, tb))                 # minivit img/s over torch img/s, per pair
    ips_a = batch_size / statistics.median(ta)
    ips_b = batch_size / statistics.median(tb)
    return {"minivit_img_s": ips_a, "torch_img_s": ips_b, "ratio": ips_a / ips_b,
            "ratio_min": pair[0], "ratio_max": pair[-1], "ratio_pair_median": statistics.median(pair),
            "minivit_ms": 1e3 * statistics.median(ta), "torch_ms": 1e3 * statistics.median(tb)}


# ----------------------------------------------------------------------------- memory (one subprocess per framework)

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _torch_traced_peak(step):
    """Peak bytes of PyTorch CPU allocations made during step() and live at once, from the
    profiler's allocation records (profile_memory=True). Like tracemalloc, frees of tensors
    that existed before the step are ignored. None if this PyTorch does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        records = []
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation":
                records.append((node.start_time_ns, fields.ptr, fields.alloc_size))
    except AttributeError:
        return None
    live = peak = 0
    mine = {}
    for _, ptr, size in sorted(records):
        if size > 0:
            mine[ptr] = size
            live += size
        elif ptr in mine:
            live -= mine.pop(ptr)
        peak = max(peak, live)
    return peak


def _release_free_memory():
    """Hand memory that malloc keeps after frees (e.g. initialisation temporaries) back to the
    OS, so the RSS baseline holds live data only and neither framework starts with a
    reusable pool. glibc only; elsewhere a no-op."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _pos_table(config):
    """The fixed sine-cosine table a ViT with this config uses (None for other position embeddings)."""
    if config.pos_embed != "sincos2d":
        return None
    return modules.get_ops().sincos_2d_pos_embed(config.dim, config.grid_size)


def memory_worker(framework: str, config: dict, batch_size: int, threads: int, ops: str, kind: str = "vit") -> dict:
    """Runs in a fresh process: build one framework's model, then measure a training step's memory."""
    config = config_from_dict(config, kind)
    modules.set_ops(ops)
    images, labels = make_batch(config, batch_size)
    if framework == "minivit":
        set_threads(threads)
        model, opt = make_minivit(config)
        step = lambda: minivit_train_step(model, opt, images, labels)   # noqa: E731
    else:
        import torch

        set_threads(threads, torch)
        # PyTorch's own initialisation (the values do not change the memory), no minivit model
        tmodel = build_torch(config)
        topt = torch.optim.AdamW(tmodel.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        timages, tlabels = torch.from_numpy(images), torch.from_numpy(labels)
        step = lambda: torch_train_step(tmodel, topt, timages, tlabels)   # noqa: E731
    _release_free_memory()
    before = _rss_kib("VmRSS")
    step()                                    # warm-up: allocates the gradients and optimizer state
    step()
    rss_growth = (_rss_kib("VmHWM") - before) * 1024
    # then, separately (the tracers use memory of their own), the traced peak of one more step
    if framework == "minivit":
        import tracemalloc

        tracemalloc.start()
        step()
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    else:
        traced = _torch_traced_peak(step)
    return {"rss_growth": rss_growth, "traced_peak": traced}


def measure_memory(framework, config, batch_size, threads, ops) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    code = ("import json, sys; from minivit.bench import memory_worker; "
            "print('MEMORY ' + json.dumps(memory_worker(*json.loads(sys.argv[1]))))")
    arg = json.dumps([framework, config.to_dict(), batch_size, threads, ops, model_kind(config)])
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEMORY ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement of {framework} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("MEMORY "):])


# ----------------------------------------------------------------------------- --profile: where minivit's time goes

class _Timers:
    """Exclusive wall time per call path (module -> op -> helper), for the profile table.

    A path is a tuple of names with call counts inside the parent, e.g.
    ("Attention.forward#0", "attention_forward#0", "linear_forward#1") for attn.proj.
    """

    def __init__(self, sync=None):
        self.sync = sync or _no_wait          # waits for the device before each clock read (GPU)
        self.thread = threading.get_ident()   # calls from fastops' worker threads run untimed
        self.stack = [["step", 0.0, {}]]      # [name, child seconds, calls of each child name]
        self.path = ["step"]
        self.seconds = {}

    def wrap(self, name, fn):
        timers = self

        def timed(*args, **kwargs):
            if threading.get_ident() != timers.thread:
                return fn(*args, **kwargs)
            parent = timers.stack[-1]
            k = parent[2].get(name, 0)
            parent[2][name] = k + 1
            timers.stack.append([name, 0.0, {}])
            timers.path.append(f"{name}#{k}")
            timers.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.sync()
                total = time.perf_counter() - t0
                frame = timers.stack.pop()
                key = tuple(timers.path[1:])
                timers.path.pop()
                timers.seconds[key] = timers.seconds.get(key, 0.0) + total - frame[1]
                timers.stack[-1][1] += total

        timed.__wrapped__ = fn
        return timed


# Which linear layer a linear_* call is, by its parent op and call number.
_LINEARS = {
    "attention_forward": ("attn.qkv", "attn.proj"), "attention_backward": ("attn.proj", "attn.qkv"),
    "mlp_forward": ("mlp.fc1", "mlp.fc2"), "mlp_backward": ("mlp.fc2", "mlp.fc1"),
}
_ATTENTION_CORE = "attention core: q k^T, softmax, att v"
_LABELS = {
    "layernorm_forward": "layernorm", "layernorm_backward": "layernorm",
    "gelu_forward": "gelu", "gelu_backward": "gelu", "_gelu": "gelu",
    "softmax_forward": "softmax", "softmax_backward": "softmax",
    "dropout_forward": "dropout / drop-path", "dropout_backward": "dropout / drop-path",
    "cls_pos_forward": "cls + pos_embed", "cls_pos_backward": "cls + pos_embed",
    "pool_forward": "pool", "pool_backward": "pool",
    # the attention op's own lines: in ops.py the q k^T and att v matmuls and the head
    # split/merge transposes; in fastops buffers and the qkv bias gradient (the rest is
    # in the fused core, _blockwise below)
    "attention_forward": "attention: op body (ops.py: matmuls, head split/merge)",
    "attention_backward": "attention: op body (ops.py: matmuls, head split/merge)",
    "mlp_forward": "mlp: dropout, glue", "mlp_backward": "mlp: dropout, glue",
    # cnn_ops (ResNet, the hybrid's backbone)
    "conv2d_forward": "conv2d: matmuls, reshapes", "conv2d_backward": "conv2d: matmuls, reshapes",
    "batchnorm2d_forward": "batchnorm", "batchnorm2d_backward": "batchnorm",
    "relu_forward": "relu", "relu_backward": "relu",
    "maxpool2d_forward": "maxpool", "maxpool2d_backward": "maxpool",
    "global_avg_pool_forward": "global average pool", "global_avg_pool_backward": "global average pool",
    "subsample_pad_forward": "shortcut A: subsample + pad", "subsample_pad_backward": "shortcut A: subsample + pad",
}
# the window copies: a convolution's im2col / col2im (cnn_ops'; cnn_fastops' _im2col_t / _col2im_t);
# max-pooling uses cnn_ops' too, and keeps its own row
_WINDOWS = ("im2col", "col2im", "extract_windows", "scatter_windows", "_im2col_t", "_col2im_t")


def _label(path):
    """The profile row a call path belongs to (innermost rule wins)."""
    names = [p.rsplit("#", 1)[0] for p in path]
    calls = [int(p.rsplit("#", 1)[1]) for p in path]
    if any(n.startswith("PatchEmbed.") for n in names):
        return "patch embed"
    label = "modules: residual adds, grad accumulation"
    for i, name in enumerate(names):
        parent = names[i - 1] if i else ""
        if name.startswith(("ViT.", "ResNet.")) and i == len(names) - 1:
            label = "model glue"
        elif name in _WINDOWS and any(n.startswith("conv2d_") for n in names[:i]):
            label = "conv2d: im2col / col2im"
        elif name in _LABELS:
            label = _LABELS[name]
        elif name.startswith("linear_") and parent in _LINEARS:
            label = _LINEARS[parent][min(calls[i], 1)]
        elif name.startswith("linear_") and parent.startswith("Linear."):
            label = "head"                      # the only Linear module outside the patch embedding
        elif name == "_blockwise" and parent.startswith("attention_"):
            label = _ATTENTION_CORE             # fastops: scores, softmax and att v fused per block of images
    return label


@contextlib.contextmanager
def _timed_everything(timers):
    """Wrap every function of the active ops module, cnn_ops' and cnn_fastops' ops and window
    copies, and the modules' forward/backward."""
    from . import model as model_mod
    from . import resnet

    ops_mod = modules.OPS
    patched = []
    for name, fn in list(vars(ops_mod).items()):
        # the public ops, and fastops' GELU and block runner (the kernels run on worker threads)
        if (callable(fn) and not isinstance(fn, type) and getattr(fn, "__module__", "").startswith("minivit")
                and (not name.startswith("_") or name in ("_gelu", "_blockwise"))):
            patched.append((ops_mod, name, fn))
            setattr(ops_mod, name, timers.wrap(name, fn))
    for cnn_mod in (cnn_ops, cnn_fastops):   # the ResNet's convolution and BatchNorm follow modules.OPS
        for name, fn in list(vars(cnn_mod).items()):
            if (callable(fn) and getattr(fn, "__module__", None) == cnn_mod.__name__
                    and (name.endswith(("_forward", "_backward")) or name in _WINDOWS)):
                patched.append((cnn_mod, name, fn))
                setattr(cnn_mod, name, timers.wrap(name, fn))
    classes = [modules.Linear, modules.LayerNorm, modules.PatchEmbed, modules.Attention, modules.Mlp,
               modules.Block, model_mod.ViT, resnet.Conv2d, resnet.BatchNorm2d, resnet.BasicBlock,
               resnet.Bottleneck, resnet.ResNet]
    for cls in classes:
        for meth in ("forward", "backward", "forward_features"):
            if meth not in cls.__dict__:      # forward_features: only the models have one
                continue
            fn = cls.__dict__[meth]
            patched.append((cls, meth, fn))
            setattr(cls, meth, timers.wrap(f"{cls.__name__}.{meth}", fn))
    try:
        yield
    finally:
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)


def profile_step(model, opt, images, labels, steps: int, sync=_no_wait) -> list[tuple[str, float, float]]:
    """(label, forward ms, backward ms) per step, for minivit's training step, largest first.
    sync waits for the device before every clock read (on a GPU each op's time is then its
    kernels' time, though the waits themselves slow the step down)."""
    timers = _Timers(sync)

    def now():
        sync()
        return time.perf_counter()

    loss_t = opt_t = zero_t = 0.0
    with _timed_everything(timers):
        for _ in range(steps):
            t0 = now()
            model.zero_grad()
            t1 = now()
            logits = timers.wrap("forward", model)(images)
            t2 = now()
            loss, cache = cross_entropy_forward(logits, labels)
            dlogits = cross_entropy_backward(cache)
            t3 = now()
            timers.wrap("backward", model.backward)(dlogits)
            t4 = now()
            opt.step()
            t5 = now()
            zero_t += t1 - t0
            loss_t += t3 - t2
            opt_t += t5 - t4
    rows = {}
    for path, sec in timers.seconds.items():
        label = _label(path)
        fwd = path[0].startswith("forward")
        f, b = rows.get(label, (0.0, 0.0))
        rows[label] = (f + sec, b) if fwd else (f, b + sec)
    rows["loss (cross-entropy)"] = (loss_t, 0.0)
    rows["optimizer (AdamW)"] = (0.0, opt_t)
    rows["zero_grad"] = (0.0, zero_t)
    out = [(k, 1e3 * f / steps, 1e3 * b / steps) for k, (f, b) in rows.items()]
    return sorted(out, key=lambda r: -(r[1] + r[2]))


def format_profile(rows) -> str:
    total = sum(f + b for _, f, b in rows)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'minivit training step':<{width}}  {'fwd ms':>8}  {'bwd ms':>8}  {'total':>8}  {'share':>6}"]
    for label, f, b in rows:
        lines.append(f"{label:<{width}}  {f:8.2f}  {b:8.2f}  {f + b:8.2f}  {100 * (f + b) / total:5.1f}%")
    lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows):8.2f}  {sum(r[2] for r in rows):8.2f}  {total:8.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def run(preset="cifar-lesson", batch_size=128, threads=None, steps=10, warmup=3, profile=False,
        overrides=None, ops="fast", memory=True, infer=True, out=print, device="cpu") -> dict:
    import torch

    check_device(device)                 # a GPU that cannot be used: gpu_status() says why
    tdevice = torch_device(torch, device)
    wait_minivit, wait_torch = device_waits(torch, device)
    threads = threads or os.cpu_count() or 1
    config = get_model_preset(preset, **(overrides or {}))     # any kind: ViT, hybrid, ResNet
    kind = model_kind(config)
    if config.num_classes < 1:
        raise ValueError("minivit bench trains with a cross-entropy loss: num_classes must be at least 1")
    previous = modules.set_ops(ops)
    try:
        how = set_threads(threads, torch)
        images, labels = make_batch(config, batch_size)
        model, opt = make_minivit(config, device=device)
        tmodel, topt = make_torch(model, tdevice)
        diff = check_same_function(model, tmodel, images)
        timages, tlabels = torch.from_numpy(images).to(tdevice), torch.from_numpy(labels).to(tdevice)
        images, labels = to_device(images, device), to_device(labels, device)
        batchnorm = any(isinstance(m, BatchNorm2d) for m in model.modules())

        cnn = "cnn_fastops" if ops == "fast" else "cnn_ops"
        ops_note = {"vit": "", "hybrid": f" for the transformer, {cnn} for the backbone",
                    "resnet": f" ({cnn} for the convolutions and BatchNorm)"}[kind]
        where = (f"{threads} threads" if device == "cpu" else
                 f"on the GPU (CuPy; PyTorch on CUDA, TF32 off in both; {threads} host threads)")
        out(f"minivit bench: preset {preset} ({kind}), batch {batch_size}, float32, {where}, "
            f"ops={ops}{ops_note}, {steps} alternating steps after {warmup} warm-up")
        out(f"  {config}")
        out(f"  {model.num_parameters():,} parameters; numpy {np.__version__}, torch {torch.__version__}; {how}; "
            f"torch threads {torch.get_num_threads()}")
        out(f"  optimizer: {OPTIMIZER}")
        if batchnorm:
            out("  BatchNorm: training mode (batch statistics, running averages updated) in the train step, "
                "eval mode (running averages) for inference, in both")
            out(f"  same function as the PyTorch twin (logits in eval mode and with batch statistics, running "
                f"averages): max relative difference {diff:.2e}")
        else:
            out(f"  same logits as the PyTorch twin: max |difference| {diff:.2e}")
        result = {"preset": preset, "model": kind, "device": device, "batch_size": batch_size, "threads": threads,
                  "ops": ops,
                  "steps": steps, "warmup": warmup, "optimizer": OPTIMIZER, "logits_max_diff": diff}

        model.train()
        tmodel.train()
        ta, tb = alternate(lambda: minivit_train_step(model, opt, images, labels),
                           lambda: torch_train_step(tmodel, topt, timages, tlabels), steps, warmup,
                           wait_minivit, wait_torch)
        result["train"] = summarize(ta, tb, batch_size)
        if infer:
            model.eval()
            tmodel.eval()
            ta, tb = alternate(lambda: minivit_infer(model, images), lambda: torch_infer(tmodel, timages),
                               steps, warmup, wait_minivit, wait_torch)
            result["infer"] = summarize(ta, tb, batch_size)
            model.train()

        out("")
        out(f"{'':12}{'minivit img/s':>14}{'torch img/s':>13}{'ratio':>8}  (per-pair min..max)"
            f"{'minivit ms':>12}{'torch ms':>10}")
        for name in ("train", "infer"):
            if name in result:
                r = result[name]
                out(f"{name + ' step' if name == 'train' else 'inference':12}{r['minivit_img_s']:14.1f}"
                    f"{r['torch_img_s']:13.1f}{r['ratio']:8.2f}  ({r['ratio_min']:.2f}..{r['ratio_max']:.2f})"
                    f"{' ' * 9}{r['minivit_ms']:12.1f}{r['torch_ms']:10.1f}")

        if memory and device != "cpu":
            out("")
            out("peak memory: not measured with --device gpu (RSS and tracemalloc see host memory only)")
        elif memory:
            mem = {fw: measure_memory(fw, config, batch_size, threads, ops) for fw in ("minivit", "torch")}
            result["memory"] = mem
            out("")
            out("peak memory of a training step (fresh process each; see `minivit bench --help`):")
            for key, what in (("rss_growth", "RSS growth (VmHWM - RSS before step 1)"),
                              ("traced_peak", "traced peak (tracemalloc / torch profiler)")):
                a, b = mem["minivit"][key], mem["torch"][key]
                if a is None or b is None:
                    out(f"  {what:44} not available")
                    continue
                out(f"  {what:44} minivit {a / MIB:8.1f} MiB   torch {b / MIB:8.1f} MiB   "
                    f"ratio {a / b if b else float('nan'):.2f}")

        if profile:
            model.train()
            rows = profile_step(model, opt, images, labels, max(1, steps), wait_minivit)
            result["profile"] = rows
            out("")
            out(format_profile(rows))
        return result
    finally:
        modules.set_ops(previous)


def register(subparsers):
    p = subparsers.add_parser(
        "bench", help="time a training step and inference of minivit beside PyTorch eager",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="cifar-lesson",
                   help=f"model preset, as for minivit train (default cifar-lesson); by kind: {list_presets()}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a field of the preset's config, e.g. --set depth=2, --set layers=1,1,1 "
                        "(repeatable)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="threads for both frameworks (default: all cores)")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each framework (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each first (default 3)")
    p.add_argument("--profile", action="store_true", help="also show where minivit's training step spends its time")
    p.add_argument("--ops", choices=modules.OPS_KINDS, default="fast",
                   help="minivit's ops: fast (fastops.py, default) or reference (ops.py)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurement")
    p.add_argument("--no-infer", dest="infer", action="store_false", help="skip the inference timing")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (NumPy beside PyTorch on the CPU, default) or gpu (CuPy beside PyTorch on CUDA)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=_run)


def _run(args):
    from .shapes import parse_overrides

    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise ValueError("--warmup must be >= 0 and --threads >= 1")
    check_device(args.device)            # before anything is built: gpu_status() says why not
    # the preset's kind says how to read --set (an unknown name is an error listing every preset)
    config_class = type(get_model_preset(args.preset))
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RuntimeError("minivit bench compares with PyTorch: pip install -e '.[reference]'") from None
    result = run(args.preset, args.batch_size, args.threads, args.steps, args.warmup, args.profile,
                 parse_overrides(args.overrides, config_class), args.ops, args.memory, args.infer,
                 device=args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
