"""Autoencoders and the latent transform: the one owner of what a stored latent means.

Below pipeline/ (encoding), trainer/ (training, previews) and sampling/ (decoding), this module
holds every autoencoder fact: loading (offline only), compute dtype, downsampling factor, latent
shapes, `encode` -> what a dataset stores, and the transform between stored latents and the
space the SiT model works in:

    image --encode--> stored --sample--> z --to_model--> model space --to_decode--> z --decode--> image

The family is chosen from the saved config's ``_class_name`` (diffusers 0.42):

=====================  ============================  ==========================  =====================================
class                  e.g.                          stored per image            to_model(z)
=====================  ============================  ==========================  =====================================
AutoencoderKL          SD 1.x/2.x, SDXL, SD3, FLUX.1  posterior mean, std         scale * (z - shift); shift_factor or 0
AutoencoderKLFlux2     FLUX.2 (32 ch, /8)            posterior mean, std         2x2 patchify (128 ch, /16), then
                                                                                 (z - bn_mean) / sqrt(bn_var + eps)
AutoencoderDC          DC-AE (f32c32, ...)           the latent (deterministic)  scale * z
AutoencoderRAE         RAE (DINOv2/SigLIP2/MAE)      the latent (deterministic)  z (encode already normalises it with
                                                                                 latents_mean/std and scaling_factor)
=====================  ============================  ==========================  =====================================

`LatentTransform` is that map as data (patch side, per-channel or scalar shift and scale); it is
written into the dataset card (the autoencoder's own transform) and into the export (the one the
model was trained in: the autoencoder's, or ``dataset``: (z - mean_c) / std_c from the card's
statistics). Its inverse `to_decode` is exact up to float32 rounding. Images are in [-1, 1] on
both sides of `Autoencoder` (RAE's own [0, 1] range is converted here).

torch and diffusers are imported where used: the CLI and the card parser import this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
VAE_CHOICES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
VAE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtype names; never fp16: it overflows on some images
SD_VAE_CLASS = "AutoencoderKL"  # what released SiT/DiT .pt files were trained on (the SD VAE)


class AutoencoderError(ValueError):
    """An autoencoder that cannot be used as asked; the message names the flag or file."""


class AutoencoderNotFoundError(AutoencoderError, FileNotFoundError):
    """The autoencoder's files are not available locally; the message says what to pass."""


class Family(Enum):
    """The autoencoder classes this module knows, by their diffusers class name."""

    KL = "AutoencoderKL"
    KL_FLUX2 = "AutoencoderKLFlux2"
    DC = "AutoencoderDC"
    RAE = "AutoencoderRAE"

    @property
    def gaussian(self) -> bool:
        """A Gaussian posterior (mean and std are stored); else a deterministic latent."""
        return self in (Family.KL, Family.KL_FLUX2)


class LatentNorm(Enum):
    """Which transform a model trains in: the autoencoder's own, or per-channel dataset statistics."""

    VAE = "vae"
    DATASET = "dataset"


def parse_family(name: str, where: str) -> Family:
    try:
        return Family(name)
    except ValueError:
        valid = ", ".join(f.value for f in Family)
        raise AutoencoderError(f"{where}: autoencoder class {name!r} is not supported; valid: {valid}") from None


def vae_dtype(name: str) -> torch.dtype:
    import torch

    if name not in VAE_DTYPES:
        raise ValueError(f"unknown VAE dtype {name!r}; valid: {', '.join(VAE_DTYPES)} (fp16 overflows, never used)")
    return getattr(torch, VAE_DTYPES[name])


# ---- the transform (pure math) --------------------------------------------------------------------


def _vector(v) -> float | tuple[float, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(float(x) for x in v)
    return float(v)


@dataclass(frozen=True)
class LatentTransform:
    """stored z (B, C, H, W) -> model space (B, C p^2, H/p, W/p): patchify, subtract shift, times scale.

    ``shift`` and ``scale`` are one number or one per model channel. Trivial steps are skipped, so
    the SD transform is exactly ``z * scale`` and its inverse ``x / scale`` (bitwise as before).
    """

    patch: int = 1  # p x p space-to-channel (FLUX.2: 2), channel index c * p^2 + i * p + j
    shift: float | tuple[float, ...] = 0.0
    scale: float | tuple[float, ...] = 1.0
    norm: str = LatentNorm.VAE.value  # "vae" (the autoencoder's own) or "dataset" (card statistics)

    def __post_init__(self):
        object.__setattr__(self, "shift", _vector(self.shift))
        object.__setattr__(self, "scale", _vector(self.scale))
        if not (isinstance(self.patch, int) and self.patch >= 1):
            raise ValueError(f"transform patch must be a positive integer, not {self.patch!r}")
        LatentNorm(self.norm)
        values = [*(self.shift if isinstance(self.shift, tuple) else [self.shift])]
        scales = [*(self.scale if isinstance(self.scale, tuple) else [self.scale])]
        if not all(math.isfinite(v) for v in values) or not all(math.isfinite(s) and s > 0 for s in scales):
            raise ValueError(f"transform shift must be finite and scale finite and > 0: {self.shift}, {self.scale}")

    @classmethod
    def from_dict(cls, d: dict) -> LatentTransform:
        if not isinstance(d, dict) or set(d) - {"patch", "shift", "scale", "norm"}:
            raise ValueError(f"a transform is an object of patch, shift, scale, norm; not {d!r}")
        for k in ("shift", "scale"):
            v = d.get(k, 0.0)
            if not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v if isinstance(v, list) else [v])
            ):
                raise ValueError(f"bad transform {d!r}: {k} must be a number or a list of numbers")
        try:
            return cls(**d)
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad transform {d!r}: {err}") from None

    def to_dict(self) -> dict:
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        return {"patch": self.patch, "shift": plain(self.shift), "scale": plain(self.scale), "norm": self.norm}

    def describe(self) -> str:
        def short(v):
            return f"{len(v)} per-channel values" if isinstance(v, tuple) else f"{v:g}"

        patch = f"{self.patch}x{self.patch} patchify, " if self.patch > 1 else ""
        z = "z" if self.shift == 0.0 else f"(z - {short(self.shift)})"
        return f"{patch}{z} * {short(self.scale)} [{self.norm}]"

    def model_shape(self, stored_shape) -> tuple[int, int, int]:
        """(C, H, W) stored -> (C p^2, H/p, W/p) in model space."""
        c, h, w = (int(s) for s in stored_shape)
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"latent side {h}x{w} is not a multiple of the transform's patch {p}")
        return (c * p * p, h // p, w // p)

    def _param(self, v, x):
        if isinstance(v, tuple):
            import torch

            if len(v) != x.shape[1]:
                raise ValueError(f"transform has {len(v)} channel values, the latents {x.shape[1]} channels")
            return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return v

    def to_model(self, z: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """Stored (sampled) latents (B, C, H, W) -> model space; ``inplace`` may reuse ``z``'s memory."""
        if self.patch > 1:
            z, inplace = patchify(z, self.patch), False
        if self.shift != 0.0:
            z = z.sub_(self._param(self.shift, z)) if inplace else z - self._param(self.shift, z)
            inplace = True
        if self.scale != 1.0:
            z = z.mul_(self._param(self.scale, z)) if inplace else z * self._param(self.scale, z)
        return z

    def to_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> what the autoencoder's decode takes (the exact inverse of `to_model`)."""
        if self.scale != 1.0:
            x = x / self._param(self.scale, x)
        if self.shift != 0.0:
            x = x + self._param(self.shift, x)
        if self.patch > 1:
            x = unpatchify(x, self.patch)
        return x


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C p^2, H/p, W/p), channel c * p^2 + i * p + j (FLUX.2's layout)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, c, h, w = x.shape
    return x.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


def dataset_transform(own: LatentTransform, channel_mean, channel_std) -> LatentTransform:
    """(patchify(z) - mean_c) / std_c with per stored-channel statistics (LightningDiT's normalisation)."""
    reps = own.patch * own.patch
    if any(s <= 0 for s in channel_std):
        raise ValueError(f"a channel has std 0 in the dataset statistics: {list(channel_std)}")
    shift = tuple(float(m) for m in channel_mean for _ in range(reps))
    scale = tuple(1.0 / float(s) for s in channel_std for _ in range(reps))
    return LatentTransform(own.patch, shift, scale, LatentNorm.DATASET.value)


# ---- identity -----------------------------------------------------------------------------------


def config_sha256(config: dict) -> str:
    """sha256 of the config's canonical JSON, without diffusers' bookkeeping keys (``_name_or_path``, ...)."""
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def describe_identity(identity: dict) -> str:
    return f"{identity.get('class')} config {str(identity.get('config_sha256', ''))[:12] or '?'}"


# ---- the autoencoder ----------------------------------------------------------------------------


def read_config(name_or_path: str) -> dict:
    """The saved config.json of a local directory or a cached hub id; nothing is downloaded."""
    from diffusers import AutoencoderKL  # any model class reads config.json the same way

    try:
        config = AutoencoderKL.load_config(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        if os.path.isdir(name_or_path):
            where = "the directory"
        elif name_or_path.startswith(("/", ".", "~")):
            where = "that path (no such directory)"
        else:
            where = "the local Hugging Face cache"
        raise AutoencoderNotFoundError(
            f"VAE {name_or_path!r}: no config in {where} ({type(err).__name__}). Nothing is downloaded at run "
            f"time: pass --vae a directory saved with save_pretrained (e.g. after "
            f"`hf download {DEFAULT_VAE} --local-dir sd-vae-ft-ema` on a machine with network), "
            f"or pre-fill the hub cache (HF_HOME)."
        ) from None
    return dict(config)


class Autoencoder:
    """A diffusers autoencoder in eval mode with its facts: family, identity, shapes, own transform."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name
        self.config = dict(module.config)
        self.family = parse_family(type(module).__name__, name)

    @property
    def identity(self) -> dict:
        """What the dataset card and the export record: class, config hash and the name it was loaded by."""
        return {"class": self.family.value, "config_sha256": config_sha256(self.config), "name": self.name}

    @property
    def stored_kind(self) -> str:
        return "posterior" if self.family.gaussian else "latent"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def downsampling(self) -> int:
        """Pixels per stored latent side (8 for the SD VAE; RAE: its decoder's patch)."""
        c = self.config
        if self.family in (Family.KL, Family.KL_FLUX2):
            return 2 ** (len(c["block_out_channels"]) - 1)
        if self.family is Family.DC:
            return 2 ** (len(c["encoder_block_out_channels"]) - 1)
        return int(c["patch_size"])

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """Stored (C, H, W) for images of side ``resolution``; ValueError naming both when it cannot be."""
        c, f = self.config, self.downsampling
        if self.family is Family.RAE:
            grid = int(c["encoder_input_size"]) // int(c["encoder_patch_size"])
            if resolution != grid * f:
                raise ValueError(f"an RAE with this config encodes and decodes {grid * f} px images, not {resolution}")
            return (int(c["encoder_hidden_size"]), grid, grid)
        if resolution % f:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {f}")
        return (int(c["latent_channels"]), resolution // f, resolution // f)

    def own_transform(self) -> LatentTransform:
        """The autoencoder's own stored -> model transform (see the table above)."""
        c = self.config
        if self.family is Family.KL:
            return LatentTransform(1, float(c.get("shift_factor") or 0.0), float(c.get("scaling_factor") or 1.0))
        if self.family is Family.DC:
            return LatentTransform(1, 0.0, float(c.get("scaling_factor") or 1.0))
        if self.family is Family.KL_FLUX2:
            bn = self.module.bn
            mean = bn.running_mean.double()
            std = (bn.running_var.double() + float(c["batch_norm_eps"])).sqrt()
            p = int(c["patch_size"][0]) if isinstance(c["patch_size"], (list, tuple)) else int(c["patch_size"])
            return LatentTransform(p, tuple(mean.tolist()), tuple((1.0 / std).tolist()))
        return LatentTransform()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, 3, H, W) in [-1, 1] -> (posterior mean, std) or (latent, None), in the module's dtype."""
        x = x.to(self.dtype)
        if self.family.gaussian:
            posterior = self.module.encode(x).latent_dist
            return posterior.mean, posterior.std
        if self.family is Family.RAE:
            x = (x + 1) / 2  # RAE normalises [0, 1] images with ImageNet statistics itself
        return self.module.encode(x).latent, None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode input (what `LatentTransform.to_decode` gives) -> images in [-1, 1] (float32 or module dtype)."""
        images = self.module.decode(z.to(device=self.device, dtype=self.dtype)).sample
        if self.family is Family.RAE:
            images = images * 2 - 1
        return images

    def decode_to_uint8(self, latents, transform: LatentTransform):
        """Model-space latents (N, C, h, w) -> uint8 images (N, H, W, 3) with the ADM rounding."""
        import torch

        with torch.no_grad():
            z = transform.to_decode(latents).to(device=self.device, dtype=self.dtype)
            images = self.decode(z)
        return to_uint8(images)


def to_uint8(images: torch.Tensor):
    """Images in [-1, 1], (N, 3, H, W) -> uint8 (N, H, W, 3): ``clamp((x + 1) * 127.5 + 0.5)`` truncated."""
    import torch

    x = (images.float() + 1) * 127.5 + 0.5
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def load_autoencoder(name_or_path: str, dtype: torch.dtype | None = None, device="cpu") -> Autoencoder:
    """The autoencoder saved at ``name_or_path`` (local directory or cached hub id), by its ``_class_name``."""
    import diffusers
    import torch

    config = read_config(name_or_path)
    family = parse_family(str(config.get("_class_name")), f"{name_or_path}/config.json")
    try:
        module = getattr(diffusers, family.value).from_pretrained(
            name_or_path, local_files_only=True, torch_dtype=dtype or torch.float32, low_cpu_mem_usage=False
        )
    except ImportError as err:  # AutoencoderRAE needs transformers
        raise AutoencoderError(
            f"VAE {name_or_path!r} ({family.value}) needs an optional package: {err} (pip install 'sit-pipeline[rae]')"
        ) from None
    except (OSError, ValueError) as err:
        raise AutoencoderNotFoundError(f"VAE {name_or_path!r}: cannot load its weights ({err})") from None
    module.requires_grad_(False)
    return Autoencoder(module.to(device=device).eval(), name_or_path)  # already in dtype


def check_identity(recorded: dict | None, ae: Autoencoder, what: str, flag: str = "--vae") -> None:
    """Refuse ``ae`` when ``recorded`` (an export's or card's autoencoder) names another one."""
    if not recorded:
        return
    mine = ae.identity
    if recorded.get("class") in ("", mine["class"]) and recorded.get("config_sha256") in ("", mine["config_sha256"]):
        return  # "" : not recorded (version-1 cards and test datasets)
    raise AutoencoderMismatchError(
        f"{flag} {ae.name} is {describe_identity(mine)}, but {what} was made with {recorded.get('name')!r} "
        f"({describe_identity(recorded)}): pass that autoencoder (or --allow-vae-mismatch to decode anyway)"
    )


class AutoencoderMismatchError(AutoencoderError):
    """An autoencoder other than the one a dataset or model was made with."""
