"""Training configuration: a YAML recipe (sections below) plus `section.key=value` overrides, validated early.

Recipes ship as package data in `diffcoder/configs/` (`diffcoder train cpt-small` finds `cpt-small.yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import yaml
from pydantic import BeforeValidator, Strict, TypeAdapter, ValidationError

from diffcoder.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads '1e-3' (no dot) as a string: take it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _comma_list(value: Any) -> Any:
    """`lora.targets=q_proj,v_proj` on the command line is a comma-separated string."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def _scalar_text(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) else value


# The value types of config keys: no silent bool -> int or float -> int; numbers may come as YAML strings.
Int = Annotated[int, Strict()]
Number = Annotated[float, Strict(), BeforeValidator(_yaml_number)]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, BeforeValidator(_scalar_text)]
Names = Annotated[list[Annotated[str, BeforeValidator(str)]], BeforeValidator(_comma_list)]


@dataclass
class ModelSection:
    path: Text = "default"  # checkpoint dir, .gguf, 'default'/'smollm2' (diffusion default), 'smollm2-ar' (AR origin)
    dtype: Text = "float32"  # master weights; on GPU the forward runs under bf16 autocast (train.bf16)
    block_size: Int | None = None  # None: the checkpoint's
    shift: Flag | None = None  # None: the checkpoint's
    gradient_checkpointing: Flag = False


@dataclass
class DataSection:
    kind: Text = "cpt"  # cpt (packed rows) | sft (prompt/response pairs)
    path: Text = ""  # a directory from `diffcoder data build` / `diffcoder data sft`
    seq_len: Int = 512
    min_eos: Int = 1  # SFT: trailing EOS appended per sample, drawn uniformly in [min_eos, max_eos]
    max_eos: Int = 4


@dataclass
class ObjectiveSection:
    kind: Text = "diffusion"  # diffusion (docs/design.md §3) | ar (plain next-token, the baseline)
    warmup_steps: Int = 0  # S_warmup: u_max ramps from u_init to 1 with unit weights
    u_init: Number = 1e-3
    antithetic: Flag = False  # stratified t draws over the batch


@dataclass
class OptimSection:
    lr: Number = 1e-4
    min_lr_ratio: Number = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: Int = 0  # linear LR warmup
    weight_decay: Number = 0.0
    beta1: Number = 0.9
    beta2: Number = 0.95
    eps: Number = 1e-8
    grad_clip: Number = 1.0  # 0 disables clipping (the pre-clip norm is logged either way)


@dataclass
class TrainSection:
    steps: Int = 100
    micro_batch_size: Int = 4
    grad_accum: Int = 1
    seed: Int = 0
    device: Text = "auto"  # auto | cpu | cuda
    bf16: Flag = True  # autocast on CUDA; ignored on CPU
    out_dir: Text = "runs/train"
    log_every: Int = 1
    eval_every: Int = 0  # 0: only at the end
    eval_batches: Int = 4
    eval_t_points: Int = 4  # fixed grid of t for the held-out NELBO
    save_every: Int = 0  # 0: only at the end
    keep_checkpoints: Int = 2
    compile: Flag = False  # torch.compile the decoder layers and the loss chunks (pays on GPU; minutes to start)
    loss_chunk_rows: Int = 0  # rows per LM-head + cross-entropy chunk; 0: about 256 MiB of float32 logits each


@dataclass
class LoraSection:
    enabled: Flag = False
    rank: Int = 8
    alpha: Number = 16.0
    dropout: Number = 0.0
    targets: Names = field(default_factory=lambda: list(LORA_TARGETS))
    # start the adapter (LoRA matrices and fully trained token rows) from an earlier LoRA run (its latest
    # checkpoint) or adapter directory, e.g. SFT after LoRA CPT: runs/cpt; its FIM tokens come along
    init_from: Text = ""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _section_type(name: str):
    return {"model": ModelSection, "data": DataSection, "objective": ObjectiveSection, "optim": OptimSection,
            "train": TrainSection, "lora": LoraSection}[name]


def _unknown(key: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "list": "a list",
             "string": "a string"}


@functools.cache
def _adapter(section: type, name: str) -> TypeAdapter:
    return TypeAdapter(get_type_hints(section, include_extras=True)[name])


def _coerce(key: str, value: Any, section: type, f: dataclasses.Field) -> Any:
    """The value of config key `key` as its field's type, or a ConfigError naming the key and a valid value."""
    try:
        return _adapter(section, f.name).validate_python(value)
    except ValidationError as exc:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        example = ",".join(default) if isinstance(default, list) else str(default).lower() if isinstance(
            default, bool) else default
        if value is None:
            raise ConfigError(f"{key} may not be null; give a value (e.g. {key}={example})") from None
        kind = exc.errors()[0]["type"].split("_")[0]
        expected = _EXPECTED.get(kind, exc.errors()[0]["msg"].lower())
        raise ConfigError(f"{key} must be {expected}, got {value!r} (e.g. {key}={example})") from None


def from_dict(d: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    sections = [f.name for f in fields(TrainConfig)]
    for sname, body in (d or {}).items():
        if sname not in sections:
            raise _unknown(sname, sections)
        if not isinstance(body, dict):
            raise ConfigError(f"config section {sname!r} must be a mapping of keys to values")
        sec = getattr(cfg, sname)
        names = {f.name: f for f in fields(sec)}
        for k, v in body.items():
            if k not in names:
                raise _unknown(f"{sname}.{k}", [f"{sname}.{n}" for n in names])
            setattr(sec, k, _coerce(f"{sname}.{k}", v, type(sec), names[k]))
    return cfg


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings (value parsed as YAML: 3, 1e-4, true, [a, b])."""
    keys = [f"{s}.{f.name}" for s in ("model", "data", "objective", "optim", "train", "lora")
            for f in fields(_section_type(s))]
    d = {k: dict(v or {}) for k, v in (d or {}).items()}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value (e.g. train.steps=200)")
        key, raw = ov.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise _unknown(key, keys)
        sec, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        d.setdefault(sec, {})[name] = value
    return d


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if shipped.is_file():
        return shipped
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped recipe; shipped: {', '.join(names)}")


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    d: dict[str, Any] = {}
    if name_or_path:
        path = find_recipe(name_or_path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must be a mapping of sections (model, data, objective, optim, train, lora)")
    cfg = from_dict(apply_overrides(d, overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig, block_size: int | None = None) -> None:
    """Values that cannot work, caught before any model is loaded (block_size: the model's, once known)."""
    c = cfg
    if c.data.kind not in ("cpt", "sft"):
        raise ConfigError(f"data.kind must be 'cpt' or 'sft', got {c.data.kind!r}")
    if c.objective.kind not in ("diffusion", "ar"):
        raise ConfigError(f"objective.kind must be 'diffusion' or 'ar', got {c.objective.kind!r}")
    if not c.data.path:
        raise ConfigError("data.path is empty; build data with `diffcoder data build` and set data.path=DIR")
    if c.data.seq_len < 2:
        raise ConfigError(f"data.seq_len must be >= 2, got {c.data.seq_len}")
    B = c.model.block_size if c.model.block_size is not None else block_size
    if B is not None:
        if B < 1:
            raise ConfigError(f"model.block_size must be >= 1, got {B}")
        if c.data.seq_len % B:
            raise ConfigError(f"block size {B} does not divide data.seq_len {c.data.seq_len}; choose a seq_len that "
                              f"is a multiple of {B} (e.g. {c.data.seq_len - c.data.seq_len % B or B})")
    if not 0 < c.objective.u_init <= 1:
        raise ConfigError(f"objective.u_init must be in (0, 1], got {c.objective.u_init}")
    if c.objective.warmup_steps < 0:
        raise ConfigError(f"objective.warmup_steps must be >= 0, got {c.objective.warmup_steps}")
    if not 1 <= c.data.min_eos <= c.data.max_eos:
        raise ConfigError(f"need 1 <= data.min_eos <= data.max_eos, got {c.data.min_eos}..{c.data.max_eos}")
    for k in ("steps", "micro_batch_size", "grad_accum", "log_every", "eval_batches", "eval_t_points",
              "keep_checkpoints"):
        if getattr(c.train, k) < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {getattr(c.train, k)}")
    if c.train.loss_chunk_rows < 0:
        raise ConfigError(f"train.loss_chunk_rows must be >= 0 (0: automatic), got {c.train.loss_chunk_rows}")
    if c.train.device not in ("auto", "cpu", "cuda") and not c.train.device.startswith("cuda:"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {c.train.device!r}")
    if c.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {c.optim.lr}")
    if not 0 <= c.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {c.optim.min_lr_ratio}")
    if c.lora.enabled:
        if c.lora.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {c.lora.rank}")
        bad = [t for t in c.lora.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"unknown lora.targets {bad}; choose from {LORA_TARGETS}")
    elif c.lora.init_from:
        raise ConfigError("lora.init_from needs lora.enabled=true")
    from diffcoder.checkpoint import DTYPES

    if c.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype {c.model.dtype!r} is not one of {', '.join(DTYPES)}")


def replace(cfg: TrainConfig, **sections: dict[str, Any]) -> TrainConfig:
    """A copy with some keys of some sections changed (tests and benchmarks)."""
    new = from_dict(cfg.to_dict())
    for sname, kv in sections.items():
        setattr(new, sname, dataclasses.replace(getattr(new, sname), **kv))
    return new
