"""SiT: the DiT transformer used as an interpolant model (Ma et al. 2024; Peebles & Xie 2023).

Pure model code: nothing here knows about torch.distributed, fsspec or Ray. Parameter names are
the released SiT/DiT ones, so released state dicts load unchanged (see `checkpoint_import`).

Time convention (as in the released code): t = 0 is pure noise, t = 1 is data; the raw t in
[0, 1] goes into the timestep embedding (not t * 1000).

Block options (`SiTConfig`; the released DiT block is the default and its parameter names are
unchanged): a SwiGLU MLP, RMSNorm in place of LayerNorm, 2-D axial RoPE on the patch grid and
qk-norm, the modern choices of LightningDiT (Yao et al. 2025) and others.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 1000  # ImageNet; the null (unconditional) class is index `num_classes`
LABEL_DROPOUT = 0.1  # probability of replacing a label by the null class in training
TIME_FREQUENCIES = 256  # width of the sinusoidal timestep embedding
ROPE_THETA = 10000.0  # base of the RoPE frequencies
NORM_EPS = 1e-6  # epsilon of every normalisation in the model


class MlpKind(str, Enum):
    GELU = "gelu"  # released: fc2(gelu_tanh(fc1 x)), hidden mlp_ratio * D
    SWIGLU = "swiglu"  # fc2(silu(a) * b), (a, b) = fc1 x, hidden 2/3 * mlp_ratio * D (same parameter count)


class NormKind(str, Enum):
    LAYERNORM = "layernorm"  # released: (x - mean) / sqrt(var + eps)
    RMSNORM = "rmsnorm"  # x / sqrt(mean(x^2) + eps)


@dataclass(frozen=True)
class SiTConfig:
    """Architecture of one SiT model."""

    depth: int  # number of transformer blocks
    hidden_size: int  # token width D
    num_heads: int  # attention heads (D must divide evenly)
    patch_size: int  # side of the square latent patch turned into one token
    input_size: int = 32  # latent side the frozen positions are built for (32 at 256 px)
    in_channels: int = 4  # latent channels (SD VAE: 4)
    num_classes: int = NUM_CLASSES  # class count; index num_classes is the null class
    class_dropout_prob: float = LABEL_DROPOUT  # label dropout in training (for CFG)
    learn_sigma: bool = True  # 2x output channels as the released checkpoints; only the first half is used
    mlp_ratio: float = 4.0  # MLP hidden width / D
    mlp: MlpKind = MlpKind.GELU  # MLP of each block: gelu (released) or swiglu
    norm: NormKind = NormKind.LAYERNORM  # the blocks' and final layer's norms: layernorm (released) or rmsnorm
    rope: bool = False  # 2-D axial rotary positions on q and k (added to the released absolute positions)
    qk_norm: bool = False  # RMSNorm of q and k per head (learned scale) before attention

    def __post_init__(self) -> None:
        # enums from a saved export's JSON arrive as their strings; the values are exact (no user parsing)
        object.__setattr__(self, "mlp", MlpKind(self.mlp))
        object.__setattr__(self, "norm", NormKind(self.norm))


# (depth, hidden, heads) per size, DESIGN.md section 2.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SIT_MODELS = [f"SiT-{s}/{p}" for s in _SIZES for p in (1, 2, 4, 8)]  # /1: one token per latent (RAE, FLUX.2)


def sit_config(name: str, **overrides) -> SiTConfig:
    """Config of a named model, e.g. ``sit_config("SiT-XL/2", input_size=64)``."""
    if name not in SIT_MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(SIT_MODELS)}")
    size, patch = name.removeprefix("SiT-").split("/")
    depth, hidden, heads = _SIZES[size]
    return SiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch), **overrides)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (B, T, D); shift, scale: (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Frozen 2-D sin-cos positions (T, dim), T = grid_h * grid_w, row-major.

    As in the released code (MAE): the first dim/2 channels encode the column index, the last
    dim/2 the row index; each half is [sin(pos * omega), cos(pos * omega)].
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega  # (T, D/4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()


def make_norm(kind: NormKind, dim: int) -> nn.Module:
    """The block norm without affine parameters (adaLN supplies scale and shift)."""
    if kind is NormKind.RMSNORM:
        return nn.RMSNorm(dim, eps=NORM_EPS, elementwise_affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)


def rope_angles_2d(head_dim: int, grid_h: int, grid_w: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """(T, head_dim / 2) rotation angles of 2-D axial RoPE, T = grid_h * grid_w row-major.

    The first head_dim/4 channel pairs rotate by the row index, the last head_dim/4 by the column
    index, with frequencies theta^(-k / (head_dim / 4)), k = 0 .. head_dim/4 - 1 (RoFormer, Su et
    al. 2021, eq. 15, applied per axis as in EVA-02 / LightningDiT).
    """
    if head_dim % 4:
        raise ValueError(f"head size {head_dim} must be divisible by 4 for 2-D RoPE")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (hd/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    return torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of x (B, heads, T, hd) by angles (T, hd / 2)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]  # (B, heads, T, hd/2)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with non-overlapping p x p patches."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] -> (B, D): 256 sinusoidal frequencies [cos, sin], then an MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = TIME_FREQUENCIES):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (B, D); row `num_classes` of the table is the null class."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=NORM_EPS) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=NORM_EPS) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D); rope: (T, head_dim / 2) angles or None
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Released MLP: fc2(gelu_tanh(fc1 x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020): fc2(silu(a) * b) with (a, b) = fc1(x) split in halves.

    ``hidden`` is the released MLP's width; the gated width is 2/3 of it, so the parameter count
    matches the GELU MLP's (as LLaMA and LightningDiT do).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        gated = int(2 * hidden / 3)
        self.fc1 = nn.Linear(dim, 2 * gated)
        self.fc2 = nn.Linear(gated, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (the released DiT block with the defaults)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        mlp: MlpKind = MlpKind.GELU,
        norm: NormKind = NormKind.LAYERNORM,
        qk_norm: bool = False,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = make_norm(norm, hidden_size)
        mlp_class = SwiGLU if mlp is MlpKind.SWIGLU else Mlp
        self.mlp = mlp_class(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, T, D); c: (B, D); rope: (T, head_dim / 2) or None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: NormKind = NormKind.LAYERNORM):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """SiT backbone: (x_t, t, y) -> model output with `in_channels` channels.

    With ``learn_sigma`` the last layer has 2x channels (as released checkpoints) and forward
    returns the first half, exactly like the released model.
    """

    def __init__(self, config: SiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.out_channels = c.in_channels * 2 if c.learn_sigma else c.in_channels
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        grid = c.input_size // c.patch_size
        # Frozen positions: a buffer (never trained), saved in the state dict under the released name.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(c.hidden_size, grid, grid)[None])
        self.blocks = nn.ModuleList(
            SiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.mlp, c.norm, c.qk_norm) for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels, c.norm)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Released initialisation: xavier linears, adaLN-Zero, zero output layer.

        Also (re)computes the frozen positions, so a model built on the meta device and moved
        with ``to_empty`` is complete after calling this.
        """
        c = self.config
        grid = c.input_size // c.patch_size
        self.pos_embed.copy_(sincos_pos_embed_2d(c.hidden_size, grid, grid)[None])
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm) and module.weight is not None:  # qk-norm scales
                nn.init.ones_(module.weight)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, T, D) positions: the stored table for the built grid, computed for any other."""
        built = self.config.input_size // self.config.patch_size
        if grid_h == grid_w == built:
            return self.pos_embed
        return sincos_pos_embed_2d(self.config.hidden_size, grid_h, grid_w)[None].to(self.pos_embed)

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        # (B, T, p*p*C) -> (B, C, H, W)
        p, c = self.config.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        label_generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W) latents at time t: (B,) in [0, 1]; y: (B,) labels (num_classes = null).

        In training mode labels are dropped with ``class_dropout_prob``; pass
        ``label_generator`` to make that draw deterministic.
        """
        p = self.config.patch_size
        grid_h, grid_w = x.shape[-2] // p, x.shape[-1] // p
        if grid_h * p != x.shape[-2] or grid_w * p != x.shape[-1]:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by patch size {p}")
        h = self.x_embedder(x) + self.positions(grid_h, grid_w)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, label_generator)  # (B, D)
        rope = None
        if self.config.rope:
            rope = rope_angles_2d(self.config.hidden_size // self.config.num_heads, grid_h, grid_w).to(x.device)
        for block in self.blocks:
            h = block(h, c) if rope is None else block(h, c, rope)
        out = self.unpatchify(self.final_layer(h, c), grid_h, grid_w)  # (B, out_channels, H, W)
        if self.config.learn_sigma:
            out = out[:, : self.config.in_channels]
        return out


def build_model(name: str, device: torch.device | str | None = None, **overrides) -> SiT:
    """Build a named model, e.g. ``build_model("SiT-XL/2", input_size=32)``.

    ``device="meta"`` allocates nothing (for parameter counting or FSDP's deferred init).
    """
    with torch.device(device) if device is not None else nullcontext():
        return SiT(sit_config(name, **overrides))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gmac(config: SiTConfig) -> float:
    """GMAC (multiply-adds / 1e9) of one forward pass for one image at ``config.input_size``,
    counted by `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions,
    attention; not the elementwise ops) on meta tensors: nothing is allocated. The blocks are
    identical, so models of depth 1 and 2 are counted and the difference scaled to the depth."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(depth: int) -> float:
        with torch.device("meta"):
            model = SiT(dataclasses.replace(config, depth=depth)).eval()
            x = torch.empty(1, config.in_channels, config.input_size, config.input_size)
            t, y = torch.empty(1), torch.zeros(1, dtype=torch.long)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(x, t, y)
        return counter.get_total_flops() / 2e9

    one, two = count(1), count(2)
    return one + (config.depth - 1) * (two - one)
