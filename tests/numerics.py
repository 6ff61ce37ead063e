"""Scale-aware tolerances for loss values that are small differences of large predictions.

The alignment term λ·Σ(g·x̂_0)/N has a score g = w̃·(G^α − G^β) that is a difference of CFG predictions, each
itself (1−α)·G(∅) + α·G(y): its fp32 rounding is a fraction of the magnitudes it is computed from, not of g.
Another CPU's reduction order (AMD against Intel, a batched call against separate ones) moves the term by
~1e-7 of those magnitudes, which can be 1e-5 of the term itself. `AlignScale` records, per alignment term the
trainer computes, Σ(|g|·|x̂_0|)/N with |g| written out from the |·| of every prediction and coefficient that
enters it (losses.cfg, the scores, eps_from_v): the scale its rounding is relative to. A member reading
another's α, rows or LoRA moves the term by a fraction of the term itself, orders of magnitude above it.
"""

import contextlib

import torch

from palp_trainer.objective import losses

_SCALE = "_palp_magnitude"  # the elementwise magnitude a tensor is computed from, set on the result


def magnitude(x: torch.Tensor) -> torch.Tensor:
    tagged = getattr(x, _SCALE, None)
    return tagged if tagged is not None else x.detach().float().abs()


def _abs(c) -> torch.Tensor | float:
    return c.abs() if isinstance(c, torch.Tensor) else abs(c)


def _tagged(out: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    setattr(out, _SCALE, mag.detach().float())
    return out


class AlignScale(contextlib.AbstractContextManager):
    """Inside, every losses.score_distillation call appends its scale (see the module's docstring) to `scales`;
    the trainer's functions are wrapped, not replaced, so the values it computes are unchanged."""

    NAMES = ("cfg", "palp_score", "sds_score", "nfsd_score", "eps_from_v", "score_distillation")

    def __init__(self):
        self.scales: list[float] = []
        self.originals = {n: getattr(losses, n) for n in self.NAMES}

    def __enter__(self) -> "AlignScale":
        o, per_sample = self.originals, losses._per_sample

        def cfg(u, c, s):
            return _tagged(o["cfg"](u, c, s), _abs(1 - s) * magnitude(u) + _abs(s) * magnitude(c))

        def palp_score(pre, pers, w):
            return _tagged(o["palp_score"](pre, pers, w), per_sample(w.abs()) * (magnitude(pre) + magnitude(pers)))

        def sds_score(pre, eps, w):
            return _tagged(o["sds_score"](pre, eps, w), per_sample(w.abs()) * (magnitude(pre) + magnitude(eps)))

        def nfsd_score(u, c, n, t, s, w):  # s·(c − u) + u [− n]
            mag = _abs(s) * (magnitude(c) + magnitude(u)) + magnitude(u) + magnitude(n)
            return _tagged(o["nfsd_score"](u, c, n, t, s, w), per_sample(w.abs()) * mag)

        def eps_from_v(x_t, v, a):
            mag = per_sample(1 - a).sqrt() * magnitude(x_t) + per_sample(a).sqrt() * magnitude(v)
            return _tagged(o["eps_from_v"](x_t, v, a), mag)

        def score_distillation(x0_hat, score):
            self.scales.append(float((magnitude(score) * x0_hat.detach().float().abs()).sum() / x0_hat.numel()))
            return o["score_distillation"](x0_hat, score)

        wrapped = dict(cfg=cfg, palp_score=palp_score, sds_score=sds_score, nfsd_score=nfsd_score,
                       eps_from_v=eps_from_v, score_distillation=score_distillation)
        for name, fn in wrapped.items():
            setattr(losses, name, fn)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.originals.items():
            setattr(losses, name, fn)

# the alignment term's rounding against its scale: measured up to ~1e-8 on x86 CPUs (group against solo, SDXL's
# batched calls against separate ones); a member given another's α is off by >= 1e-4 of it (hand_mutations.py)
ALIGN_TOL = 1e-6
