"""Freeze (and thaw) the learned activation ranges of a QAT model.

Late in a QAT stage the activation ranges have settled while the weights still move.
Freezing them (as torch.ao's ``disable_observer`` does for its fake-quantizers) fixes
every activation scale ``s_a = t / N`` at its current value: the forward computes the
same function as before the freeze, the thresholds ``t`` get no gradient and no update,
and each quantizer's backward skips the scale gradient (two reductions over the whole
activation tensor per quantizer on the fused path of :mod:`.fast`), so a QAT step gets
cheaper. Weights and their (statistics-based) scales keep training.

What counts as an activation range:

* Brevitas: every parameter of an activation quantizer proxy
  (``ActQuantProxyFromInjector`` and subclasses: ``QuantReLU``, ``QuantIdentity``, the
  ``input_quant`` of a layer, the shared quantizer of a residual add), i.e. the learned
  threshold of ``ParameterFromRuntimeStatsScaling`` (and any learned zero point).
  Frozen = ``requires_grad=False``.
* torch.ao: every activation ``FakeQuantizeBase`` (not a ``weight_fake_quant``): its
  observer is disabled (the scale stops following the running min/max) and, for a
  learnable fake-quantize, its scale and zero point stop learning.

Optimizers keep their parameter lists: a frozen threshold simply has no gradient
(``grad is None``), which SGD and AdamW skip. A data-parallel wrapper must be rebuilt
after a freeze (DDP expects a gradient for every parameter that required one when it
was built); :meth:`qtemperate.training.loop.Distiller.train_epoch` does that.
"""

from __future__ import annotations

from brevitas.proxy.runtime_quant import ActQuantProxyFromInjector
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

__all__ = ["activation_ranges_frozen", "freeze_activation_ranges"]


def _brevitas_params(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, ActQuantProxyFromInjector):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def _ao_act_fake_quants(model: nn.Module) -> list[FakeQuantizeBase]:
    return [m for name, m in model.named_modules()
            if isinstance(m, FakeQuantizeBase) and not name.endswith("weight_fake_quant")]


def freeze_activation_ranges(model: nn.Module, frozen: bool = True) -> int:
    """Freeze (``frozen=True``) or thaw the learned activation ranges of ``model`` in place.

    Args:
        model: A Brevitas QAT model (from :func:`~qtemperate.quantization.quantize` or
            built from ``brevitas.nn`` layers) or a torch.ao QAT model (``prepare_qat_fx``).
        frozen: Freeze (True) or let the ranges learn again (False).

    Returns:
        How many ranges changed state (0 when they already were as asked).

    Raises:
        ValueError: ``model`` has no learned activation range to freeze (a float model,
            or one whose activation scales are not learned), named in the message.
    """
    params = _brevitas_params(model)
    fqs = _ao_act_fake_quants(model)
    if not params and not fqs:
        raise ValueError(
            f"{type(model).__name__} has no learned activation ranges to freeze "
            "(no Brevitas activation quantizer with a parameter, no torch.ao activation fake-quantize)"
        )
    changed = 0
    for p in params:
        if p.requires_grad == frozen:
            p.requires_grad_(not frozen)
            changed += 1
    for fq in fqs:
        before = (bool(fq.observer_enabled[0]), _learning(fq))
        if frozen:
            fq.disable_observer()
        else:
            fq.enable_observer()
        if hasattr(fq, "toggle_qparam_learning"):  # _LearnableFakeQuantize
            fq.toggle_qparam_learning(enabled=not frozen)
        changed += int((bool(fq.observer_enabled[0]), _learning(fq)) != before)
    return changed


def _learning(fq: nn.Module) -> bool | None:
    flag = getattr(fq, "learning_enabled", None)
    return None if flag is None else bool(flag[0])


def activation_ranges_frozen(model: nn.Module) -> bool | None:
    """Whether every learned activation range of ``model`` is frozen (None: it has none)."""
    params = _brevitas_params(model)
    fqs = _ao_act_fake_quants(model)
    if not params and not fqs:
        return None
    return all(not p.requires_grad for p in params) and all(
        not bool(fq.observer_enabled[0]) and not _learning(fq) for fq in fqs
    )
