"""Parameter counts from shapes alone: total, active per token, and per component."""

from __future__ import annotations

import dataclasses
import math

import jax

from moe.config import ModelConfig
from moe.model import param_shapes

COMPONENTS = ("embedding", "attention", "mlp", "router", "experts", "shared", "norms", "lm_head")


def component_of(path: tuple[str, ...]) -> str:
    """Which component a parameter path (e.g. ('layers', 'moe', 'w1')) belongs to."""
    if path[0] == "embed":
        return "embedding"
    if path[0] == "lm_head":
        return "lm_head"
    if path[-1] == "scale":
        return "norms"
    if "attn" in path:
        return "attention"
    if "shared" in path:  # the MoE block's shared experts: every token uses them
        return "shared"
    if "mlp" in path:
        return "mlp"
    if "moe" in path:
        return "router" if path[-1] == "gate" else "experts"
    raise ValueError(f"parameter {'/'.join(path)} belongs to no known component")


@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # used per token: top_k of n_experts experts
    by_component: dict  # component -> (total, active)


def count_params(cfg: ModelConfig) -> ParamCount:
    shapes = param_shapes(cfg)
    totals = dict.fromkeys(COMPONENTS, 0)
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in key_path)
        totals[component_of(path)] += math.prod(leaf.shape)
    by_component = {}
    for name, total in totals.items():
        active = total // cfg.n_experts * cfg.top_k if name == "experts" and cfg.is_moe else total
        by_component[name] = (total, active)
    return ParamCount(
        total=sum(t for t, _ in by_component.values()),
        active=sum(a for _, a in by_component.values()),
        by_component=by_component,
    )


def format_count(cfg: ModelConfig, count: ParamCount) -> str:
    kind = f"sparse MoE, {cfg.n_experts} experts, top-{cfg.top_k}" if cfg.is_moe else "dense"
    if cfg.n_shared_experts:
        kind += f", {cfg.n_shared_experts} shared"
    lines = [
        f"model: {kind}, {cfg.n_layers} layers, d_model {cfg.d_model}",
        f"{'component':<12}{'total':>20}{'active':>20}",
    ]
    for name, (total, active) in count.by_component.items():
        if total:
            lines.append(f"{name:<12}{total:>20,}{active:>20,}")
    lines.append(f"{'total':<12}{count.total:>20,}{count.active:>20,}")
    lines.append(f"total parameters: {count.total:,}")
    lines.append(f"active parameters per token: {count.active:,}")
    return "\n".join(lines)
