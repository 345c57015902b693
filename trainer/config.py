"""Training configuration: typed dataclasses with one doc line per field, presets, overrides.

A run's configuration is resolved in this order: a named preset (`PRESETS`), then a JSON
file (``--config``), then ``--set section.key=value`` overrides from the command line.
Unknown keys raise `ConfigError` listing the valid ones; the resolved config is written to the
run directory as ``config.json`` (and can be fed back with ``--config``).

Paper defaults (SiT, Ma et al. 2024, following DiT): global batch 256, AdamW lr 1e-4, weight
decay 0, no warmup, EMA decay 0.9999 updated every step, label dropout 0.1, Linear path with
velocity prediction.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from latents.argtypes import parse_choice
from latents.autoencoder import LatentNorm
from latents.reader import DEFAULT_WINDOW_BYTES
from trainer.model import LABEL_DROPOUT, NUM_CLASSES, SIT_MODELS, MlpKind, NormKind, SiTConfig, sit_config
from trainer.transport import LossWeight, PathType, Prediction, TimeSampling, Transport

PRECISIONS = ("bf16", "fp32")


class ConfigError(ValueError):
    """A configuration key, value or file is invalid; the message names it and the valid choices."""


@dataclass
class ModelConfig:
    name: str = "SiT-XL/2"  # a preset of trainer.model (sit models), or "custom" for the sizes below
    depth: int = 0  # transformer blocks (custom models only; 0 = from name)
    hidden_size: int = 0  # token width (custom models only)
    num_heads: int = 0  # attention heads (custom models only)
    patch_size: int = 0  # latent patch side (custom models only)
    input_size: int = 32  # model-latent side: 32 at 256 px with the SD VAE (16 RAE/FLUX.2); 0 = the dataset's
    in_channels: int = 4  # model-latent channels (4 SD, 16 SD3/FLUX.1, 128 FLUX.2, 768 RAE-B); 0 = the dataset's
    num_classes: int = NUM_CLASSES  # classes; must match the dataset (the null class is index num_classes)
    class_dropout_prob: float = LABEL_DROPOUT  # label dropout probability (for classifier-free guidance)
    learn_sigma: bool = True  # 2x output channels like the released checkpoints (second half unused)
    mlp: str = "gelu"  # block MLP: gelu (released) or swiglu
    norm: str = "layernorm"  # block norms: layernorm (released) or rmsnorm
    rope: bool = False  # 2-D axial RoPE on q and k over the patch grid
    qk_norm: bool = False  # per-head RMSNorm of q and k

    def sit_config(self) -> SiTConfig:
        try:
            block = {"mlp": parse_choice(MlpKind, self.mlp), "norm": parse_choice(NormKind, self.norm)}
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
        common = {
            "input_size": self.input_size,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "class_dropout_prob": self.class_dropout_prob,
            "learn_sigma": self.learn_sigma,
            **block,
            "rope": self.rope,
            "qk_norm": self.qk_norm,
        }
        if self.name == "custom":
            sizes = (self.depth, self.hidden_size, self.num_heads, self.patch_size)
            if min(sizes) < 1:
                raise ConfigError("model.name=custom needs model.depth, hidden_size, num_heads and patch_size >= 1")
            return SiTConfig(*sizes, **common)
        if self.name not in SIT_MODELS:
            raise ConfigError(f"unknown model.name {self.name!r}; valid: custom, {', '.join(SIT_MODELS)}")
        if any((self.depth, self.hidden_size, self.num_heads, self.patch_size)):
            raise ConfigError(f"model.depth/hidden_size/num_heads/patch_size apply to name=custom, not {self.name}")
        return sit_config(self.name, **common)


@dataclass
class DataConfig:
    url: str = ""  # latent dataset written by `sit encode` (local path, s3://, gs://, ...)
    global_batch_size: int = 256  # samples per optimizer step over all ranks (divisible by the world size)
    num_workers: int = 4  # DataLoader worker processes per rank
    seed: int = 0  # shuffling, flips and posterior noise derive from it
    streams: int = 0  # logical streams fixing the epoch order (0: world x workers); resume on world sizes dividing it
    shuffle_buffer_bytes: int = DEFAULT_WINDOW_BYTES  # shuffle window per stream, in compressed bytes
    bad_shard: str = "fail"  # an unreadable shard: "fail" stops training, "skip" drops its samples
    latent_norm: str = "vae"  # "vae": the autoencoder's own transform; "dataset": per-channel mean/std of the card

    def norm(self) -> LatentNorm:
        try:
            return LatentNorm(self.latent_norm)
        except ValueError:
            valid = ", ".join(n.value for n in LatentNorm)
            raise ConfigError(f"data.latent_norm {self.latent_norm!r}; valid: {valid}") from None


@dataclass
class TransportConfig:
    path_type: str = "Linear"  # Linear, GVP or VP
    prediction: str = "velocity"  # velocity, score or noise
    loss_weight: str = "none"  # none, velocity or likelihood (score/noise predictions)
    train_eps: float = -1.0  # training time interval margin; -1 = the released default for the path
    sample_eps: float = -1.0  # sampling time margin (preview grids); -1 = the released default
    time_sampling: str = "uniform"  # training times: uniform (released) or logit_normal
    logit_mean: float = 0.0  # logit_normal m: t = sigmoid(u), u ~ N(m, s^2); m > 0 favours data (SD3's m is -m)
    logit_std: float = 1.0  # logit_normal s
    time_shift: float = 1.0  # SD3 shift of the training times, t / (s + (1 - s) t); > 1 towards noise
    sample_time_shift: float = 1.0  # the same shift for the samplers' grids (evaluation; `sit sample`'s default)
    direction_weight: float = 0.0  # weight of the velocity-direction loss 1 - cos(v_theta, u_t) added to the MSE

    def build(self) -> Transport:
        try:
            if not self.sample_time_shift > 0:
                raise ValueError(f"sample_time_shift must be > 0, got {self.sample_time_shift}")
            return Transport(
                parse_choice(PathType, self.path_type),
                parse_choice(Prediction, self.prediction),
                parse_choice(LossWeight, self.loss_weight),
                None if self.train_eps < 0 else self.train_eps,
                None if self.sample_eps < 0 else self.sample_eps,
                parse_choice(TimeSampling, self.time_sampling),
                self.logit_mean,
                self.logit_std,
                self.time_shift,
                self.direction_weight,
            )
        except ValueError as err:
            raise ConfigError(f"transport: {err}") from None


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate (constant after warmup)
    weight_decay: float = 0.0  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many steps
    max_grad_norm: float = 0.0  # clip the global gradient norm to this (0 = no clipping; the norm is logged anyway)
    ema_decay: float = 0.9999  # EMA of the weights, updated after every optimizer step


@dataclass
class ParallelConfig:
    precision: str = "bf16"  # bf16: bf16 compute in the blocks, fp32 master weights and gradient reduction; fp32
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    backend: str = "auto"  # torch.distributed backend: auto (nccl on GPU, gloo on CPU), nccl or gloo


@dataclass
class CheckpointConfig:
    url: str = ""  # where step folders go (any fsspec URL); "" = <run_dir>/checkpoints
    every: int = 5000  # save every this many steps (and at the end and on preemption)
    keep_last: int = 3  # keep the newest K complete checkpoints ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of this (0 = none)
    async_save: bool = False  # upload periodic checkpoints in the background (the final and preemption ones block)
    resume: str = "auto"  # auto: newest complete checkpoint under url; none: start fresh; or a step folder URL


@dataclass
class RollbackConfig:
    enabled: bool = False  # on a loss spike or non-finite loss, go back to the newest checkpoint (trainer.rollback)
    spike_factor: float = 2.0  # a spike: the step's loss above this x the median of the last `window` losses
    window: int = 100  # steps in the running median (spikes are looked for once it is full)
    max_rollbacks: int = 3  # stop with an error at the spike after this many rollbacks
    test_poison_batch: int = 0  # test hook (0 = off): multiply the latents of this batch (1-based, data order) ...
    test_poison_factor: float = 1e6  # ... by this factor (nan: a non-finite loss)


@dataclass
class LogConfig:
    every: int = 100  # write a metrics line (JSONL + TensorBoard) every this many steps
    time_bins: int = 4  # the loss is also averaged in this many equal bins of t
    tensorboard: bool = True  # also write TensorBoard event files under <run_dir>/tensorboard
    peak_tflops: float = 989.0  # per-device peak for MFU (H100 dense bf16 datasheet figure)
    sample_every: int = 0  # draw an EMA sample grid PNG every this many steps (0 = never)
    sample_classes: str = "0,1,2,3"  # comma-separated classes, one grid row each
    sample_per_class: int = 4  # images per grid row
    sample_steps: int = 32  # Euler steps of the probability-flow ODE for the grid
    vae: str = ""  # diffusers VAE (local folder or cached id) to decode the grid; "" = latent-channel picture
    progress: bool = True  # a progress bar when stderr is a terminal
    eval_every: int = 0  # evaluate the EMA (latent FD, see trainer.evaluate) every this many steps (0 = never)
    eval_samples: int = 1000  # samples per evaluation point, shared over the ranks
    eval_seed: int = 0  # sample plan seed: the same samples at every point
    eval_classes: str = ""  # comma-separated class ids cycled over the samples; "" = balanced over all classes
    eval_mode: str = "SDE"  # `sit sample`'s sampler: SDE or ODE (Euler)
    eval_steps: int = 50  # sampler steps per evaluation sample
    eval_batch: int = 64  # samples per forward batch on each rank
    eval_reference: int = 0  # training latents in the fixed reference set (0 = eval_samples)
    inception: str = ""  # TorchScript Inception file: also compute FID (needs vae and inception_reference)
    inception_reference: str = ""  # npz with mu/sigma of the reference images' Inception features
    wandb: bool = False  # also log to Weights & Biases (pip install 'sit-pipeline[wandb]')
    wandb_project: str = "sit"  # W&B project
    wandb_name: str = ""  # W&B run name ("" = the run directory's name)
    wandb_tags: str = ""  # comma-separated W&B tags
    wandb_mode: str = "online"  # online or offline (offline: files under <run_dir>/wandb, `wandb sync` later)

    def eval_class_ids(self, num_classes: int) -> tuple[int, ...]:
        """The class ids of ``eval_classes`` (empty: balanced over all), checked against the class count."""
        try:
            classes = tuple(int(c) for c in self.eval_classes.split(",") if c.strip())
        except ValueError:
            raise ConfigError(f"log.eval_classes {self.eval_classes!r}: not comma-separated class ids") from None
        if not all(0 <= c < num_classes for c in classes):
            raise ConfigError(f"log.eval_classes {self.eval_classes!r}: need ids in [0, {num_classes})")
        return classes

    def preview_classes(self, num_classes: int) -> list[int]:
        """The class ids of ``sample_classes``, checked against the model's class count."""
        try:
            classes = [int(c) for c in self.sample_classes.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(f"log.sample_classes {self.sample_classes!r}: not comma-separated class ids") from None
        if not classes or not all(0 <= c < num_classes for c in classes):
            raise ConfigError(f"log.sample_classes {self.sample_classes!r}: need ids in [0, {num_classes})")
        return classes


@dataclass
class TrainConfig:
    run_dir: str = "runs/sit"  # local folder for config.json, metrics.jsonl, TensorBoard, grids, export
    total_steps: int = 400_000  # optimizer steps to train (SiT's ablation length; the headline XL/2 ran 7M)
    seed: int = 0  # model initialisation and the time/noise/label-dropout generators derive from it
    max_nonfinite: int = 10  # stop after this many consecutive steps with a non-finite loss
    export: bool = True  # write the consolidated EMA (weights + model config) at the end
    export_url: str = ""  # where the export goes (any fsspec URL); "" = <run_dir>/ema.safetensors
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> TrainConfig:
        """Check values that types cannot; returns self."""
        self.model.sit_config()
        self.transport.build()
        if self.parallel.precision not in PRECISIONS:
            raise ConfigError(f"parallel.precision {self.parallel.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.parallel.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend {self.parallel.backend!r}; valid: auto, nccl, gloo")
        if self.data.bad_shard not in ("fail", "skip"):
            raise ConfigError(f"data.bad_shard {self.data.bad_shard!r}; valid: fail, skip")
        self.data.norm()
        for name, value in (
            ("total_steps", self.total_steps),
            ("data.global_batch_size", self.data.global_batch_size),
            ("checkpoint.every", self.checkpoint.every),
            ("checkpoint.keep_last", self.checkpoint.keep_last),
            ("log.every", self.log.every),
            ("max_nonfinite", self.max_nonfinite),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.log.sample_every:
            self.log.preview_classes(self.model.num_classes)
        self._validate_eval()
        self._validate_rollback()
        if not 0 <= self.optim.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.optim.ema_decay}")
        return self

    def _validate_eval(self) -> None:
        g = self.log
        if g.eval_every < 0:
            raise ConfigError(f"log.eval_every must be >= 0, got {g.eval_every}")
        if g.eval_every:
            g.eval_class_ids(self.model.num_classes)
            if g.eval_mode.upper() not in ("SDE", "ODE"):
                raise ConfigError(f"log.eval_mode {g.eval_mode!r}; valid: SDE, ODE")
            for name in ("eval_samples", "eval_steps", "eval_batch"):
                if getattr(g, name) < 1:
                    raise ConfigError(f"log.{name} must be >= 1, got {getattr(g, name)}")
            if g.eval_samples < 2 or g.eval_reference == 1:
                raise ConfigError(
                    "log.eval_samples and log.eval_reference need at least 2 samples for a Fréchet distance"
                )
            if g.inception and not (g.inception_reference and g.vae):
                raise ConfigError("log.inception needs log.inception_reference (an npz with mu/sigma) and log.vae")
        if g.wandb_mode not in ("online", "offline"):
            raise ConfigError(f"log.wandb_mode {g.wandb_mode!r}; valid: online, offline")

    def _validate_rollback(self) -> None:
        r = self.rollback
        if not r.spike_factor > 1:
            raise ConfigError(f"rollback.spike_factor must be > 1, got {r.spike_factor}")
        for name in ("window", "max_rollbacks", "test_poison_batch"):
            if getattr(r, name) < (1 if name == "window" else 0):
                raise ConfigError(f"rollback.{name} must be >= {1 if name == 'window' else 0}, got {getattr(r, name)}")

    def checkpoint_url(self) -> str:
        return self.checkpoint.url or f"{self.run_dir.rstrip('/')}/checkpoints"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tiny_cpu() -> TrainConfig:
    c = TrainConfig(run_dir="runs/tiny-cpu", total_steps=300)
    c.model = ModelConfig(
        name="custom", depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10
    )
    c.data.global_batch_size, c.data.num_workers = 32, 0
    c.parallel.precision = "fp32"
    c.checkpoint.every, c.log.every = 100, 10
    c.optim.lr, c.optim.ema_decay = 1e-3, 0.99
    return c


def _preset(name: str, input_size: int, in_channels: int = 4, pixels: int = 8, tag: str = "") -> TrainConfig:
    """``pixels``: image pixels per model-latent side (8 for the SD VAE, 16 for RAE and FLUX.2)."""
    c = TrainConfig(run_dir=f"runs/{name.replace('/', '').lower()}{tag}-{input_size * pixels}")
    c.model = ModelConfig(name=name, input_size=input_size, in_channels=in_channels)
    return c


def modernize(c: TrainConfig) -> TrainConfig:
    """The modern recipe on top of a config (LightningDiT, Yao et al. 2025): SwiGLU, RMSNorm, 2-D RoPE
    and qk-norm blocks, logit-normal(0, 1) training times and the direction loss with weight 1."""
    c.model.mlp, c.model.norm, c.model.rope, c.model.qk_norm = "swiglu", "rmsnorm", True, True
    c.transport.time_sampling, c.transport.direction_weight = "logit_normal", 1.0
    return c


def _modern(name: str, input_size: int) -> TrainConfig:
    c = modernize(_preset(name, input_size))
    c.run_dir += "-modern"
    return c


PRESETS = {
    "sit-xl2-256": lambda: _preset("SiT-XL/2", 32),
    "sit-xl2-512": lambda: _preset("SiT-XL/2", 64),
    "sit-b2-256": lambda: _preset("SiT-B/2", 32),
    "sit-xl2-256-modern": lambda: _modern("SiT-XL/2", 32),
    "sit-b2-256-modern": lambda: _modern("SiT-B/2", 32),
    # RAE (DINOv2-B/14 at 224, decoder patch 16): 768 x 16 x 16 latents at 256 px, one token per latent pixel
    "sit-xl1-rae-256": lambda: _preset("SiT-XL/1", 16, 768, 16, "-rae"),
    # 32-channel f16 latents (e.g. DC-AE f32c32 at 512 px, or any f16c32 autoencoder at 256 px)
    "sit-xl1-f16c32-256": lambda: _preset("SiT-XL/1", 16, 32, 16, "-f16c32"),
    # FLUX.2: 32 ch at /8, patchified 2x2 by its transform -> 128 x 16 x 16 at 256 px
    "sit-xl1-flux2-256": lambda: _preset("SiT-XL/1", 16, 128, 16, "-flux2"),
    "tiny-cpu": _tiny_cpu,
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ---- applying files and overrides ----------------------------------------------------------------


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, kind: type, value):
    """A value from a file (already typed) or the command line (a string) as the field's type."""
    if isinstance(kind, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
        try:
            number = kind(value) if not isinstance(value, str) or kind is float else int(value.replace("_", ""))
        except (TypeError, ValueError):
            pass
        else:
            if kind is int and isinstance(value, float) and value != number:
                raise ConfigError(f"{key}: expected an integer, got {value!r}")
            return number
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def apply(config, values: dict, prefix: str = "") -> None:
    """Set nested fields from a (nested) dict; unknown keys raise listing the valid ones."""
    types_ = _field_types(type(config))
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(types_)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} is a section; set its keys ({where}.<key>=...)")
            apply(current, value, f"{where}.")
        else:
            setattr(config, key, _coerce(where, types_[key], value))


def parse_override(text: str) -> dict:
    """'optim.lr=2e-4' -> {"optim": {"lr": "2e-4"}}."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. optim.lr=2e-4)")
    out: dict = {}
    node = out
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def read_config_file(path: str) -> dict:
    """A JSON config file: an object of sections (as config.json of a run directory)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the config file must hold a JSON object")
    return values


def resolve(preset_name: str, config_file: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Preset, then file, then overrides; validated."""
    config = preset(preset_name)
    if config_file:
        apply(config, read_config_file(config_file))
    for text in overrides:
        apply(config, parse_override(text))
    return config.validate()


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a saved config.json's dict (defaults for missing keys)."""
    config = TrainConfig()
    apply(config, values)
    return config.validate()
