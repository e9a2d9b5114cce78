"""Optimizer families: ONE table that planner, sweep and adaptive controller all read.

A family says how the optimizer's update responds to the gradient, which decides how its
learning rate should follow the batch size:

- `sgd`: the update is proportional to the gradient (SGD, momentum, ASGD, LARS). A batch
  k times larger averages away k times the variance, so the LR grows with B: the linear
  rule (Goyal et al. 2017) for a fixed batch, the AdaScale gain r (Johnson et al. 2020)
  when the batch adapts.
- `adam`: the update is normalised (by a second moment, a sign, an orthogonalisation or a
  curvature estimate), so its size barely depends on the gradient's scale: the square-root
  rule (Hoffer et al. 2017; Malladi et al. 2022) and sqrt(r), as AdaptDL's AdamScale does.

Pure: no torch import. Optimizers are recognised by class name (and their base classes'),
so third-party classes need not be installed for the table to know them.
"""

from __future__ import annotations

import inspect
from typing import Any

from batchlab.errors import ConfigError

FAMILIES = ("sgd", "adam")

# Update proportional to the gradient.
# LARS (You et al. 2017) rescales each layer by a trust ratio but is SGD with momentum
# within it, and was scaled linearly with the batch; both old tables agreed on it.
_SGD_LIKE = ("SGD", "ASGD", "SGDW", "LARS", "FusedSGD")
# Normalised update. LAMB (You et al. 2019) is Adam's normalised update times a layer-wise
# trust ratio: the second moment is what makes it Adam-like, and its own paper scales the
# LR with sqrt(B). (The planner used to count it SGD-like, the controller Adam-like.)
# Rprop and Lion use the gradient's sign only, Muon an orthogonalised momentum, LBFGS a
# quasi-Newton direction that is invariant to the gradient's scale: all normalised.
_ADAM_LIKE = (
    "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adagrad", "Adadelta",
    "RMSprop", "Rprop", "Adafactor", "Muon", "LBFGS",
    "LAMB", "Lamb", "FusedLAMB", "FusedAdam", "DeepSpeedCPUAdam", "Adam8bit", "AdamW8bit",
    "PagedAdamW", "PagedAdamW8bit", "AdaBelief", "Lion", "NovoGrad", "Adan", "SophiaG",
)  # fmt: skip
OPTIMIZER_FAMILIES: dict[str, str] = {
    **{name: "sgd" for name in _SGD_LIKE},
    **{name: "adam" for name in _ADAM_LIKE},
}

# Each family's default LR rule: for a batch fixed for the whole run, and for a batch the
# adaptive controller changes as it goes (it scales by the AdaScale gain r).
DEFAULT_LR_RULES: dict[str, dict[str, str]] = {
    "sgd": {"fixed": "linear", "adaptive": "adascale"},
    "adam": {"fixed": "sqrt", "adaptive": "sqrt-adascale"},
}


def unwrap_optimizer(optimizer: Any) -> Any:
    """The real optimizer behind wrappers that keep it in `.optimizer`.

    Accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer and Lookahead-style
    wrappers do (wrappers of wrappers too); duck-typed on `param_groups` so torch need not
    be imported here.
    """
    while not isinstance(optimizer, (str, type)):
        inner = getattr(optimizer, "optimizer", None)
        if not (hasattr(inner, "param_groups") or hasattr(inner, "optimizer")):
            return optimizer
        optimizer = inner
    return optimizer


def optimizer_name(optimizer: Any) -> str:
    """The class name of an optimizer given as an instance, a class or a name."""
    optimizer = unwrap_optimizer(optimizer)
    if isinstance(optimizer, str):
        return optimizer
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    return cls.__name__


def optimizer_family(optimizer: Any, *, rules: tuple[str, ...] = ("linear", "sqrt")) -> str:
    """`sgd` or `adam` for an optimizer instance, class or class name (wrappers unwrapped).

    Looked up in one order: the class name in the table, then its base classes (a
    subclass of `torch.optim.Adam` is Adam-like), then, for a class or instance the table
    does not know, Adam's signature: `betas` in its `defaults` or constructor means a
    second moment. Otherwise a ConfigError that asks for `lr_rule`, listing `rules`
    (the explicit rules the calling context accepts).
    """
    optimizer = unwrap_optimizer(optimizer)
    name = optimizer_name(optimizer)
    if isinstance(optimizer, str):
        classes: tuple[type, ...] = ()
    else:
        classes = (optimizer if isinstance(optimizer, type) else type(optimizer)).__mro__
    for candidate in (name, *(c.__name__ for c in classes)):
        if candidate in OPTIMIZER_FAMILIES:
            return OPTIMIZER_FAMILIES[candidate]
    if _has_betas(optimizer):
        return "adam"
    raise ConfigError(
        f"optimizer family: expected an optimizer batchlab knows (SGD-like: "
        f"{', '.join(_SGD_LIKE)}; Adam-like: {', '.join(_ADAM_LIKE)}) or one with `betas`, "
        f"got {name}; pass lr_rule={rules[0]!r} (update proportional to the gradient) or "
        f"lr_rule={rules[1]!r} (normalised update) explicitly"
    )


def _has_betas(optimizer: Any) -> bool:
    """Adam's signature: a `betas` hyper-parameter (instance defaults or constructor)."""
    if isinstance(optimizer, str):
        return False
    defaults = getattr(optimizer, "defaults", None)
    if isinstance(defaults, dict) and "betas" in defaults:
        return True
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    try:
        return "betas" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def family_lr_rule(family: str, *, adaptive: bool = False) -> str:
    """The family's LR rule: `linear`/`sqrt` for a fixed batch, `adascale`/`sqrt-adascale`
    when the batch adapts."""
    if family not in DEFAULT_LR_RULES:
        raise ConfigError(
            f"optimizer family: expected one of {', '.join(FAMILIES)}, got {family!r}"
        )
    return DEFAULT_LR_RULES[family]["adaptive" if adaptive else "fixed"]


def default_lr_rule(optimizer: Any, *, adaptive: bool = False) -> str:
    """`family_lr_rule(optimizer_family(optimizer))`; for an optimizer the table does not
    know, a ConfigError that names `lr_rule` and the rules to pass instead."""
    rules = tuple(family_lr_rule(f, adaptive=adaptive) for f in FAMILIES)
    return family_lr_rule(optimizer_family(optimizer, rules=rules), adaptive=adaptive)
