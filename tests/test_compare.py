"""`minivit compare`: time to accuracy from runs' metrics.csv files (minivit/compare.py)."""
import csv

import pytest

from minivit.cli import main
from minivit.compare import load_run, summary_table, time_to_accuracy

COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second"]


def write_run(directory, test_accs, seconds):
    """A run directory as minivit train leaves it, with only what compare reads filled in."""
    directory.mkdir(parents=True)
    with open(directory / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for epoch, (acc, s) in enumerate(zip(test_accs, seconds), start=1):
            writer.writerow({"epoch": epoch, "lr": 1e-3, "train_loss": 1.0, "train_acc": 0.5, "test_loss": 1.0,
                             "test_acc": acc, "epoch_seconds": s, "images_per_second": 100.0})
    return directory


def test_time_to_accuracy_sums_the_epochs_until_the_first_that_reaches_the_target():
    history = [{"test_acc": a, "epoch_seconds": s} for a, s in ((0.5, 100), (0.74, 120), (0.76, 90), (0.73, 80))]
    assert time_to_accuracy(history, 0.5) == 100            # reached in the first epoch: its own time
    assert time_to_accuracy(history, 0.75) == 310           # 100 + 120 + 90, the end of epoch 3
    assert time_to_accuracy(history, 0.74) == 220           # >= counts
    assert time_to_accuracy(history, 0.8) is None           # never reached, even though later epochs ran


def test_the_table_gives_each_run_its_times_in_hours(tmp_path):
    fast = load_run(write_run(tmp_path / "fast", [0.6, 0.78, 0.81], [1800, 1800, 1800]))
    slow = load_run(write_run(tmp_path / "slow", [0.5, 0.7, 0.76], [3600, 3600, 3600]) / "metrics.csv")
    table = summary_table({"fast": fast, "slow": slow}, [0.75, 0.80]).splitlines()
    assert table[0] == ("| run | epochs | final test acc | best test acc | total time | time to 75% "
                        "| time to 80% |")
    assert table[2] == "| fast | 3 | 81.00% | 81.00% | 1.50 h | 1.00 h | 1.50 h |"
    assert table[3] == "| slow | 3 | 76.00% | 76.00% | 3.00 h | 3.00 h | - |"


def test_median_epoch_counts_every_epoch_at_the_runs_median(tmp_path, capsys):
    """A run whose first epoch shared the machine (3x slower): --median-epoch times each of its epochs
    at the median (100 s), and the table's head says the times are not as measured."""
    history = [{"test_acc": a, "epoch_seconds": s} for a, s in ((0.5, 300), (0.74, 100), (0.76, 90), (0.8, 110))]
    assert time_to_accuracy(history, 0.75) == 490
    assert time_to_accuracy(history, 0.75, median=True) == 3 * 105    # median of 300, 100, 90, 110
    run = write_run(tmp_path / "busy", [0.5, 0.74, 0.76, 0.8], [3600, 1200, 1080, 1320])
    assert main(["compare", str(run), "--median-epoch"]) == 0
    printed = capsys.readouterr().out
    assert "| total time (median epoch x epochs) |" in printed
    assert "| busy | 4 | 80.00% | 80.00% | 1.40 h | 1.05 h | 1.40 h |" in printed    # 4 x 1260 s, 3 x, 4 x


def test_the_command_prints_the_table_and_draws_the_figure(tmp_path, capsys):
    a = write_run(tmp_path / "runs" / "a", [0.7, 0.8], [60, 60])
    b = write_run(tmp_path / "runs" / "b", [0.75, 0.79], [30, 30])
    out = tmp_path / "figures" / "compare.png"                      # its folder does not exist yet
    assert main(["compare", str(a), str(b), "--at", "0.75", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| a | 2 | 80.00% | 80.00% | 0.03 h | 0.03 h |" in printed
    assert "| b | 2 | 79.00% | 79.00% | 0.02 h | 0.01 h |" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", str(a), str(b / "metrics.csv"), "--label", "old", "--label", "new"]) == 0
    assert "| new | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compare", "{missing}"], "no metrics at"),
    (["compare", "{bad}"], "is not a minivit metrics file"),
    (["compare", "{a}", "--label", "x", "--label", "y"], "--label was given 2 times for 1 runs"),
    (["compare", "{a}", "--at", "80"], "--at 80.0: expected a test accuracy as a fraction"),
    (["compare", "{a}", "{a}/metrics.csv"], "two runs have the same name"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    a = write_run(tmp_path / "a", [0.5], [10])
    (tmp_path / "bad.csv").write_text("epoch,loss\n1,2.0\n")
    paths = {"missing": str(tmp_path / "nowhere"), "bad": str(tmp_path / "bad.csv"), "a": str(a)}
    assert main([arg.format(**paths) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minivit compare: error: ") and message in err and "Traceback" not in err
