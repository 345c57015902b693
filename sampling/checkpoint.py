"""Load the model to sample from, and check it against the VAE and the image size.

Two kinds of checkpoint, any fsspec URL:

* our EMA export (`trainer.export`: safetensors with the model config in its metadata);
* a released SiT/DiT ``.pt`` (a plain state dict or a training checkpoint with an ``ema``
  entry). Its architecture is read from the weights' shapes (depth, width, patch, channels,
  classes, latent size); the head count is not in the weights: it comes from ``--model NAME``
  (a preset, checked against the weights) or ``--num-heads``.

The export is the one record of the autoencoder a model was trained on (class, config hash) and
of the latent transform it was trained in (`latents.autoencoder.LatentTransform`): `sit sample`
decodes with exactly that transform, and refuses a ``--vae`` of another identity, naming both
(``--allow-vae-mismatch`` decodes anyway). Exports written before the transform was recorded hold
the SD scaling factor; released .pt files assume the SD VAE: the ``--vae``'s own transform.

The model must fit the autoencoder: its latent shape equals the transform's model shape of the
autoencoder's latents at the image size. A mismatch is refused naming both shapes.
"""

from __future__ import annotations

import hashlib
import io

import fsspec
import torch

from latents.autoencoder import (
    Autoencoder,
    AutoencoderMismatchError,
    LatentNorm,
    LatentTransform,
    check_identity,
)
from trainer.checkpoint_import import load_error, load_released, read_released_state_dict
from trainer.export import looks_like_safetensors, read_export
from trainer.model import SiT, SiTConfig, sit_config

_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}  # the presets' (hidden -> heads)


class CheckpointError(ValueError):
    """A checkpoint that cannot be sampled from as asked; the message names the file and values."""


def read_bytes(url: str) -> bytes:
    """The whole file at ``url``; `FileNotFoundError` naming it when missing."""
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {url}") from None


def infer_config(state: dict[str, torch.Tensor], num_heads: int) -> SiTConfig:
    """The SiT architecture of a released state dict (heads given: they leave no trace in weights)."""
    try:
        proj = state["x_embedder.proj.weight"]  # (D, C, p, p)
        hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
        table = state["y_embedder.embedding_table.weight"]  # (classes + 1, D) with a null class
        tokens = state["pos_embed"].shape[1]
        out = state["final_layer.linear.weight"].shape[0]
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a SiT/DiT state dict: no {err.args[0]!r}") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = round(tokens**0.5)
    return SiTConfig(
        depth=depth,
        hidden_size=hidden,
        num_heads=num_heads,
        patch_size=patch,
        input_size=grid * patch,
        in_channels=in_channels,
        num_classes=table.shape[0] - 1,
        learn_sigma=out == patch * patch * in_channels * 2,
        mlp_ratio=mlp / hidden,
    )


def load_checkpoint(
    url: str, model_name: str | None = None, num_heads: int | None = None
) -> tuple[SiT, str, dict | None]:
    """(model in eval mode on CPU, sha256 of the file, the export's ``extra``) of a checkpoint.

    ``extra`` holds the training transport and the autoencoder record (None for released files).
    """
    data = read_bytes(url)
    digest = hashlib.sha256(data).hexdigest()
    if looks_like_safetensors(url, data):  # read_export names any damage; never handed to torch.load
        config, state, extra = read_export(url)  # reads the file again: it parses the metadata itself
        if model_name is not None:
            _check_preset(url, model_name, config)
        model = SiT(config)
        model.load_state_dict(state, strict=True)
        return model.eval(), digest, extra
    try:
        state = read_released_state_dict(io.BytesIO(data))
    except Exception as err:  # torch.load's errors for a non-checkpoint vary by version
        raise CheckpointError(f"{url}: neither a SiT export nor a torch checkpoint ({load_error(err)})") from None
    width = state["x_embedder.proj.weight"].shape[0] if "x_embedder.proj.weight" in state else None
    if model_name is not None:
        heads = sit_config(model_name).num_heads
    elif num_heads is not None:
        heads = num_heads
    elif width in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[width]
    else:
        raise CheckpointError(
            f"{url}: hidden size {width} matches no preset; pass --num-heads (heads are not stored in the weights)"
        )
    try:
        config = infer_config(state, heads)
    except CheckpointError as err:
        raise CheckpointError(f"{url}: {err}") from None
    if model_name is not None:
        _check_preset(url, model_name, config)
    model = load_released(SiT(config), state)
    return model.eval(), digest, None


def _check_preset(url: str, name: str, config: SiTConfig) -> None:
    preset = sit_config(name)
    for field in ("depth", "hidden_size", "num_heads", "patch_size"):
        want, got = getattr(preset, field), getattr(config, field)
        if want != got:
            raise CheckpointError(f"{url}: --model {name} has {field} {want}, the checkpoint {got}")


def decode_transform(extra: dict | None, ae: Autoencoder, url: str, allow_mismatch: bool = False) -> LatentTransform:
    """The model -> decode transform for ``ae`` as the checkpoint records it; refuses another autoencoder."""
    if extra is None:  # a released SiT/DiT .pt: trained on the SD VAE, decoded with --vae's own scale
        return ae.own_transform()
    recorded = extra.get("autoencoder")
    if "latent_transform" not in extra:  # an export written before the autoencoder was recorded: SD VAE latents
        if "scaling_factor" not in extra:
            return ae.own_transform()
        return LatentTransform(scale=float(extra["scaling_factor"]))
    transform = LatentTransform.from_dict(extra["latent_transform"])
    if not allow_mismatch:
        check_identity(recorded, ae, url)
        own = ae.own_transform()
        if transform.norm == LatentNorm.VAE.value and transform != own:  # same config, other weights (FLUX.2 BN)
            raise AutoencoderMismatchError(
                f"--vae {ae.name}'s own latent transform ({own.describe()}) differs from the one {url} was trained "
                f"in ({transform.describe()}): pass the autoencoder it names (or --allow-vae-mismatch)"
            )
    return transform


def check_fits_autoencoder(
    model: SiT, ae: Autoencoder, transform: LatentTransform, image_size: int | None, url: str
) -> int:
    """The image size to sample at; `CheckpointError` naming both shapes when the model does not fit."""
    c = model.config
    pixels = ae.downsampling * transform.patch  # image pixels per model-latent side
    size = c.input_size * pixels if image_size is None else image_size
    try:
        want = transform.model_shape(ae.latent_shape(size))
    except ValueError as err:
        raise CheckpointError(f"{url}: with the VAE {ae.name}: {err}") from None
    have = (c.in_channels, c.input_size, c.input_size)
    if have != want:
        raise CheckpointError(
            f"{url}: the model's latent shape (C, H, W) is {have}, the VAE {ae.name} ({ae.family.value}) gives "
            f"{want} at {size} px" + ("" if image_size is None else " (--image-size)")
        )
    return size
