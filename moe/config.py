"""Typed configuration: frozen dataclasses loaded from YAML, with dotted overrides.

A YAML file holds sections named after the fields of `Config` (`model:`, ...). A file may
start from another with `base: other.yaml` (a path relative to the file); its keys are
merged over the base's, section by section. Command-line overrides (`model.n_experts=4`)
are applied last. Everything is validated here, in one place, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from etils import epath

# what ships with the package (configs/, launch/, experiments/: symlinks into the repository's
# own folders, copied into an installed wheel), so every command runs without a source tree
PACKAGE_DIR = Path(__file__).resolve().parent
QUANT_FORMATS = ("int8", "int4", "nf4", "nf4-dq")  # weight-only formats (moe/model/qarray.py)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: dense (n_experts == 0) or sparse mixture of experts."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: Optional[int] = None  # None: d_model // n_heads
    d_ff: int = 14336  # hidden width of the dense MLP, or of each expert
    n_experts: int = 0  # 0: dense SwiGLU MLP in every layer
    top_k: int = 2  # experts per token (ignored when dense)
    # MoE variants beyond Mixtral (docs/moe-variants.md); every default is Mixtral's
    n_shared_experts: int = 0  # SwiGLU experts every token passes through, added to the routed output (DeepSeekMoE)
    d_ff_shared: Optional[int] = None  # hidden width of each shared expert; None: d_ff
    router_scores: Literal["softmax", "sigmoid"] = "softmax"  # sigmoid: per-expert scores (DeepSeek-V3)
    norm_topk: bool = True  # the chosen top-k weights renormalized to sum to 1 (Mixtral; Qwen3's norm_topk_prob)
    routed_scale: float = 1.0  # the routed experts' weights times this (DeepSeek-V3's routed_scaling_factor)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3, OLMoE)
    # aux_loss: the Switch/Mixtral loss (train.aux_loss_coef); bias: DeepSeek-V3's auxiliary-loss-free
    # per-expert bias on the choice, moved by bias_update_rate after every step; none: neither
    balance: Literal["aux_loss", "bias", "none"] = "aux_loss"
    bias_update_rate: float = 0.001
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None  # None: plain causal attention
    max_seq_len: int = 32768
    rms_norm_eps: float = 1e-5
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # see moe/model/dispatch.py
    moe_dispatch: Literal["auto", "dense", "ragged", "sorted", "grouped", "gather", "megablox"] = "auto"
    capacity_factor: Optional[float] = None  # expert-parallel buffers; None: dropless
    # how copies reach their experts' devices (moe/parallel/expert_parallel.py)
    ep_exchange: Literal["ragged", "padded"] = "ragged"
    ep_buffer_factor: Optional[float] = None  # ragged receive buffers: this x a device's copies; None: worst case
    # auto: splash on TPU, cudnn on GPU (16-bit); moe/model/attention.py
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"
    # attention across sequence shards when mesh.context > 1 (moe/parallel/context.py): keys
    # and values all-gathered, or passed around a ring; auto: all_gather (docs/context.md)
    context_parallel: Literal["auto", "all_gather", "ring"] = "auto"
    remat: Literal["none", "full", "save_dots"] = "none"
    init_std: float = 0.02
    bos_id: int = 1
    eos_id: int = 2

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def recompute_gated(self) -> bool:
        """The SwiGLU's gated product recomputed in the backward pass (layers.gated_down)
        where the layer is not rematerialized; a rematerialized one saves nothing of it anyway."""
        return self.remat == "none"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


# ModelConfig fields that say how a model computes, not what it is: weights move freely
# between configs that differ only in these (train.init_from, moe upcycle)
COMPUTE_FIELDS = frozenset(
    {
        "dtype",
        "param_dtype",
        "moe_dispatch",
        "capacity_factor",
        "ep_exchange",
        "ep_buffer_factor",
        "remat",
        "attention",
        "context_parallel",
        "init_std",
        "max_seq_len",
        "bias_update_rate",
    }
)


def architecture_diffs(a: ModelConfig, b: ModelConfig, free=COMPUTE_FIELDS) -> list[tuple[str, object, object]]:
    """(field, a's value, b's value) for every field outside `free` where the two differ."""
    return [
        (f.name, getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(ModelConfig)
        if f.name not in free and getattr(a, f.name) != getattr(b, f.name)
    ]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Text in, packed token sequences out (moe/data/pipeline.py)."""

    paths: tuple[str, ...] = ()  # files, directories or globs; empty: the embedded stdlib corpus
    # the embedded corpus's files are checked against their manifest (moe/data/corpus.py):
    # warn: log a changed or missing file and train on what is there; strict: refuse
    corpus_check: Literal["warn", "strict"] = "warn"
    format: Literal["auto", "text", "jsonl", "chat", "preference"] = "auto"  # auto: by extension (.jsonl / .json)
    # chat: JSONL conversations (moe/data/chat.py), loss on assistant tokens only; preference: DPO pairs
    text_field: str = "text"  # the JSONL field holding a document
    val_paths: tuple[str, ...] = ()  # empty: hold out val_fraction of the documents
    val_fraction: float = 0.05
    tokenizer: str = "mistral-v1"  # "mistral-v1" (from mistral-common) or a .model path
    workers: int = 2  # grain worker processes; 0 reads in the training process
    shuffle_window: int = 1024  # packed sequences shuffled together, so a batch mixes documents; 0: off
    overflow: Literal["truncate", "drop"] = "truncate"  # a chat longer than seq_len: drop its oldest turns, or all


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimization (moe/training/step.py); batch_size counts sequences of seq_len tokens."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    # lm_head + cross-entropy with the gradient in one blocked pass (moe/training/loss.py); False: plain autodiff
    fused_loss: bool = True
    # positions per block of the fused loss; None: the largest divisor of seq_len <= 128
    loss_chunk: Optional[int] = None
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    aux_loss_coef: float = 0.02  # load balancing, as Mixtral
    z_loss_coef: float = 1e-3  # router z-loss, as ST-MoE
    freeze_router: bool = False  # ablation: the router keeps its initial weights
    init_from: Optional[str] = None  # start from these weights (moe/training/init_from.py); None: random
    objective: Literal["lm", "dpo"] = "lm"  # dpo needs data.format=preference
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops
    eval_every: int = 100
    eval_batches: int = 4


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (moe/model/lora.py); rank null trains every weight instead."""

    rank: Optional[int] = None
    alpha: float = 16.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    dropout: float = 0.0  # on the adapters' input
    # shared: the MoE block's shared experts (w1, w2 and w3 of each)
    targets: tuple[Literal["q", "k", "v", "o", "w1", "w2", "w3", "mlp", "gate", "shared"], ...] = ("q", "k", "v", "o")
    train_router: bool = False  # the router trained fully beside the adapters (else frozen, or "gate": LoRA)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimization (Rafailov et al. 2023), train.objective=dpo."""

    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO: the chance a preference label is flipped


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization (moe/quant). In a LoRA run, the frozen base is held in this
    format (QLoRA); in a checkpoint's config.yaml, its params are stored in it."""

    base: Optional[Literal[QUANT_FORMATS]] = None  # null: weights in param_dtype
    include: tuple[str, ...] = ("layers/*",)  # fnmatch patterns of weight paths (moe/quant/params.py)
    exclude: tuple[str, ...] = ()
    block_size: int = 64


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (moe/parallel/mesh.py): sizes of the named axes; -1 fills the rest."""

    data: int = -1
    fsdp: int = 1
    context: int = 1  # sequence shards (context parallelism, moe/parallel/context.py)
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1  # multislice: how much of each axis crosses slices (DCN)
    dcn_fsdp: int = 1
    dcn_context: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1
    rules: Literal["default", "replicated"] = "default"  # logical-axis rules preset


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host start through jax.distributed; automatic on TPU pods. Elsewhere set these
    or MOE_COORDINATOR_ADDRESS, MOE_NUM_PROCESSES, MOE_PROCESS_ID."""

    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    seed: int = 0


# ----------------------------------------------------------------------------- validation


def validate_model(m: ModelConfig) -> None:
    """Reject every inconsistent model; each message names the field and the fix."""
    positive = ["vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"]
    for name in positive:
        if getattr(m, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {getattr(m, name)}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads}) "
            "for grouped-query attention; pick n_kv_heads among the divisors of n_heads"
        )
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model ({m.d_model}) is not divisible by model.n_heads ({m.n_heads}); "
            "set model.head_dim explicitly"
        )
    head_dim = m.resolved_head_dim
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(
            f"model.head_dim must be a positive even number (rotary embedding rotates pairs), got {head_dim}"
        )
    if m.n_experts < 0:
        raise ConfigError(f"model.n_experts must be >= 0 (0 means dense), got {m.n_experts}")
    if m.n_experts == 1:
        raise ConfigError("model.n_experts=1 is a dense model with a router; use n_experts=0")
    if m.is_moe and not 1 <= m.top_k <= m.n_experts:
        raise ConfigError(f"model.top_k ({m.top_k}) must be between 1 and model.n_experts ({m.n_experts})")
    _validate_moe_variant(m)
    if m.sliding_window is not None and m.sliding_window < 1:
        raise ConfigError(
            f"model.sliding_window must be >= 1 (keys attended, itself included) or null for "
            f"plain causal attention, got {m.sliding_window}"
        )
    if m.rope_theta <= 0:
        raise ConfigError(f"model.rope_theta must be > 0, got {m.rope_theta}")
    if not 0 < m.rms_norm_eps < 1:
        raise ConfigError(f"model.rms_norm_eps must be in (0, 1), got {m.rms_norm_eps}")
    if m.capacity_factor is not None and m.capacity_factor <= 0:
        raise ConfigError(f"model.capacity_factor must be > 0 or null (dropless), got {m.capacity_factor}")
    if m.ep_buffer_factor is not None and (m.ep_buffer_factor <= 0 or m.ep_exchange != "ragged"):
        raise ConfigError(
            f"model.ep_buffer_factor ({m.ep_buffer_factor}) sizes the receive buffers of "
            "model.ep_exchange=ragged and must be > 0; set it to null (worst case, never "
            "overflows) or use ep_exchange=ragged"
        )
    if m.init_std <= 0:
        raise ConfigError(f"model.init_std must be > 0, got {m.init_std}")


def _validate_moe_variant(m: ModelConfig) -> None:
    if m.n_shared_experts < 0:
        raise ConfigError(f"model.n_shared_experts must be >= 0 (0: none), got {m.n_shared_experts}")
    if m.n_shared_experts and not m.is_moe:
        raise ConfigError(
            "model.n_shared_experts needs a sparse model (model.n_experts >= 2); a dense model's "
            "MLP already sees every token: widen model.d_ff instead"
        )
    if m.d_ff_shared is not None and (m.d_ff_shared < 1 or not m.n_shared_experts):
        raise ConfigError(
            f"model.d_ff_shared ({m.d_ff_shared}) is the width of each shared expert: it must be "
            ">= 1 and needs model.n_shared_experts >= 1 (or set it to null)"
        )
    if m.balance == "bias" and not m.is_moe:
        raise ConfigError("model.balance=bias balances experts; a dense model has none: use balance=aux_loss")
    if not m.bias_update_rate > 0:
        raise ConfigError(f"model.bias_update_rate must be > 0, got {m.bias_update_rate}")
    if not m.routed_scale > 0:
        raise ConfigError(f"model.routed_scale must be > 0, got {m.routed_scale}")
    if m.router_scores == "sigmoid" and m.is_moe and m.top_k == 1 and m.norm_topk:
        raise ConfigError(
            "model.router_scores=sigmoid with top_k=1 and norm_topk=true gives every token the "
            "weight 1, so the router gets no gradient; set model.norm_topk=false"
        )


def validate_train(cfg: Config) -> None:
    t, d = cfg.train, cfg.data
    for name in ["steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "max_nonfinite_steps"]:
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum "
            f"({t.grad_accum}): each micro-batch holds batch_size / grad_accum sequences"
        )
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
    if t.loss_chunk is not None and (
        t.loss_chunk < 1 or t.seq_len % t.loss_chunk or t.objective != "lm" or not t.fused_loss
    ):
        raise ConfigError(
            f"train.loss_chunk ({t.loss_chunk}) must divide train.seq_len ({t.seq_len}) and applies "
            "to the fused loss of the language-model objective; set a divisor of seq_len or null"
        )
    if t.warmup_steps < 0 or t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("train.lr must be > 0, train.warmup_steps >= 0 and train.min_lr_ratio in [0, 1]")
    for name in ["weight_decay", "clip_norm", "aux_loss_coef", "z_loss_coef"]:
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if d.shuffle_window < 0:
        raise ConfigError(f"data.shuffle_window must be >= 0 (0 turns it off), got {d.shuffle_window}")
    if d.workers < 0:
        raise ConfigError(f"data.workers must be >= 0, got {d.workers}")
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every_steps and checkpoint.keep must be >= 1")


def validate_tuning(cfg: Config) -> None:
    lora, t, fmt = cfg.lora, cfg.train, cfg.data.format
    if lora.rank is not None:
        if lora.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1 (or null to train every weight), got {lora.rank}")
        if not lora.targets:
            raise ConfigError("lora.targets is empty; name at least one of q, k, v, o, w1, w2, w3, mlp, gate, shared")
        if "shared" in lora.targets and not cfg.model.n_shared_experts:
            raise ConfigError("lora.targets has 'shared' but the model has no shared experts: drop it")
        if lora.alpha <= 0 or not 0 <= lora.dropout < 1:
            raise ConfigError(f"lora.alpha must be > 0 and lora.dropout in [0, 1), got {lora.alpha}, {lora.dropout}")
        if "gate" in lora.targets and lora.train_router:
            raise ConfigError(
                "lora.targets has 'gate' (a router adapter) and lora.train_router=true (the whole router): choose one"
            )
        if ("gate" in lora.targets or lora.train_router) and not cfg.model.is_moe:
            raise ConfigError("a dense model has no router: drop 'gate' from lora.targets and lora.train_router")
        if t.init_from is None:
            raise ConfigError(
                "LoRA adapts pretrained weights: set train.init_from (a Hugging Face folder, a "
                "`moe convert from-hf` output, a run directory or a checkpoint step)"
            )
    if (t.objective == "dpo") != (fmt == "preference"):
        raise ConfigError(
            "train.objective=dpo and data.format=preference go together: DPO trains on "
            f"preference pairs (got objective {t.objective!r}, format {fmt!r})"
        )
    if t.objective == "dpo" and t.init_from is None:
        raise ConfigError("DPO tunes a pretrained model against itself: set train.init_from")
    q = cfg.quant
    if q.base is not None and t.init_from is not None and lora.rank is None:
        raise ConfigError(
            f"quant.base={q.base} holds a frozen base quantized, which only LoRA keeps frozen: "
            "set lora.rank (QLoRA), or quant.base=null to fine-tune every weight"
        )
    if q.block_size < 2 or q.block_size % 2:
        raise ConfigError(f"quant.block_size must be an even number >= 2, got {q.block_size}")
    if cfg.dpo.beta <= 0 or not 0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(
            f"dpo.beta must be > 0 and dpo.label_smoothing in [0, 0.5), got {cfg.dpo.beta}, {cfg.dpo.label_smoothing}"
        )


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    validate_train(cfg)
    validate_tuning(cfg)


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_yaml(path: Path):
    """The file's YAML; a syntax error becomes one line naming the file, line and column."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"{where}: YAML syntax error: {problem}; fix the file (indentation, a missing "
            "colon or an unclosed quote or bracket)"
        ) from None


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a config file and everything it builds on (`base:`), merged into one dict."""
    path = epath.Path(path)  # a run's config.yaml may be on gs:// (moe/storage.py)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}; give a YAML file or a shipped config by name "
            f"({', '.join(sorted(p.stem for p in shipped('configs').glob('*.yaml')))})"
        )
    if _identity(path) in _seen:
        raise ConfigError(f"config 'base' chain loops back to {path}")
    data = _parse_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path to another config file")
    return _merge(read_yaml(path.parent / base, _seen + (_identity(path),)), data)


def _identity(path) -> str:
    return str(path) if "://" in str(path) else str(path.resolve())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings; values are parsed as YAML (`4`, `1e-3`, `null`, `true`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        data = _merge(data, nested)
    return data


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def shipped(relative: str | Path) -> Path:
    """A file shipped with the package (e.g. configs/tiny-moe.yaml), wherever it is installed
    (in a source checkout, the repository's own folder that the package links to)."""
    return (PACKAGE_DIR / relative).resolve()


def resolve_path(path: str | Path) -> str | Path:
    """A config file as given, or a shipped config by name: `tiny-moe` or `tiny-moe.yaml`
    (configs/ of the package) when no such file exists here."""
    text = str(path)
    if "://" in text or Path(text).exists() or "/" in text:
        return path
    name = text if text.endswith((".yaml", ".yml")) else f"{text}.yaml"
    candidate = shipped("configs") / name
    return candidate if candidate.is_file() else path


def load(path: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """Load, merge, override and validate a config file (or a shipped config by name)."""
    return from_dict(apply_overrides(read_yaml(resolve_path(path)), list(overrides)))


def add_cli_args(parser) -> None:
    """CONFIG and its dotted key=value overrides, as every command that reads a config takes them."""
    parser.add_argument("config", help="a YAML config file (configs/tiny-moe.yaml) or a shipped one by name (tiny-moe)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.n_experts=4")


def to_dict(cfg: Any) -> dict:
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def dump(cfg: Config) -> str:
    """The resolved config as YAML; loading it back gives an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
