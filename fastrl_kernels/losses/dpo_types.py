"""The DPO loss types: one registry entry per name a ``DPOConfig.loss_type`` may hold (docs/design.md, "Recipes").

Each entry maps the pair's terms to its per-pair loss ``[B]``; the terms are the policy and reference
sequence log-probs pc, pr, rc, rr, the log-ratios u_c = pc - rc, u_r = pr - rr, their f-divergence
scores s_c, s_r and h = beta (s_c - s_r). ``config.DPO_LOSS_TYPES`` is this registry's keys, and
``reference/dpo.PAIR_LOSSES`` has an entry of its own for every key (a test checks both). This module
imports no other part of the package: ``config.py`` reads its keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# EXO's eps when label_smoothing is 0 (as the reference).
EXO_DEFAULT_EPS = 1e-3
# The alpha divergence's exponent is capped there: e^80 is finite in float32, and the scores only enter
# through differences s_c - s_r scaled by beta.
ALPHA_EXP_CAP = 80.0


def _alpha_scores(u: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 1.0:  # the reverse-KL limit
        return u
    return torch.exp(torch.clamp((alpha - 1.0) * u, max=ALPHA_EXP_CAP)) / (alpha - 1.0)


# f-DPO: each DPOConfig.f_divergence name -> (u, f_alpha) -> the scores s = f'(e^u) of the log-ratios u,
# constants dropped (they cancel in s_c - s_r). ``config.F_DIVERGENCES`` is this table's keys;
# ``reference/dpo.F_DIVERGENCE_SCORES`` has its own float64 entry for each.
F_DIVERGENCE_SCORES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reverse_kl": lambda u, alpha: u,
    "forward_kl": lambda u, alpha: -torch.exp(-u),
    "js_divergence": lambda u, alpha: F.logsigmoid(u),
    "alpha_divergence": _alpha_scores,
}

# loss(t, cfg) -> per-pair loss; t the dict of terms above, cfg a DPOConfig.
PairLoss = Callable[[dict, Any], torch.Tensor]


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x) as exp(log sigmoid(x)): autograd then gives sigmoid(x) sigmoid(-x), exact to float32 where
    sigmoid(x) rounds to 1; torch.sigmoid's backward forms y (1 - y), which loses 1 - y there (about
    1e-3 of the gradient at x = 10, all of it past x = 17)."""
    return torch.exp(F.logsigmoid(x))


def _smoothed_sigmoid(h: torch.Tensor, ls: float) -> torch.Tensor:
    loss = -(1.0 - ls) * F.logsigmoid(h)
    return loss - ls * F.logsigmoid(-h) if ls else loss


def _robust(t: dict, cfg: Any) -> torch.Tensor:
    ls, h = cfg.label_smoothing, t["h"]
    return (-(1.0 - ls) * F.logsigmoid(h) + ls * F.logsigmoid(-h)) / (1.0 - 2.0 * ls)


def _exo_pair(t: dict, cfg: Any) -> torch.Tensor:
    h = t["h"]
    eps = cfg.label_smoothing if cfg.label_smoothing > 0 else EXO_DEFAULT_EPS
    return _sigmoid(h) * (F.logsigmoid(h) - math.log1p(-eps)) + _sigmoid(-h) * (F.logsigmoid(-h) - math.log(eps))


def _nca_pair(t: dict, cfg: Any) -> torch.Tensor:
    c, r = cfg.beta * t["s_c"], cfg.beta * t["s_r"]
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def _aot(t: dict, cfg: Any) -> torch.Tensor:
    d = torch.sort(t["pc"] - t["pr"]).values - torch.sort(t["rc"] - t["rr"]).values
    return _smoothed_sigmoid(cfg.beta * d, cfg.label_smoothing)


def _aot_unpaired(t: dict, cfg: Any) -> torch.Tensor:
    d = torch.sort(t["u_c"]).values - torch.sort(t["u_r"]).values
    return _smoothed_sigmoid(cfg.beta * d, cfg.label_smoothing)


def _discopop(t: dict, cfg: Any) -> torch.Tensor:
    h, tau = t["h"], cfg.discopop_tau
    # m e^{-h} as exp(log sigmoid(h/tau) - h): the product form is 0 * inf = NaN once e^{-h} overflows.
    return -_sigmoid(-h / tau) * F.logsigmoid(h) + torch.exp(F.logsigmoid(h / tau) - h)


DPO_LOSSES: dict[str, PairLoss] = {
    "sigmoid": lambda t, cfg: _smoothed_sigmoid(t["h"], cfg.label_smoothing),
    "hinge": lambda t, cfg: torch.relu(1.0 - t["h"]),
    "ipo": lambda t, cfg: (t["s_c"] - t["s_r"] - 1.0 / (2.0 * cfg.beta)) ** 2,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": lambda t, cfg: -F.logsigmoid(cfg.beta * t["s_c"]) - F.logsigmoid(-cfg.beta * t["s_r"]),
    "sppo_hard": lambda t, cfg: (t["s_c"] - 0.5 / cfg.beta) ** 2 + (t["s_r"] + 0.5 / cfg.beta) ** 2,
    "apo_zero": lambda t, cfg: 1.0 - _sigmoid(cfg.beta * t["u_c"]) + _sigmoid(cfg.beta * t["u_r"]),
    "apo_down": lambda t, cfg: _sigmoid(cfg.beta * t["u_c"]) + 1.0 - _sigmoid(t["h"]),
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "discopop": _discopop,
}


def pair_loss(name: str, t: dict, cfg: Any) -> torch.Tensor:
    """The per-pair loss of type ``name``; a config that skipped validation cannot pick a missing one."""
    if name not in DPO_LOSSES:
        raise ValueError(f"loss_type: unknown DPO loss {name!r}")
    return DPO_LOSSES[name](t, cfg)
