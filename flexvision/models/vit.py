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

import collections
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
from flexvision.models.contract import Backbone, FeatureInfo
from flexvision.registry import register_model, register_name_resolver

GLOBAL_POOLS = ("token", "avg", "max", "avgmax", "map", "prr", "none")
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
    scan_output: bool = False  # return (x, x or None) as the body of nn.scan (VisionTransformer)
    collect: bool = False  # with scan_output: also return x as the per-layer output

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        y = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
        y = MultiHeadSelfAttention(self.num_heads, qkv_bias=self.qkv_bias,
                                   proj_dropout=self.dropout, dtype=self.dtype, name="attn")(
                                       y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        y = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
        y = Mlp(self.mlp_dim, activation=gelu_tanh if self.gelu_approximate else gelu_exact,
                dropout=self.dropout, dtype=self.dtype, name="mlp")(y, train=train)
        x = x + DropPath(self.drop_path)(y, train=train)
        x = nn.with_logical_constraint(x, _TOKEN_AXES)
        if self.scan_output:
            return x, (x if self.collect else None)
        return x


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
    (q = k = v), then ``reduce`` 'token' takes token 0 and 'avg' the mean over all T tokens.
    Returns (B, D).
    """
    batch, length, width = tokens.shape
    heads = tokens.reshape(batch, length, num_heads, width // num_heads)
    refined = dot_product_attention(heads, heads, heads).reshape(batch, length, width)
    return refined[:, 0] if reduce == "token" else jnp.mean(refined, axis=1)


class VisionTransformer(Backbone):
    """ViT / DeiT / FlexiViT with any input size and any (static) patch size per call.

    Fields (timm's names; big_vision's ``width``, ``dropout``, ``drop_path``, ``pool_type`` are
    accepted by ``create_model`` and translated, see :func:`big_vision_aliases`):
      num_classes: classifier outputs; 0 = no head (``__call__`` returns pre-logits).
      patch_size: base patch size of the one stored kernel (pair).
      posemb_grid: grid (h, w) of the stored position embedding.
      embed_dim, depth, num_heads: transformer size.
      mlp_ratio: MLP hidden width over embed_dim (timm); ``mlp_dim`` (big_vision), when set, is
        the hidden width itself and wins (So400m's 4304 is no integer ratio of 1152).
      global_pool: 'token' (class token), 'avg' (mean of the tokens), 'max' (their maximum),
        'avgmax' ((mean + max) / 2), 'map' (attention pooling by a learned probe), 'prr'
        (parameter-free self-attention over every token, then the class token or the mean:
        timm's AttentionPoolPrr), 'none' (every token; the head is applied per token).
      pool_include_prefix: 'avg', 'max', 'avgmax' and 'map' pool the prefix tokens (class,
        distillation, registers) with the patch tokens; False (timm's default) pools the patch
        tokens only. 'token', 'prr' and 'none' do not read it (timm: VisionTransformer.pool).
      in_chans: input channels; drop_rate: dropout on tokens, attention output and MLPs;
      drop_path_rate: stochastic depth, increasing linearly over the blocks to this rate.
      class_token, dist_token, num_reg_tokens: prefix tokens (dist_token = DeiT).
      posemb_prefix: the position embedding has entries for the prefix tokens (timm default);
        False = timm ``no_embed_class`` / big_vision.
      resize: 'timm' or 'big_vision': whose interpolation PI-resize and posemb resampling
        reproduce.
      dynamic_img_pad: zero-pad images at the bottom/right to a multiple of the patch size
        (timm ``dynamic_img_pad``) instead of raising when the patch does not tile them.
      fc_norm: the final norm is applied after pooling (timm's default for 'avg', 'max' and
        'avgmax') instead of to every token before pooling (big_vision, timm 'token'/'map').
      gelu_approximate: tanh GELU (big_vision) instead of the exact erf GELU (timm).
      distilled_training: with dist_token, ``train=True`` returns (cls_logits, dist_logits).
      remat: recompute each block's activations in the backward pass instead of keeping them
        (``nn.remat`` per block; big_vision/scenic's option): less memory, more compute. Same
        parameters, same outputs.
      scan_layers: run the blocks as one ``nn.scan`` over depth (big_vision's ``scan``): XLA
        compiles one block instead of ``depth``, so compile time stops growing with depth (it
        matters with one executable per patch size). The parameters change layout: one
        'blocks' entry whose leaves are stacked over depth (leading axis, logical name
        'layers') instead of 'blocks_0' .. 'blocks_{depth-1}'; :func:`stack_blocks` and
        :func:`unstack_blocks` convert a tree (e.g. an imported checkpoint) between the two.
        Needs ``drop_path_rate=0`` (the per-block rates differ, a scanned body is one block).
    """

    flex_kwargs = ("patch_size",)

    num_classes: int = 1000
    patch_size: Sequence[int] = (16, 16)
    posemb_grid: Sequence[int] = (14, 14)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_dim: int | None = None
    global_pool: str = "token"
    pool_include_prefix: bool = False
    class_token: bool = True
    dist_token: bool = False
    num_reg_tokens: int = 0
    posemb_prefix: bool = True
    resize: str = "timm"
    dynamic_img_pad: bool = False
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    fc_norm: bool = False
    gelu_approximate: bool = False
    head_zeroinit: bool = False
    distilled_training: bool = True
    dtype: Any = None
    remat: bool = False
    scan_layers: bool = False

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: class, distillation and register tokens."""
        return int(self.class_token) + int(self.dist_token) + self.num_reg_tokens

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width: ``mlp_dim`` if set, else int(embed_dim * mlp_ratio) (timm)."""
        return self.mlp_dim or int(self.embed_dim * self.mlp_ratio)

    def feature_info(self, patch_size: int | Sequence[int] | None = None
                     ) -> tuple[FeatureInfo, ...]:
        """'patch_embed', 'block0'..'block{depth-1}' and 'feature_map', all at stride
        ``patch_size`` (the base patch size if None) with ``embed_dim`` channels."""
        stride = to_pair(self.patch_size if patch_size is None else patch_size, "patch_size")
        names = ["patch_embed", *(f"block{i}" for i in range(self.depth)), "feature_map"]
        return tuple(FeatureInfo(n, stride, self.embed_dim) for n in names)

    def input_shape(self) -> tuple[int, int, int]:
        """The posemb grid times the base patch size: where the position table is not
        resampled."""
        grid, patch = to_pair(self.posemb_grid, "posemb_grid"), to_pair(self.patch_size)
        return (grid[0] * patch[0], grid[1] * patch[1], self.in_chans)

    def _check_config(self) -> None:
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={self.global_pool!r} is unknown; accepted: "
                             f"{GLOBAL_POOLS}")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize={self.resize!r} is unknown; accepted: {RESIZE_METHODS}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' reads the class token: set class_token=True, "
                             "or pick another global_pool, e.g. 'avg' or 'map'")
        if self.dist_token and (not self.class_token or self.global_pool != "token"
                                or self.fc_norm):
            raise ValueError("dist_token=True (DeiT) needs class_token=True, "
                             "global_pool='token' and fc_norm=False; got class_token="
                             f"{self.class_token}, global_pool={self.global_pool!r}, "
                             f"fc_norm={self.fc_norm}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.num_reg_tokens < 0:
            raise ValueError(f"num_reg_tokens must be >= 0, got {self.num_reg_tokens}")
        if self.scan_layers and self.drop_path_rate:
            raise ValueError(f"scan_layers=True runs one block body for every layer, so it cannot "
                             f"take the per-block stochastic-depth rates of drop_path_rate="
                             f"{self.drop_path_rate}; set drop_path_rate=0 or scan_layers=False")

    def _embed(self, images: jax.Array, patch_size, train: bool) -> tuple[jax.Array, jax.Array]:
        """Patch map (B, h, w, D) and the token sequence with prefix tokens and posembs added."""
        self._check_config()
        self._check_inputs(images)
        dtype = self.dtype or jnp.float32
        patch_map = FlexiPatchEmbed(self.embed_dim, to_pair(self.patch_size, "patch_size"),
                                    in_chans=self.in_chans, resize=self.resize,
                                    dynamic_img_pad=self.dynamic_img_pad, dtype=self.dtype,
                                    name="patch_embed")(images, patch_size)
        batch, grid_h, grid_w, _ = patch_map.shape
        tokens = patch_map.reshape(batch, grid_h * grid_w, self.embed_dim)

        prefix = []
        for name, count, std in (("cls_token", int(self.class_token), 1e-6),
                                 ("dist_token", int(self.dist_token), 0.02),
                                 ("reg_token", self.num_reg_tokens, 1e-6)):  # timm's inits
            if count:
                table = self.param(name, param_init(nn.initializers.normal(std),
                                                    (None, "tokens", "embed")),
                                   (1, count, self.embed_dim), jnp.float32)
                prefix.append(jnp.broadcast_to(table.astype(dtype),
                                               (batch, count, self.embed_dim)))

        old_grid = to_pair(self.posemb_grid, "posemb_grid")
        num_posemb_prefix = self.num_prefix_tokens if self.posemb_prefix else 0
        posemb = self.param("pos_embed", param_init(nn.initializers.normal(0.02),
                                                    (None, "tokens", "embed")),
                            (1, num_posemb_prefix + old_grid[0] * old_grid[1], self.embed_dim),
                            jnp.float32)
        posemb = resample_posemb(posemb, old_grid, (grid_h, grid_w), num_posemb_prefix,
                                 self.resize).astype(dtype)
        if self.posemb_prefix:
            tokens = jnp.concatenate(prefix + [tokens], axis=1) + posemb
        else:
            tokens = jnp.concatenate(prefix + [tokens + posemb], axis=1)
        tokens = nn.Dropout(self.drop_rate, deterministic=not train)(tokens)
        return patch_map, nn.with_logical_constraint(tokens, _TOKEN_AXES)

    def _encode(self, tokens: jax.Array, train: bool, out: dict | None = None) -> jax.Array:
        # train is positional and static (argument 2, counting the module) for nn.remat/scan
        block = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
        settings = dict(qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps,
                        gelu_approximate=self.gelu_approximate, dropout=self.drop_rate,
                        dtype=self.dtype)
        if self.scan_layers:
            blocks = nn.scan(block, variable_axes={"params": 0}, in_axes=nn.broadcast,
                             split_rngs={"params": True, "dropout": True}, length=self.depth,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            tokens, per_layer = blocks(self.num_heads, self.hidden_dim, **settings,
                                       scan_output=True, collect=out is not None,
                                       name="blocks")(tokens, train)
            for index in range(self.depth if out is not None else 0):
                out[f"block{index}"] = per_layer[index]
        else:
            rates = drop_path_rates(self.drop_path_rate, self.depth)
            for index in range(self.depth):
                tokens = block(self.num_heads, self.hidden_dim, **settings,
                               drop_path=rates[index], name=f"blocks_{index}")(tokens, train)
                if out is not None:
                    out[f"block{index}"] = tokens
        if not self.fc_norm:
            tokens = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="norm")(tokens)
        return tokens

    def _pool(self, tokens: jax.Array) -> jax.Array:
        """Pre-logits from the encoded tokens (B, prefix + h*w, D) according to ``global_pool``.

        timm vision_transformer.py VisionTransformer.pool / global_pool_nlc: the reductions and
        attention pooling see the patch tokens only unless ``pool_include_prefix``.
        """
        if self.global_pool == "token":
            pooled = tokens[:, 0]
        elif self.global_pool == "none":
            pooled = tokens
        elif self.global_pool == "prr":
            pooled = prr_pool(tokens, self.num_heads, "token" if self.class_token else "avg")
        else:
            if not self.pool_include_prefix:
                tokens = tokens[:, self.num_prefix_tokens:]
            if self.global_pool == "avg":
                pooled = jnp.mean(tokens, axis=1)
            elif self.global_pool == "max":
                pooled = jnp.max(tokens, axis=1)
            elif self.global_pool == "avgmax":
                pooled = 0.5 * (jnp.max(tokens, axis=1) + jnp.mean(tokens, axis=1))
            else:
                pooled = MAPHead(self.num_heads, self.hidden_dim,
                                 layer_norm_eps=self.layer_norm_eps,
                                 gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                                 name="attn_pool")(tokens)
        if self.fc_norm:
            pooled = layer_norm(self.layer_norm_eps, dtype=self.dtype, name="fc_norm")(pooled)
        return pooled

    def _head(self, pre_logits: jax.Array, name: str) -> jax.Array:
        """The classifier, always in float32 (logits and the loss's softmax stay float32 under
        bf16 compute; it is (B, D) x (D, classes), a negligible share of the FLOPs)."""
        init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.xavier_uniform()
        return dense(self.num_classes, axes=("embed", "classes"), kernel_init=init,
                     dtype=jnp.float32, name=name)(pre_logits)

    @nn.compact
    def _forward(self, images: jax.Array, patch_size, train: bool, with_head: bool
                 ) -> dict[str, Any]:
        """The one compact method: features, and with ``with_head`` the 'logits' entry."""
        patch_map, tokens = self._embed(images, patch_size, train)
        blocks: dict[str, jax.Array] = {}
        encoded = self._encode(tokens, train, None if with_head else blocks)
        batch, grid_h, grid_w, _ = patch_map.shape

        def as_map(sequence: jax.Array) -> jax.Array:  # patch tokens -> (B, h, w, D)
            return sequence[:, self.num_prefix_tokens:].reshape(batch, grid_h, grid_w,
                                                                self.embed_dim)

        out: dict[str, Any] = collections.OrderedDict(
            patch_embed=patch_map, **{name: as_map(seq) for name, seq in blocks.items()},
            feature_map=as_map(encoded))
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

    def features(self, images: jax.Array, *, train: bool = False,
                 patch_size: int | Sequence[int] | None = None) -> dict[str, jax.Array]:
        """NHWC maps (B, h, w, D) of the patch tokens, as :meth:`feature_info` lists them:
        'patch_embed' (the patch embedding, before position embeddings), 'block0' ..
        'block{depth-1}' (each block's output), 'feature_map' (after the final norm, or before
        fc_norm); then 'pre_logits' (B, D) (or (B, tokens, D) for global_pool='none')."""
        return self._forward(images, patch_size, train, with_head=False)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 patch_size: int | Sequence[int] | None = None):
        """Logits (B, num_classes), or pre-logits if num_classes == 0.

        ``patch_size``: None = the base patch size; an int or pair (static under jit) PI-resizes
        the stored kernel. DeiT in training returns (cls_logits, dist_logits), see module doc.
        """
        return self._forward(images, patch_size, train, with_head=True)["logits"]


def stack_blocks(params: dict, depth: int) -> dict:
    """ViT ``params`` with 'blocks_0' .. 'blocks_{depth-1}' (the default layout, what the
    importers produce) -> the ``scan_layers=True`` layout: one 'blocks' entry whose every leaf
    is the per-block leaves stacked on a new leading axis. Other entries are kept. KeyError
    naming the missing block if ``params`` has fewer than ``depth`` blocks."""
    missing = [f"blocks_{i}" for i in range(depth) if f"blocks_{i}" not in params]
    if missing:
        raise KeyError(f"params lack {missing[:3]}{'...' if len(missing) > 3 else ''} "
                       f"(stack_blocks expects blocks_0 .. blocks_{depth - 1})")
    out = {k: v for k, v in params.items() if not re.fullmatch(r"blocks_\d+", k)}
    out["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                                 *[params[f"blocks_{i}"] for i in range(depth)])
    return out


def unstack_blocks(params: dict) -> dict:
    """The inverse of :func:`stack_blocks`: a ``scan_layers=True`` tree ('blocks' stacked over
    depth) -> 'blocks_0' .. 'blocks_{depth-1}'."""
    stacked = params["blocks"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "blocks"}
    for index in range(depth):
        out[f"blocks_{index}"] = jax.tree.map(lambda leaf, i=index: leaf[i], stacked)
    return out


# ---------------------------------------------------------------------------------------------
# Registered variants.

_SIZES = {  # name: (embed_dim, depth, heads); MLP hidden width 4 * embed_dim (mlp_ratio 4)
    "micro": (96, 4, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def big_vision_aliases(options: dict[str, Any]) -> dict[str, Any]:
    """``create_model`` options in big_vision's names -> the module's (timm's) names:
    width -> embed_dim, dropout -> drop_rate, drop_path -> drop_path_rate, pool_type ->
    global_pool with its values 'tok' -> 'token', 'gap' -> 'avg' ('map', 'none' unchanged).
    Giving both names of one option is a ValueError."""
    out = dict(options)
    for old, new in (("width", "embed_dim"), ("dropout", "drop_rate"),
                     ("drop_path", "drop_path_rate"), ("pool_type", "global_pool")):
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"ViT options {old!r} (big_vision's name) and {new!r} name the same "
                             f"field; give only {new!r}")
        value = out.pop(old)
        out[new] = _BIG_VISION_POOL.get(value, value) if old == "pool_type" else value
    return out


_BIG_VISION_POOL = {"tok": "token", "gap": "avg", "map": "map", "none": "none"}


def _register(name: str, size: str, patch: int, image: int, description: str, **extra) -> None:
    embed_dim, depth, heads = _SIZES[size]
    defaults = dict(embed_dim=embed_dim, depth=depth, num_heads=heads,
                    patch_size=(patch, patch), posemb_grid=(image // patch, image // patch))
    defaults.update(extra)
    register_model(name, VisionTransformer, family="vit", description=description,
                   aliases=big_vision_aliases, **defaults)


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
          global_pool="avg", class_token=False, fc_norm=True)
_register("vit_base_patch16_224_map", "base", 16, 224,
          "ViT-B/16 with attention pooling (MAP), no class token",
          global_pool="map", class_token=False)
_register("vit_small_patch16_224_reg4", "small", 16, 224,
          "ViT-S/16 with 4 register tokens (posemb on patches only)",
          num_reg_tokens=4, posemb_prefix=False)
_register("vit_micro", "micro", 8, 48,
          "micro ViT for CPU experiments: width 96, depth 4, 3 heads, patch 8, 6x6 posemb grid",
          tiny=True)

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


_BIG_VISION_SIZES = {  # big_vision vit.py decode_variant: width (embed_dim), depth, mlp_dim, heads
    "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}
_BIG_VISION_VARIANT = re.compile(r"^(?P<size>[A-Za-z0-9]+)/(?P<patch>\d+)$")


def resolve_big_vision_variant(name: str) -> tuple[str, dict[str, Any]] | None:
    """big_vision variant strings ("S/16", "B/8", "So400m/14") -> registered name + overrides.

    The model gets big_vision's defaults: 'gap' ('avg') pooling without a class token, posemb
    on patches only (a 224 // patch grid), tanh GELU, zero-initialised head, big_vision
    resizing. Override ``pool_type="tok", class_token=True`` (or timm's names
    ``global_pool="token"``) for FlexiViT-style class-token models.
    """
    match = _BIG_VISION_VARIANT.match(name)
    if not match or match["size"] not in _BIG_VISION_SIZES:
        return None
    width, depth, mlp_dim, heads = _BIG_VISION_SIZES[match["size"]]
    patch = int(match["patch"])
    return "vit_base_patch16_224", dict(
        embed_dim=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=(patch, patch),
        posemb_grid=(224 // patch, 224 // patch), global_pool="avg", class_token=False,
        posemb_prefix=False, gelu_approximate=True, head_zeroinit=True, resize="big_vision")


register_name_resolver(resolve_big_vision_variant)
