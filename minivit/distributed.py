"""Data-parallel training: K processes (ranks) train one model as if they were one, over MPI.

    mpiexec -n 2 minivit train ...                       # 2 ranks on this machine (MPICH's mpiexec)
    mpiexec -n 2 python -m minivit.cli train ...         # the same
    mpiexec -n 8 -hosts a,b minivit train ...            # 8 ranks on two machines (a shared --out)

This is the one place minivit imports mpi4py (and CuPy's NCCL bindings for GPU ranks), as
backend.py is for CuPy. `init()` returns the communicator the training loop talks to. A run
that no MPI launcher started gets `Single`, which has the same methods and does nothing in
them: `minivit train` never needs mpi4py, and the loop has no branch for one process or K.

One step on K ranks, rank r, when the single-process run would take a global batch of B images:

    every rank draws the same order and augments the      the global batch and its augmentation
    whole global batch with the same Generator            are exactly the single-process run's
    rank r keeps images [r*B//K : (r+1)*B//K]             its shard, n_r images (contiguous)
    forward, backward                                     p.grad = d(mean loss over the shard)/dp
    p.grad <- sum over ranks of p.grad * n_r / B          = d(mean loss over the global batch)/dp
    clip, AdamW                                           the same numbers on every rank

So every rank holds the same weights after every step: the same initial weights (one seed),
the same summed gradient (the all-reduce hands every rank the same sum) and the same optimiser
arithmetic. The only difference from one process is the order in which the gradient's terms
are added, a float rounding (tests/test_distributed.py: K = 2 against K = 1 in float64).

BatchNorm (the ResNets, the hybrid's backbone) is the one layer whose forward pass mixes images:
it normalises with the batch's mean and variance. With K ranks every BatchNorm2d gets a
BatchGroup (sync_batchnorm, each step) and sums its statistics over the ranks, as
torch.nn.SyncBatchNorm does, so it normalises with the whole batch's as one process would, and
the running averages stay the same on every rank. Without that, each rank would normalise with
its shard's (b = B / K images) and keep running averages of its own.

Which rank does what: all of them train and each tests its shard of the test set (the sums
are all-reduced); rank 0 alone prints and writes files, the others wait for it at a barrier.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback

import numpy as np

from .backend import get_array_module
from .modules import flat_gradients

# What MPI launchers put in the environment of the processes they start: MPICH's hydra and
# Intel MPI (PMI_SIZE, MPI_LOCALNRANKS), Open MPI (OMPI_COMM_WORLD_SIZE), Slurm's srun with
# PMIx (PMIX_RANK). Without any of them mpi4py is not imported at all.
LAUNCHER_VARIABLES = ("PMI_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
# MINIVIT_MPI=1 uses MPI even with one rank (to try the NCCL path on one GPU);
# MINIVIT_MPI=0 ignores a launcher.
FORCE_VARIABLE = "MINIVIT_MPI"
# Seconds between printing an error and MPI_Abort, so the launcher forwards the message (see abort).
ABORT_GRACE_S = 1.0
# The errors `minivit` reports as one line with exit code 2 (as minivit.cli does).
INPUT_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, OSError, OverflowError, MemoryError)

_COMM = None


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (or MINIVIT_MPI=1 says to act as if)."""
    forced = os.environ.get(FORCE_VARIABLE)
    if forced in ("0", "1"):
        return forced == "1"
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def init():
    """The communicator of this process: `MPIComm` under an MPI launcher with more than one
    rank, else `Single`. Made once per process; later calls return the same one."""
    global _COMM
    if _COMM is None:
        _COMM = Single()
        if launched_by_mpi():
            try:
                from mpi4py import MPI
            except ImportError as exc:
                raise RuntimeError(f"an MPI launcher started minivit, but mpi4py does not import ({exc}); install "
                                   f'it with `pip install -e ".[mpi]"`') from None
            if MPI.COMM_WORLD.size > 1 or os.environ.get(FORCE_VARIABLE) == "1":
                _COMM = MPIComm(MPI.COMM_WORLD)
    return _COMM


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """(lo, hi): rank's contiguous part of n items; sizes differ by at most one, in rank order."""
    return rank * n // size, (rank + 1) * n // size


class Single:
    """One process: every collective operation is the identity, nothing is sent anywhere."""

    rank, size = 0, 1

    def shard(self, n):
        return 0, n

    def sum_gradients(self, params, weight):
        pass                                      # weight is 1: the gradient is already the batch's

    def sum(self, values):
        return list(values)

    def max(self, value):
        return value

    def barrier(self):
        pass

    def sync_batchnorm(self, model, share):
        pass                                      # one process has the whole batch

    def seed_dropout(self, model, seed, step):
        pass                                      # one process keeps the model's own Generator

    def abort(self, code):
        pass                                      # nobody else to stop: the caller returns its code

    def use_device(self, device):
        pass                                      # one process: backend.py uses the current GPU

    @contextlib.contextmanager
    def only_rank0_prints(self):
        yield

    @contextlib.contextmanager
    def abort_on_error(self, command):
        yield                                     # errors reach the caller (minivit.cli prints them)


class MPIComm(Single):
    """K ranks over MPI (CPU arrays) or NCCL (GPU arrays, one GPU per rank)."""

    def __init__(self, comm):
        from mpi4py import MPI
        self._MPI, self.comm = MPI, comm
        self.rank, self.size = comm.rank, comm.size
        self._flat = None                         # the gradient buffer, made on the first step
        self._nccl = None
        self._group = None                        # BatchNorm's BatchGroup, made on the first step

    def shard(self, n):
        return shard(n, self.rank, self.size)

    def sum_gradients(self, params, weight):
        """Every p.grad becomes the sum over ranks of weight * p.grad (weight = n_r / B), in
        place, with ONE all-reduce over one flat buffer: one message per step instead of one
        per parameter (~100 for the recipe), each of which would pay the network's latency.
        When the optimiser has packed the parameters (modules.FlatBuffer) and the backward pass
        wrote every gradient in place, that buffer is the optimiser's own flat gradient: scaled
        and all-reduced where it is, nothing copied. Otherwise the gradients are copied into a
        buffer of this communicator's, and afterwards each p.grad is a view into it."""
        flat, rest = flat_gradients(params)
        if flat and not rest and all(p.grad is not None for p in params):
            for grad in flat:                     # one per dtype and device: normally one
                grad *= weight
                self._allreduce_(grad)
            return
        if self._flat is None:
            xp = get_array_module(params[0].data)
            self._flat = xp.empty(sum(p.data.size for p in params), params[0].data.dtype)
        flat, offset = self._flat, 0
        for p in params:                          # pack: flat[offset:offset + size] = weight * p.grad
            part = flat[offset:offset + p.data.size]
            if p.grad is None:                    # unused by this model: same on every rank
                part[...] = 0
            else:
                get_array_module(part).multiply(p.grad.ravel(), weight, out=part)
            offset += p.data.size
        self._allreduce_(flat)
        offset = 0
        for p in params:                          # unpack: views, no copy
            if p.grad is not None:
                p.grad = flat[offset:offset + p.data.size].reshape(p.data.shape)
            offset += p.data.size

    def _allreduce_(self, flat):
        if self._nccl is None:
            self.comm.Allreduce(self._MPI.IN_PLACE, flat, op=self._MPI.SUM)
            return
        import cupy
        from cupy.cuda import nccl
        kind = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[flat.dtype]
        # On the current stream, so it runs after backward and before clipping reads the sum.
        self._nccl.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kind, nccl.NCCL_SUM,
                             cupy.cuda.get_current_stream().ptr)

    def sync_batchnorm(self, model, share):
        """Every BatchNorm2d of the model takes its training statistics over the whole batch:
        its group sums them over the ranks (cnn_ops.sync_batchnorm2d_forward). share = n_r / B,
        this rank's share of this step's batch, weighs its backward's sums as sum_gradients
        weighs its gradients. A model without BatchNorm is left as it is."""
        from .resnet import BatchNorm2d
        if self._group is None:
            self._group = BatchGroup(self)
        self._group.weight = float(share)
        for m in model.modules():
            if isinstance(m, BatchNorm2d):
                m.group = self._group

    def sum(self, values):
        """A few float64 numbers summed over ranks (a loss sum, a count): a tiny all-reduce."""
        buffer = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM)
        return buffer.tolist()

    def max(self, value):
        """The largest int over ranks: each rank's signal number (0 if none) agrees on a stop."""
        return int(self.comm.allreduce(int(value), op=self._MPI.MAX))

    def barrier(self):
        self.comm.Barrier()

    def seed_dropout(self, model, seed, step):
        """Dropout and drop-path masks from a Generator of (seed, step, rank): each rank draws
        its own, independent of the others, and the same again when a run resumes with the same
        K. (Copies of one Generator would give rank r's i-th image the mask of rank 0's i-th.)
        So with dropout a K-rank run is another, equally valid random draw than the 1-rank run;
        without it (the recipe) nothing is drawn here."""
        model.seed(np.random.default_rng([seed, 2, step, self.rank]))

    def abort(self, code):
        """End every rank now with this exit code (MPI_Abort): the others may be waiting inside
        an all-reduce that will never complete."""
        sys.stdout.flush()
        sys.stderr.flush()
        # The message just printed is still in the pipe to MPICH's launcher, which reads it in
        # the same loop that handles the abort: abort at once and, on a busy machine, the
        # launcher may kill everything before it has forwarded the one line that says why
        # (seen once in CI). A second's pause lets it drain the pipe first.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)
        os._exit(code)            # MPICH's MPI_Abort may return before the launcher has ended this process

    def use_device(self, device):
        """For --device gpu: one GPU per rank (rank r takes GPU r % count) and an NCCL
        communicator for the gradient all-reduce, its unique id sent from rank 0 over MPI.
        Unverified: written without a GPU to run it on."""
        if device != "gpu" or self._nccl is not None:
            return
        try:
            import cupy
            from cupy.cuda import nccl
        except Exception as exc:
            raise RuntimeError(f"--device gpu on {self.size} ranks needs CuPy with NCCL, which does not import "
                               f'({exc}); install `pip install -e ".[gpu]"` and NCCL (`pip install '
                               f'nvidia-nccl-cu12`)') from None
        if not getattr(nccl, "available", True):
            raise RuntimeError("--device gpu on several ranks needs NCCL, which CuPy cannot find; install it "
                               "with `pip install nvidia-nccl-cu12` (or `python -m cupyx.tools.install_library "
                               "--library nccl --cuda 12.x`)")
        count = cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.rank % count).use()
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self.comm.bcast(unique_id, root=0)
        self._nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)

    @contextlib.contextmanager
    def only_rank0_prints(self):
        """Ranks other than 0 send their stdout and stderr (prints, progress bars) to /dev/null."""
        if self.rank == 0:
            yield
            return
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield

    @contextlib.contextmanager
    def abort_on_error(self, command):
        """An error on one rank stops all of them: print it, naming the rank, then MPI_Abort.
        Returning normally would leave the other ranks waiting in the next all-reduce forever."""
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, SystemExit) and not exc.code:
                raise
            if isinstance(exc, KeyboardInterrupt):   # a Ctrl-C outside the training loop's handler
                message, code = "interrupted", 130
            elif isinstance(exc, INPUT_ERRORS):
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                code = 2
            else:                                 # a bug: the traceback helps, too
                traceback.print_exc(file=sys.__stderr__)
                message, code = f"{type(exc).__name__}: {exc}", 1
            print(f"{command}: error: rank {self.rank}: {message}", file=sys.__stderr__, flush=True)
            self.abort(code)


class BatchGroup:
    """The ranks that share each batch, as a synchronised BatchNorm sees them (the `group` of
    cnn_ops.sync_batchnorm2d_forward): sums over the ranks, and this rank's share of the batch."""

    def __init__(self, comm):
        self._comm = comm                         # the MPIComm whose ranks these are
        self.weight = 1.0                         # n_r / B: set by MPIComm.sync_batchnorm each step

    def sum(self, a):
        """A per-channel array (C,) summed over the ranks (MPI, or NCCL on GPU ranks)."""
        total = a.copy()                          # contiguous, and the caller's array unchanged
        self._comm._allreduce_(total)
        return total

    def count(self, n):
        """An integer summed over the ranks."""
        total = np.array([n], dtype=np.int64)
        self._comm.comm.Allreduce(self._comm._MPI.IN_PLACE, total, op=self._comm._MPI.SUM)
        return int(total[0])

    def __deepcopy__(self, memo):
        return self                               # a copied model still belongs to these ranks

    def __repr__(self):
        return f"BatchGroup(rank {self._comm.rank} of {self._comm.size}, weight {self.weight:g})"
