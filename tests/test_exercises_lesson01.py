"""Lesson 01's exercise checkers accept the worked solutions and reject plausible wrong answers."""

import numpy as np
import pytest

from minivit import ops, shapes
from minivit.exercises import load_solutions, Wrong, lesson01

solutions = load_solutions("01")


def _stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------------------- 1.1 patchify

def _patchify_order(order):
    def patchify(x, P):
        B, C, S, _ = x.shape
        G = S // P
        return x.reshape(B, C, G, P, G, P).transpose(order).reshape(B, G * G, C * P * P)
    return patchify


def test_patchify_accepts_the_solution(capsys):
    assert lesson01.check_patchify(solutions.patchify) is True
    assert "PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("order, message", [
    ((0, 2, 4, 3, 5, 1), r"\(P, P, C\) order"),        # channels last, as in the JAX release
    ((0, 4, 2, 1, 3, 5), "columns of the grid"),      # grid row and column swapped
    ((0, 2, 4, 1, 5, 3), "rows and columns are swapped"),   # pixel row and column swapped
])
def test_patchify_rejects_wrong_orders(order, message):
    with pytest.raises(Wrong, match=message):
        lesson01.check_patchify(_patchify_order(order))


def test_patchify_rejects_the_reference_and_a_forgotten_transpose():
    with pytest.raises(Wrong, match="computes the answer for you"):
        lesson01.check_patchify(lambda x, P: ops.patchify_forward(x, P)[0])
    with pytest.raises(Wrong):   # reshape only: patches are strips of rows, not squares
        lesson01.check_patchify(lambda x, P: x.reshape(x.shape[0], (x.shape[2] // P) ** 2, -1))
    assert ops.patchify_forward.__name__ == "patchify_forward"    # the guard put the real function back


def test_patchify_stub_is_not_attempted(capsys):
    assert lesson01.check_patchify(_stub) is False
    assert "NOT ATTEMPTED YET" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 1.2 parameter count

def test_parameter_count_accepts_the_solution():
    assert lesson01.check_parameter_count(solutions.parameter_count) is True


def test_parameter_count_rejects_forgetting_the_cls_position():
    def no_cls_position(cfg):
        n = solutions.parameter_count(cfg)
        return n - cfg.dim if cfg.pos_embed == "learned" else n     # pos_embed with G*G rows only
    with pytest.raises(Wrong, match=r"\[CLS\] token's own position"):
        lesson01.check_parameter_count(no_cls_position)


def test_parameter_count_rejects_forgetting_layernorm():
    with pytest.raises(Wrong, match="LayerNorms"):
        lesson01.check_parameter_count(lambda cfg: solutions.parameter_count(cfg) - 2 * cfg.dim * (2 * cfg.depth + 1))


def test_parameter_count_rejects_ignoring_the_options():
    with pytest.raises(Wrong, match="qkv_bias=False"):    # always counting the qkv biases
        lesson01.check_parameter_count(
            lambda cfg: solutions.parameter_count(cfg) + (0 if cfg.qkv_bias else 3 * cfg.dim * cfg.depth))
    with pytest.raises(Wrong, match="computes the answer for you"):
        lesson01.check_parameter_count(lambda cfg: shapes.count_parameters(cfg))
    assert shapes.count_parameters.__name__ == "count_parameters"


def test_parameter_count_stub_is_not_attempted():
    assert lesson01.check_parameter_count(_stub) is False


# ----------------------------------------------------------------------------- 1.3 block FLOPs

def test_block_flops_accepts_the_solution():
    assert lesson01.check_block_flops(solutions.block_flops) is True


def test_block_flops_rejects_forgetting_attention_and_counting_macs():
    with pytest.raises(Wrong, match="q @ k"):
        lesson01.check_block_flops(lambda N, D, F: 2 * N * D * 4 * D + 4 * N * D * F)
    with pytest.raises(Wrong, match="exactly half"):
        lesson01.check_block_flops(lambda N, D, F: solutions.block_flops(N, D, F) // 2)
    with pytest.raises(Wrong, match="F = 4 D"):
        lesson01.check_block_flops(lambda N, D, F: 24 * N * D * D + 4 * N * N * D)


def test_block_flops_stub_is_not_attempted():
    assert lesson01.check_block_flops(_stub) is False
