"""`minivit compare`: training runs side by side, by the time they took to reach an accuracy.

    minivit compare runs/old runs/new --at 0.75 0.80 --out compare.png
    minivit compare runs/a/metrics.csv runs/b --label "v10 recipe" --label "new recipe"

Each run is a directory written by `minivit train` (or its metrics.csv). The table gives, for each
run, its epochs, final and best test accuracy, total training time, and the time until the end of
the first epoch whose test accuracy reached each --at value ("-" if it never did). The figure draws
test accuracy against hours of training, a line per run, with the --at levels dotted across.

The time is the sum of the epochs' `epoch_seconds` as the run measured them: training and the test
pass of each epoch, on whatever the machine was doing then. Compare runs made under the same
conditions (cores, ranks, other jobs), or say that they were not. With --median-epoch every epoch
counts as the run's median epoch time instead: for a run some of whose epochs ran under other
conditions (a busy machine, another number of ranks) than most of them; the table then says so.
"""
from __future__ import annotations

import io
import statistics
from pathlib import Path

from .train import METRICS, _write_atomically, read_metrics_csv


def epoch_times(history: list[dict], median: bool = False) -> list[float]:
    """Each epoch's seconds: its own epoch_seconds, or (median) the run's median for every epoch."""
    seconds = [float(row["epoch_seconds"]) for row in history]
    return [statistics.median(seconds)] * len(seconds) if median else seconds


def time_to_accuracy(history: list[dict], target: float, median: bool = False) -> float | None:
    """Seconds of training until the end of the first epoch whose test accuracy is >= target
    (the epochs' seconds summed, as epoch_times gives them); None if no epoch reached it."""
    elapsed = 0.0
    for row, seconds in zip(history, epoch_times(history, median)):
        elapsed += seconds
        if float(row["test_acc"]) >= target:
            return elapsed
    return None


def load_run(path) -> list[dict]:
    """The metrics of a run: a run directory (its metrics.csv) or a metrics.csv itself."""
    path = Path(path)
    csv_path = path / METRICS if path.is_dir() else path
    if not csv_path.is_file():
        raise ValueError(f"no metrics at {str(path)!r}: expected a run directory written by minivit train "
                         f"(with {METRICS}) or a {METRICS} file")
    history = read_metrics_csv(csv_path)
    needed = {"epoch", "test_acc", "epoch_seconds"}
    if not history or not needed <= set(history[0]):
        raise ValueError(f"{str(csv_path)!r} is not a minivit metrics file: expected a header with "
                         f"{', '.join(sorted(needed))} and at least one epoch")
    return history


def summary_table(runs: dict[str, list[dict]], targets, median: bool = False) -> str:
    """A Markdown table: one row per run, the time to each target in hours (median: every epoch
    at the run's median epoch time, which the table's head says)."""
    total_head = "total time (median epoch x epochs)" if median else "total time"
    head = ["run", "epochs", "final test acc", "best test acc", total_head] + [f"time to {t:.0%}" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, history in runs.items():
        total = sum(epoch_times(history, median))
        times = [time_to_accuracy(history, t, median) for t in targets]
        cells = [label, str(len(history)), f"{float(history[-1]['test_acc']):.2%}",
                 f"{max(float(r['test_acc']) for r in history):.2%}", _hours(total)]
        cells += [_hours(s) if s is not None else "-" for s in times]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def plot_time_to_accuracy(path, runs: dict[str, list[dict]], targets=(), median: bool = False):
    """Test accuracy (%) against hours of training, a line per run, the targets dotted across."""
    from matplotlib.figure import Figure            # off-screen, no pyplot state (as train.plot_curves)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for label, history in runs.items():
        hours, elapsed = [], 0.0
        for seconds in epoch_times(history, median):
            elapsed += seconds
            hours.append(elapsed / 3600)
        ax.plot(hours, [100 * float(r["test_acc"]) for r in history], "o-", ms=3, label=label)
    for target in targets:
        ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    measured = "each epoch at its run's median epoch time" if median else "as each run measured them"
    ax.set(xlabel=f"hours of training ({measured})", ylabel="test accuracy (%)",
           title="time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    _write_atomically(path, png.getvalue())


def register(subparsers):
    p = subparsers.add_parser(
        "compare", help="runs side by side: accuracy against training time, time to reach an accuracy",
        description="Compare finished (or running) training runs by the time they took to reach a test accuracy. "
                    "Prints a Markdown table; --out also draws test accuracy against hours.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run directory of minivit train, or its metrics.csv")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="a name for each run, in order (default: the directory's name)")
    p.add_argument("--at", type=float, nargs="+", default=[0.75, 0.80], metavar="ACC",
                   help="test accuracies (fractions, 0-1) to time (default 0.75 0.80)")
    p.add_argument("--out", type=Path, default=None, metavar="PNG", help="draw the figure here")
    p.add_argument("--median-epoch", action="store_true",
                   help="count every epoch at its run's median epoch time (for runs some of whose epochs ran "
                        "under other conditions: a busy machine, another number of ranks)")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    if args.label and len(args.label) != len(args.runs):
        raise ValueError(f"--label was given {len(args.label)} times for {len(args.runs)} runs; "
                         f"give one per run, in order, or none")
    for acc in args.at:
        if not 0 < acc <= 1:
            raise ValueError(f"--at {acc}: expected a test accuracy as a fraction in (0, 1], e.g. 0.8 for 80%")
    labels = args.label or [_default_label(r) for r in args.runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two runs have the same name ({', '.join(labels)}); tell them apart with --label")
    runs = {label: load_run(path) for label, path in zip(labels, args.runs)}
    print(summary_table(runs, args.at, args.median_epoch))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot_time_to_accuracy(args.out, runs, args.at, args.median_epoch)
        print(f"figure: {args.out}")
    return 0


def _default_label(path: str) -> str:
    path = Path(path)
    return (path.parent if path.name == METRICS else path).name
