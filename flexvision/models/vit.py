"""Vision Transformer family: ViT (Dosovitskiy et al. 2021), DeiT (Touvron et al. 2021) and
FlexiViT (Beyer et al. 2023), in one linen module that runs at any resolution and patch size.

    >>> import flexvision
    >>> model = flexvision.create_model("flexivit_small", num_classes=10)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 240, 240, 3)))
    >>> logits = model.apply(variables, images)                   # base patch size (16)
    >>> logits = model.apply(variables, images, patch_size=30)    # PI-resized kernel, 8x8 grid

One patch-embedding kernel is stored at the base ``patch_size`` and PI-resized per call; one
position embedding is stored on ``posemb_grid`` and resampled to the token grid of each call.
``resize`` picks whose interpolation both resizes reproduce ('timm' or 'big_vision', see
flexvision/layers/flex.py).

Token layout: ``[cls] [dist] [reg_1 .. reg_R] patch tokens`` (timm's order). With
``posemb_prefix=True`` (timm's default) the position embedding has entries for the prefix tokens
and is added after they are concatenated; with ``posemb_prefix=False`` (timm ``no_embed_class``,
big_vision) it covers the patch grid only and is added before.

DeiT (``dist_token=True``): eval returns the mean of the class-token head and the distillation
head (timm's VisionTransformerDistilled); with ``train=True`` and ``distilled_training=True`` it
returns the pair ``(class_logits, distillation_logits)`` for the hard-distillation loss.

Registered variants (timm names) are listed at the bottom of this file, including two small
ones for CPU experiments, ``vit_micro`` and ``flexivit_micro`` (width 96, depth 4, 3 heads,
base patch 8 and a 6x6 position grid: sized for ~48 px images). big_vision's variant strings
("Ti/16", "S/16", "B/8", "L/16", "So400m/14", ...) resolve to the same module with big_vision's
semantics (see :func:`resolve_big_vision_variant`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexvision.layers.attention import MultiHeadSelfAttention, dot_product_attention
from flexvision.layers.common import dense, layer_norm, param_init
from flexvision.layers.drop import DropPath, drop_path_rates
from flexvision.layers.flex import RESIZE_METHODS, FlexiPatchEmbed, resample_posemb, to_pair
from flexvision.layers.mlp import Mlp, gelu_exact
from flexvision.registry import register_model, register_name_resolver

POOL_TYPES = ("tok", "gap", "max", "avgmax", "map", "prr", "none")
_TOKEN_AXES = ("batch", "tokens", "embed")


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (flax's ``nn.gelu`` default; big_vision's MlpBlock)."""
    return nn.gelu(x, approximate=True)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm's Block)."""

    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        y = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
        y = MultiHeadSelfAttention(self.num_heads, qkv_bias=self.qkv_bias,
                                   proj_dropout=self.dropout, dtype=self.dtype, name="attn")(
                                       y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
        y = Mlp(self.mlp_dim, activation=gelu_tanh if self.gelu_approximate else gelu_exact,
                dropout=self.dropout, dtype=self.dtype, name="mlp")(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        return nn.with_logical_constraint(x, _TOKEN_AXES)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAPHead; timm AttentionPoolLatent, same math).

    A learned probe attends over the tokens; then probe + mlp(norm(probe)). Parameter names
    follow timm: latent, q, kv, proj, norm, mlp.
    """

    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        latent = self.param("latent", param_init(nn.initializers.xavier_uniform(),
                                                 (None, None, "embed")), (1, 1, width), jnp.float32)
        probe = jnp.broadcast_to(latent.astype(x.dtype), (batch, 1, width))
        q = dense(width, axes=("embed", "mlp"), dtype=self.dtype, name="q")(probe)
        kv = dense(2 * width, axes=("embed", "mlp"), dtype=self.dtype, name="kv")(x)
        q = q.reshape(batch, 1, self.num_heads, head_dim)
        kv = kv.reshape(batch, tokens, 2, self.num_heads, head_dim)
        out = dot_product_attention(q, kv[:, :, 0], kv[:, :, 1]).reshape(batch, 1, width)
        out = dense(width, axes=("mlp", "embed"), dtype=self.dtype, name="proj")(out)
        y = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="norm")(out)
        out = out + Mlp(self.mlp_dim, activation=gelu_tanh if self.gelu_approximate else gelu_exact,
                        dtype=self.dtype, name="mlp")(y)
        return out[:, 0]


def prr_pool(tokens: jax.Array, num_heads: int, reduce: str) -> jax.Array:
    """Patch Representation Refinement pooling (timm layers/attention_pool.py AttentionPoolPrr,
    from "Locality-Attending Vision Transformer", ICLR 2026), without its optional norms.

    tokens (B, T, D) split into ``num_heads`` heads attend to themselves with no projections
    (q = k = v), then ``reduce`` 'tok' takes token 0 and 'gap' the mean over all T tokens.
    Returns (B, D).
    """
    batch, length, width = tokens.shape
    heads = tokens.reshape(batch, length, num_heads, width // num_heads)
    refined = dot_product_attention(heads, heads, heads).reshape(batch, length, width)
    return refined[:, 0] if reduce == "tok" else jnp.mean(refined, axis=1)


class VisionTransformer(nn.Module):
    """ViT / DeiT / FlexiViT with any input size and any (static) patch size per call.

    Fields:
      num_classes: classifier outputs; 0 = no head (``__call__`` returns pre-logits).
      patch_size: base patch size of the one stored kernel (pair).
      posemb_grid: grid (h, w) of the stored position embedding.
      width, depth, num_heads, mlp_dim: transformer size.
      pool_type: 'tok' (class token), 'gap' (mean of the tokens), 'max' (their maximum),
        'avgmax' ((mean + max) / 2), 'map' (attention pooling by a learned probe), 'prr'
        (parameter-free self-attention over every token, then the class token or the mean:
        timm's AttentionPoolPrr), 'none' (every token; the head is applied per token).
      pool_include_prefix: 'gap', 'max', 'avgmax' and 'map' pool the prefix tokens (class,
        distillation, registers) with the patch tokens; False (timm's default) pools the patch
        tokens only. 'tok', 'prr' and 'none' do not read it (timm: VisionTransformer.pool).
      class_token, dist_token, num_reg_tokens: prefix tokens (dist_token = DeiT).
      posemb_prefix: the position embedding has entries for the prefix tokens (timm default);
        False = timm ``no_embed_class`` / big_vision.
      resize: 'timm' or 'big_vision': whose interpolation PI-resize and posemb resampling
        reproduce.
      dynamic_img_pad: zero-pad images at the bottom/right to a multiple of the patch size
        (timm ``dynamic_img_pad``) instead of raising when the patch does not tile them.
      fc_norm: the final norm is applied after pooling (timm's default for 'gap', 'max' and
        'avgmax') instead of to every token before pooling (big_vision, timm 'token'/'map').
      gelu_approximate: tanh GELU (big_vision) instead of the exact erf GELU (timm).
      distilled_training: with dist_token, ``train=True`` returns (cls_logits, dist_logits).
    """

    num_classes: int = 1000
    patch_size: Sequence[int] = (16, 16)
    posemb_grid: Sequence[int] = (14, 14)
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None
    pool_type: str = "tok"
    pool_include_prefix: bool = False
    class_token: bool = True
    dist_token: bool = False
    num_reg_tokens: int = 0
    posemb_prefix: bool = True
    resize: str = "timm"
    dynamic_img_pad: bool = False
    in_chans: int = 3
    dropout: float = 0.0
    drop_path: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    fc_norm: bool = False
    gelu_approximate: bool = False
    head_zeroinit: bool = False
    distilled_training: bool = True
    dtype: Any = None

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class, distillation and register tokens."""
        return int(self.class_token) + int(self.dist_token) + self.num_reg_tokens

    def _check_config(self) -> None:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type={self.pool_type!r} is unknown; accepted: {POOL_TYPES}")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize={self.resize!r} is unknown; accepted: {RESIZE_METHODS}")
        if self.pool_type == "tok" and not self.class_token:
            raise ValueError("pool_type='tok' reads the class token: set class_token=True, or "
                             "pick pool_type 'gap', 'map' or 'none'")
        if self.dist_token and (not self.class_token or self.pool_type != "tok" or self.fc_norm):
            raise ValueError("dist_token=True (DeiT) needs class_token=True, pool_type='tok' and "
                             f"fc_norm=False; got class_token={self.class_token}, "
                             f"pool_type={self.pool_type!r}, fc_norm={self.fc_norm}")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.num_reg_tokens < 0:
            raise ValueError(f"num_reg_tokens must be >= 0, got {self.num_reg_tokens}")

    def _embed(self, images: jax.Array, patch_size, train: bool) -> tuple[jax.Array, jax.Array]:
        """Patch map (B, h, w, D) and the token sequence with prefix tokens and posembs added."""
        self._check_config()
        if not hasattr(images, "ndim") or images.ndim != 4 or images.shape[-1] != self.in_chans:
            raise ValueError(f"images must be NHWC with {self.in_chans} channels, i.e. shape "
                             f"(batch, height, width, {self.in_chans}); got "
                             f"{tuple(getattr(images, 'shape', ()))!r}")
        dtype = self.dtype or jnp.float32
        patch_map = FlexiPatchEmbed(self.width, to_pair(self.patch_size, "patch_size"),
                                    in_chans=self.in_chans, resize=self.resize,
                                    dynamic_img_pad=self.dynamic_img_pad, dtype=self.dtype,
                                    name="patch_embed")(images, patch_size)
        batch, grid_h, grid_w, _ = patch_map.shape
        tokens = patch_map.reshape(batch, grid_h * grid_w, self.width)

        prefix = []
        for name, count, std in (("cls_token", int(self.class_token), 1e-6),
                                 ("dist_token", int(self.dist_token), 0.02),
                                 ("reg_token", self.num_reg_tokens, 1e-6)):  # timm's inits
            if count:
                table = self.param(name, param_init(nn.initializers.normal(std),
                                                    (None, "tokens", "embed")),
                                   (1, count, self.width), jnp.float32)
                prefix.append(jnp.broadcast_to(table.astype(dtype), (batch, count, self.width)))

        old_grid = to_pair(self.posemb_grid, "posemb_grid")
        num_posemb_prefix = self.num_prefix_tokens if self.posemb_prefix else 0
        posemb = self.param("pos_embed", param_init(nn.initializers.normal(0.02),
                                                    (None, "tokens", "embed")),
                            (1, num_posemb_prefix + old_grid[0] * old_grid[1], self.width),
                            jnp.float32)
        posemb = resample_posemb(posemb, old_grid, (grid_h, grid_w), num_posemb_prefix,
                                 self.resize).astype(dtype)
        if self.posemb_prefix:
            tokens = jnp.concatenate(prefix + [tokens], axis=1) + posemb
        else:
            tokens = jnp.concatenate(prefix + [tokens + posemb], axis=1)
        tokens = nn.Dropout(self.dropout, deterministic=not train)(tokens)
        return patch_map, nn.with_logical_constraint(tokens, _TOKEN_AXES)

    def _encode(self, tokens: jax.Array, train: bool, out: dict | None = None) -> jax.Array:
        rates = drop_path_rates(self.drop_path, self.depth)
        for index in range(self.depth):
            tokens = EncoderBlock(self.num_heads, self.mlp_dim or 4 * self.width,
                                  qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps,
                                  gelu_approximate=self.gelu_approximate, dropout=self.dropout,
                                  drop_path=rates[index], dtype=self.dtype,
                                  name=f"blocks_{index}")(tokens, train=train)
            if out is not None:
                out[f"block{index}"] = tokens
        if not self.fc_norm:
            tokens = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="norm")(tokens)
        return tokens

    def _pool(self, tokens: jax.Array) -> jax.Array:
        """Pre-logits from the encoded tokens (B, prefix + h*w, D) according to ``pool_type``.

        timm vision_transformer.py VisionTransformer.pool / global_pool_nlc: the reductions and
        attention pooling see the patch tokens only unless ``pool_include_prefix``.
        """
        if self.pool_type == "tok":
            pooled = tokens[:, 0]
        elif self.pool_type == "none":
            pooled = tokens
        elif self.pool_type == "prr":
            pooled = prr_pool(tokens, self.num_heads, "tok" if self.class_token else "gap")
        else:
            if not self.pool_include_prefix:
                tokens = tokens[:, self.num_prefix_tokens:]
            if self.pool_type == "gap":
                pooled = jnp.mean(tokens, axis=1)
            elif self.pool_type == "max":
                pooled = jnp.max(tokens, axis=1)
            elif self.pool_type == "avgmax":
                pooled = 0.5 * (jnp.max(tokens, axis=1) + jnp.mean(tokens, axis=1))
            else:
                pooled = MAPHead(self.num_heads, self.mlp_dim or 4 * self.width,
                                 layer_norm_eps=self.layer_norm_eps,
                                 gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                                 name="attn_pool")(tokens)
        if self.fc_norm:
            pooled = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="fc_norm")(pooled)
        return pooled

    def _head(self, pre_logits: jax.Array, name: str) -> jax.Array:
        init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.xavier_uniform()
        return dense(self.num_classes, axes=("embed", "classes"), kernel_init=init,
                     dtype=self.dtype, name=name)(pre_logits)

    @nn.compact
    def _forward(self, images: jax.Array, patch_size, train: bool, with_head: bool
                 ) -> dict[str, Any]:
        """The one compact method: features, and with ``with_head`` the 'logits' entry."""
        out: dict[str, Any] = {}
        patch_map, tokens = self._embed(images, patch_size, train)
        out["patch_embed"], out["embedded"] = patch_map, tokens
        encoded = out["encoded"] = self._encode(tokens, train, out)
        batch, grid_h, grid_w, _ = patch_map.shape
        out["feature_map"] = encoded[:, self.num_prefix_tokens:].reshape(
            batch, grid_h, grid_w, self.width)
        pre_logits = out["pre_logits"] = self._pool(encoded)
        if not with_head:
            return out
        if self.num_classes <= 0:
            out["logits"] = pre_logits
            return out
        logits = self._head(pre_logits, "head")
        if self.dist_token:
            dist_logits = self._head(encoded[:, 1], "head_dist")
            if train and self.distilled_training:
                logits = (logits, dist_logits)
            else:
                logits = (logits + dist_logits) / 2
        out["logits"] = logits
        return out

    def features(self, images: jax.Array, *, patch_size: int | Sequence[int] | None = None,
                 train: bool = False) -> dict[str, jax.Array]:
        """Named intermediates: 'patch_embed' (B, h, w, D) map, 'embedded' tokens with posemb,
        'block0'..'block{depth-1}' tokens (B, prefix + h*w, D), 'encoded' (after the final norm,
        or before fc_norm), 'feature_map' (B, h, w, D) patch tokens of 'encoded', 'pre_logits'."""
        return self._forward(images, patch_size, train, with_head=False)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 patch_size: int | Sequence[int] | None = None):
        """Logits (B, num_classes), or pre-logits if num_classes == 0.

        ``patch_size``: None = the base patch size; an int or pair (static under jit) PI-resizes
        the stored kernel. DeiT in training returns (cls_logits, dist_logits), see module doc.
        """
        return self._forward(images, patch_size, train, with_head=True)["logits"]


# ---------------------------------------------------------------------------------------------
# Registered variants.

_SIZES = {  # name: (width, depth, heads); mlp_dim = 4 * width
    "micro": (96, 4, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def _register(name: str, size: str, patch: int, image: int, description: str, **extra) -> None:
    width, depth, heads = _SIZES[size]
    defaults = dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
                    patch_size=(patch, patch), posemb_grid=(image // patch, image // patch))
    defaults.update(extra)
    register_model(name, VisionTransformer, family="vit", description=description, **defaults)


for _size in ("tiny", "small", "base", "large"):
    for _image in (224, 384):
        _register(f"vit_{_size}_patch16_{_image}", _size, 16, _image,
                  f"ViT-{_size} /16 at {_image} px (timm)")
for _size in ("small", "base", "large"):
    _register(f"vit_{_size}_patch32_224", _size, 32, 224, f"ViT-{_size} /32 (timm)")
for _size in ("small", "base"):
    _register(f"vit_{_size}_patch8_224", _size, 8, 224, f"ViT-{_size} /8 (timm)")
_register("vit_huge_patch14_224", "huge", 14, 224, "ViT-H/14 (timm)")
_register("vit_small_patch16_224_gap", "small", 16, 224,
          "ViT-S/16 with global average pooling and fc_norm, no class token (timm 'avg')",
          pool_type="gap", class_token=False, fc_norm=True)
_register("vit_base_patch16_224_map", "base", 16, 224,
          "ViT-B/16 with attention pooling (MAP), no class token",
          pool_type="map", class_token=False)
_register("vit_small_patch16_224_reg4", "small", 16, 224,
          "ViT-S/16 with 4 register tokens (posemb on patches only)",
          num_reg_tokens=4, posemb_prefix=False)
_register("vit_micro", "micro", 8, 48,
          "micro ViT for CPU experiments: width 96, depth 4, 3 heads, patch 8, 6x6 posemb grid")

for _size in ("tiny", "small", "base"):
    _register(f"deit_{_size}_patch16_224", _size, 16, 224, f"DeiT-{_size} /16 (timm)")
    _register(f"deit_{_size}_distilled_patch16_224", _size, 16, 224,
              f"DeiT-{_size} /16 with distillation token (timm)", dist_token=True)
_register("deit_base_patch16_384", "base", 16, 384, "DeiT-base /16 at 384 px (timm)")
_register("deit_base_distilled_patch16_384", "base", 16, 384,
          "DeiT-base /16 at 384 px with distillation token (timm)", dist_token=True)

for _size in ("small", "base", "large"):
    _register(f"flexivit_{_size}", _size, 16, 240,
              f"FlexiViT-{_size}: kernel at patch 16, 15x15 posemb without a cls entry (timm)",
              posemb_prefix=False)
_register("flexivit_micro", "micro", 8, 48,
          "micro FlexiViT for CPU experiments: width 96, depth 4, 3 heads, base patch 8, 6x6 "
          "posemb grid without a cls entry (timm semantics)", posemb_prefix=False)


_BIG_VISION_SIZES = {  # big_vision vit.py decode_variant: width, depth, mlp_dim, heads
    "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}
_BIG_VISION_VARIANT = re.compile(r"^(?P<size>[A-Za-z0-9]+)/(?P<patch>\d+)$")


def resolve_big_vision_variant(name: str) -> tuple[str, dict[str, Any]] | None:
    """big_vision variant strings ("S/16", "B/8", "So400m/14") -> registered name + overrides.

    The model gets big_vision's defaults: 'gap' pooling without a class token, posemb on
    patches only (a 224 // patch grid), tanh GELU, zero-initialised head, big_vision resizing.
    Override ``pool_type="tok", class_token=True`` for FlexiViT-style class-token models.
    """
    match = _BIG_VISION_VARIANT.match(name)
    if not match or match["size"] not in _BIG_VISION_SIZES:
        return None
    width, depth, mlp_dim, heads = _BIG_VISION_SIZES[match["size"]]
    patch = int(match["patch"])
    return "vit_base_patch16_224", dict(
        width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=(patch, patch),
        posemb_grid=(224 // patch, 224 // patch), pool_type="gap", class_token=False,
        posemb_prefix=False, gelu_approximate=True, head_zeroinit=True, resize="big_vision")


register_name_resolver(resolve_big_vision_variant)
