"""Multiscale Vision Transformers: MViTv2 (Li et al. 2022) and MViT v1 images (Fan et al. 2021).

Pooling attention shrinks queries, keys and values with depthwise convolutions, so the token grid
halves (and the width doubles) from stage to stage, giving a feature pyramid inside one
transformer. Parameter names and semantics follow timm's ``MultiScaleVit`` (which follows
facebookresearch/mvit); the v1 image model is SlowFast's ``MVIT_B_16_CONV`` expressed in the same
stage layout (see :data:`MVIT_V1_B16_CONFIG`).

Any input size works with one set of weights: the decomposed relative-position tables (v2) are
linearly resized to the actual query/key grids in every forward (as detectron2's ``get_rel_pos``
and MMPretrain do) and the absolute position embedding (v1) is bilinearly resampled to the actual
patch grid (as SlowFast's ``_get_pos_embed``). At the size the model was built for
(``img_size``) both resizes are the identity and are skipped.

    >>> model = flexvision.create_model("mvitv2_tiny", num_classes=10)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    >>> logits = model.apply(variables, images)                    # any (B, H, W, 3)
    >>> maps = model.apply(variables, images, method="features")   # stage1..stage4, pre_logits
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexvision.layers.attention import decomposed_rel_pos_bias, dot_product_attention
from flexvision.layers.common import conv, dense, layer_norm, param_init
from flexvision.layers.flex import resize_bilinear, to_pair
from flexvision.layers.drop import DropPath, drop_path_rates
from flexvision.layers.mlp import Mlp
from flexvision.models.contract import Backbone, FeatureInfo, per_stage
from flexvision.registry import register_model

Size = tuple[int, int]


def per_stage(value: int | Sequence[int], num_stages: int, what: str) -> tuple[int, ...]:
    """timm's ``MultiScaleVitCfg`` rule: an int doubles per stage, a sequence is taken as given."""
    if isinstance(value, int):
        return tuple(value * 2 ** i for i in range(num_stages))
    value = tuple(int(v) for v in value)
    if len(value) != num_stages:
        raise ValueError(f"{what} has {len(value)} entries but depths has {num_stages} stages")
    return value


def adaptive_kv_strides(stride_q: Sequence[Size], stride_kv_adaptive: Size) -> tuple[Size, ...]:
    """Per-stage key/value pooling strides: the adaptive stride divided by every q stride so far.

    MViT sec. 3.2 (key-value pooling), timm ``MultiScaleVitCfg.__post_init__``: keys and values
    are pooled to roughly a fixed grid, so the kv stride shrinks as the queries get pooled.
    """
    current, strides = tuple(stride_kv_adaptive), []
    for stride in stride_q:
        if min(stride) > 1:
            current = tuple(max(c // s, 1) for c, s in zip(current, stride))
        strides.append(current)
    return tuple(strides)


def _pooling_is_identity(kernel: Size, stride: Size) -> bool:
    """The reference skips pooling when both kernel and stride are 1x1."""
    return int(np.prod(kernel)) == 1 and int(np.prod(stride)) == 1


def _with_cls(cls_tok: jax.Array | None, x: jax.Array) -> jax.Array:
    return x if cls_tok is None else jnp.concatenate([cls_tok, x], axis=1)


class PoolingAttention(nn.Module):
    """Multi-head pooling attention (MViT sec. 3.1; MViTv2 sec. 3; timm ``MultiScaleAttention``).

    q, k and v are projected from the input, then each is pooled on the token grid (per head, a
    depthwise conv with its own kernel and stride, shared by the heads) and
    layer-normed. With ``rel_pos_size`` the decomposed relative-position logits are added; with
    ``residual_pooling`` the pooled query is added to the attention output (class token
    included, as timm). Returns the projected output and the query grid size.
    """

    dim_out: int
    num_heads: int
    rel_pos_size: Size | None  # (q, kv) grid the tables were built for; None: no relative positions
    kernel_q: Size = (3, 3)
    kernel_kv: Size = (3, 3)
    stride_q: Size = (1, 1)
    stride_kv: Size = (1, 1)
    mode: str = "conv"
    qkv_bias: bool = True
    has_cls_token: bool = False
    residual_pooling: bool = True
    norm_eps: float = 1e-6
    dtype: Any = None

    def _pool(self, x: jax.Array, size: Size, kernel: Size, stride: Size, name: str
              ) -> tuple[jax.Array, Size]:
        """Pools (B, T, heads, head_dim) tokens on the ``size`` grid; the class token passes."""
        if _pooling_is_identity(kernel, stride):
            return x, size
        cls_tok, x = (x[:, :1], x[:, 1:]) if self.has_cls_token else (None, x)
        batch, _, heads, head_dim = x.shape
        grid = x.reshape(batch, *size, heads, head_dim).transpose(0, 3, 1, 2, 4)
        grid = grid.reshape(batch * heads, *size, head_dim)
        padding = tuple((k // 2, k // 2) for k in kernel)
        if self.mode == "conv":
            grid = conv(head_dim, kernel, strides=stride, padding=padding,
                        feature_group_count=head_dim, use_bias=False, dtype=self.dtype,
                        name=f"pool_{name}")(grid)
        elif self.mode == "max":
            grid = nn.max_pool(grid, kernel, strides=stride, padding=padding)
        else:  # "avg": the padded zeros count, as torch's AvgPool2d(count_include_pad=True)
            grid = nn.avg_pool(grid, kernel, strides=stride, padding=padding,
                               count_include_pad=True)
        new_size = grid.shape[1:3]
        grid = grid.reshape(batch, heads, *new_size, head_dim)
        x = grid.transpose(0, 2, 3, 1, 4).reshape(batch, new_size[0] * new_size[1], heads,
                                                  head_dim)
        x = _with_cls(cls_tok, x)
        if self.mode == "conv":
            x = layer_norm(self.norm_eps, dtype=self.dtype, name=f"norm_{name}")(x)
        return x, new_size

    @nn.compact
    def __call__(self, x: jax.Array, size: Size, *, train: bool = False
                 ) -> tuple[jax.Array, Size]:
        batch, tokens, _ = x.shape
        head_dim = self.dim_out // self.num_heads
        qkv = dense(3 * self.dim_out, axes=("embed", "mlp"), use_bias=self.qkv_bias,
                    dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, q_size = self._pool(qkv[:, :, 0], size, self.kernel_q, self.stride_q, "q")
        k, k_size = self._pool(qkv[:, :, 1], size, self.kernel_kv, self.stride_kv, "k")
        v, _ = self._pool(qkv[:, :, 2], size, self.kernel_kv, self.stride_kv, "v")

        bias = None
        if self.rel_pos_size is not None:
            table_len = 2 * max(self.rel_pos_size) - 1
            table_init = param_init(nn.initializers.truncated_normal(0.02), ("relpos", "kv"))
            rel_pos_h = self.param("rel_pos_h", table_init, (table_len, head_dim))
            rel_pos_w = self.param("rel_pos_w", table_init, (table_len, head_dim))
            prefix = 1 if self.has_cls_token else 0
            bias = decomposed_rel_pos_bias(q[:, prefix:], rel_pos_h, rel_pos_w, q_size, k_size)
            if prefix:  # the class token's row and column get no relative position
                bias = jnp.pad(bias, ((0, 0), (0, 0), (prefix, 0), (prefix, 0)))
        out = dot_product_attention(q, k, v, bias=bias, train=train)
        if self.residual_pooling:
            out = out + q
        out = out.reshape(batch, q.shape[1], self.dim_out)
        out = dense(self.dim_out, axes=("mlp", "embed"), dtype=self.dtype, name="proj")(out)
        return out, q_size


class MultiScaleBlock(nn.Module):
    """One MViT block (timm ``MultiScaleBlock``): pooling attention and MLP, pre-norm residuals.

    The width grows from ``dim`` to ``dim_out`` either in the attention (``expand_attn``, MViTv2:
    the shortcut is a linear projection of the *normed* input, ``shortcut_proj_attn``) or in the
    MLP (MViT v1 / MViTv2-L: the shortcut is a projection of the normed MLP input,
    ``shortcut_proj_mlp``). When the queries are pooled, the attention shortcut is max-pooled
    with kernel ``stride + 1`` (MViT sec. 3.2 "pooled skip connection").
    """

    dim_out: int
    num_heads: int
    rel_pos_size: Size | None
    mlp_ratio: float = 4.0
    kernel_q: Size = (3, 3)
    kernel_kv: Size = (3, 3)
    stride_q: Size = (1, 1)
    stride_kv: Size = (1, 1)
    mode: str = "conv"
    qkv_bias: bool = True
    has_cls_token: bool = False
    expand_attn: bool = True
    residual_pooling: bool = True
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    dtype: Any = None

    def _pool_shortcut(self, x: jax.Array, size: Size) -> jax.Array:
        if int(np.prod(self.stride_q)) <= 1:
            return x
        cls_tok, x = (x[:, :1], x[:, 1:]) if self.has_cls_token else (None, x)
        batch, _, width = x.shape
        kernel = tuple(s + 1 if s > 1 else s for s in self.stride_q)
        grid = nn.max_pool(x.reshape(batch, *size, width), kernel, strides=self.stride_q,
                           padding=tuple((k // 2, k // 2) for k in kernel))
        return _with_cls(cls_tok, grid.reshape(batch, grid.shape[1] * grid.shape[2], width))

    @nn.compact
    def __call__(self, x: jax.Array, size: Size, *, train: bool = False
                 ) -> tuple[jax.Array, Size]:
        dim = x.shape[-1]
        needs_proj = dim != self.dim_out
        att_dim = self.dim_out if self.expand_attn else dim
        x_norm = layer_norm(self.norm_eps, dtype=self.dtype, name="norm1")(x)
        shortcut = x
        if needs_proj and self.expand_attn:
            shortcut = dense(self.dim_out, dtype=self.dtype, name="shortcut_proj_attn")(x_norm)
        shortcut = self._pool_shortcut(shortcut, size)
        attn, new_size = PoolingAttention(
            att_dim, self.num_heads, self.rel_pos_size, kernel_q=self.kernel_q,
            kernel_kv=self.kernel_kv,
            stride_q=self.stride_q, stride_kv=self.stride_kv, mode=self.mode,
            qkv_bias=self.qkv_bias, has_cls_token=self.has_cls_token,
            residual_pooling=self.residual_pooling, norm_eps=self.norm_eps, dtype=self.dtype,
            name="attn")(x_norm, size, train=train)
        x = shortcut + DropPath(self.drop_path)(attn, train=train)

        x_norm = layer_norm(self.norm_eps, dtype=self.dtype, name="norm2")(x)
        shortcut = x
        if needs_proj and not self.expand_attn:
            shortcut = dense(self.dim_out, dtype=self.dtype, name="shortcut_proj_mlp")(x_norm)
        mlp = Mlp(int(att_dim * self.mlp_ratio), out_dim=self.dim_out, dtype=self.dtype,
                  name="mlp")(x_norm, train=train)
        x = shortcut + DropPath(self.drop_path)(mlp, train=train)
        return nn.with_logical_constraint(x, ("batch", None, "embed")), new_size


class MultiScaleVit(Backbone):
    """MViTv2 / MViT v1 image classifier; fields are those of timm's ``MultiScaleVitCfg``.

    ``img_size`` only fixes the sizes of the position tables (the grid they were trained on);
    any input size runs. ``global_pool`` is 'avg' (mean of the spatial tokens) or 'token' (the
    class token); None picks 'token' with a class token, else 'avg'. ``rel_pos_type`` is
    'spatial' (decomposed relative positions) or 'none'. ``pool_q_all_blocks`` (not a timm
    field): True pools q with ``kernel_qkv`` in every block (MViTv2, timm); False pools q only in
    blocks with a q stride, as SlowFast's MViT v1 configs (POOL_Q_STRIDE lists only the stage
    transitions). Returns logits (no softmax). A map of stride s on an H x W input is
    ceil(H / s) x ceil(W / s) (the padded patch convolution and poolings round up).
    """

    depths: Sequence[int] = (2, 3, 16, 3)
    embed_dim: int | Sequence[int] = 96
    num_heads: int | Sequence[int] = 1
    mlp_ratio: float = 4.0
    pool_first: bool = False
    expand_attn: bool = True
    qkv_bias: bool = True
    use_cls_token: bool = False
    use_abs_pos: bool = False
    residual_pooling: bool = True
    mode: str = "conv"
    kernel_qkv: Sequence[int] = (3, 3)
    stride_q: Sequence[Sequence[int]] = ((1, 1), (2, 2), (2, 2), (2, 2))
    stride_kv: Sequence[Sequence[int]] | None = None
    stride_kv_adaptive: Sequence[int] | None = (4, 4)
    patch_kernel: Sequence[int] = (7, 7)
    patch_stride: Sequence[int] = (4, 4)
    patch_padding: Sequence[int] = (3, 3)
    pool_type: str = "max"
    rel_pos_type: str = "spatial"
    pool_q_all_blocks: bool = True
    act_layer: str = "gelu"
    norm_layer: str = "layernorm"
    norm_eps: float = 1e-6
    img_size: int | Sequence[int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None

    # ----- configuration (static, pure Python) -----

    def _check_config(self) -> None:
        unsupported = {
            "pool_first": (self.pool_first, False), "act_layer": (self.act_layer, "gelu"),
            "norm_layer": (self.norm_layer, "layernorm"), "pool_type": (self.pool_type, "max"),
        }
        for field, (value, accepted) in unsupported.items():
            if value != accepted:
                raise ValueError(f"MultiScaleVit: {field}={value!r} is not implemented; "
                                 f"accepted: {accepted!r} (the value of every timm MViTv2 model)")
        if self.mode not in ("conv", "max", "avg"):
            raise ValueError(f"MultiScaleVit: mode={self.mode!r}; accepted modes are 'conv', "
                             "'max' and 'avg' ('conv_unshared' needs pool_first, not implemented)")
        if self.rel_pos_type not in ("spatial", "none", ""):
            raise ValueError(f"MultiScaleVit: rel_pos_type={self.rel_pos_type!r}; accepted are "
                             "'spatial' and 'none'")
        if self.global_pool not in (None, "avg", "token"):
            raise ValueError(f"MultiScaleVit: global_pool={self.global_pool!r}; accepted are "
                             "'avg', 'token' or None (token with a class token, else avg)")
        if self.global_pool == "token" and not self.use_cls_token:
            raise ValueError("MultiScaleVit: global_pool='token' needs use_cls_token=True")

    def stage_config(self) -> dict[str, tuple]:
        """Per-stage widths, heads, q/kv strides, as timm's ``MultiScaleVitCfg`` derives them."""
        num_stages = len(self.depths)
        stride_q = tuple(to_pair(s, "stride_q entry") for s in self.stride_q)
        if len(stride_q) != num_stages:
            raise ValueError(f"stride_q has {len(stride_q)} entries, depths {num_stages} stages")
        if self.stride_kv is not None:
            stride_kv = tuple(to_pair(s, "stride_kv entry") for s in self.stride_kv)
        elif self.stride_kv_adaptive is not None:
            stride_kv = adaptive_kv_strides(stride_q,
                                            to_pair(self.stride_kv_adaptive, "stride_kv"))
        else:
            stride_kv = ((1, 1),) * num_stages
        return {"embed_dim": per_stage(self.embed_dim, num_stages, "embed_dim"),
                "num_heads": per_stage(self.num_heads, num_stages, "num_heads"),
                "stride_q": stride_q, "stride_kv": stride_kv}

    def stage_channels(self) -> tuple[int, ...]:
        """Width of each stage's output: its own width, or with ``expand_attn=False`` (the
        width grows in the MLP of a stage's last block) the next stage's."""
        dims = self.stage_config()["embed_dim"]
        if self.expand_attn:
            return dims
        return tuple(dims[min(i + 1, len(dims) - 1)] for i in range(len(dims)))

    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """'stage1'..'stageN': strides patch_stride times the q strides so far."""
        cfg = self.stage_config()
        stride = to_pair(self.patch_stride, "patch_stride")
        info = []
        for i, (channels, stride_q) in enumerate(zip(self.stage_channels(), cfg["stride_q"])):
            stride = (stride[0] * stride_q[0], stride[1] * stride_q[1])
            info.append(FeatureInfo(f"stage{i + 1}", stride, channels))
        return tuple(info)

    def input_shape(self) -> tuple[int, int, int]:
        """``img_size``: the grid the position tables are built for."""
        return (*to_pair(self.img_size, "img_size"), self.in_chans)

    def patch_grid(self, height: int, width: int) -> Size:
        """Token grid of the patch-embedding convolution for an input of this size."""
        kernel = to_pair(self.patch_kernel, "patch_kernel")
        stride = to_pair(self.patch_stride, "patch_stride")
        padding = to_pair(self.patch_padding, "patch_padding", minimum=0)
        return tuple((n + 2 * p - k) // s + 1
                     for n, p, k, s in zip((height, width), padding, kernel, stride))

    def reference_grid(self) -> Size:
        """The patch grid of ``img_size`` (``img_size // patch_stride``, as timm and SlowFast):
        the grid the position tables are built for."""
        img = to_pair(self.img_size, "img_size")
        stride = to_pair(self.patch_stride, "patch_stride")
        return (img[0] // stride[0], img[1] // stride[1])

    def _rel_pos_sizes(self, cfg: dict[str, tuple]) -> list[list[Size | None]]:
        """Per block, the (q, kv) grid side its tables are built for: timm sizes them from
        ``img_size`` as ``2 * max(q, kv) - 1`` with q = side // stride (the reference grid)."""
        if self.rel_pos_type != "spatial":
            return [[None] * d for d in self.depths]
        grid = self.reference_grid()
        if grid[0] != grid[1]:
            raise ValueError(f"MultiScaleVit: relative-position tables are built for a square "
                             f"img_size, got {self.img_size}; any input size still runs at "
                             f"apply time")
        side = grid[0]
        sizes = []
        for depth, sq, skv in zip(self.depths, cfg["stride_q"], cfg["stride_kv"]):
            stage = []
            for i in range(depth):
                q_stride = sq if i == 0 else (1, 1)
                stage.append((side // q_stride[1], side // skv[1]))
                if i == 0:
                    side = side // sq[0]
            sizes.append(stage)
        return sizes

    # ----- forward -----

    def _embed(self, images: jax.Array) -> tuple[jax.Array, Size]:
        kernel = to_pair(self.patch_kernel, "patch_kernel")
        padding = to_pair(self.patch_padding, "patch_padding", minimum=0)
        self._check_inputs(images, min_size=tuple(max(1, k - 2 * p)
                                                  for k, p in zip(kernel, padding)))
        cfg = self.stage_config()
        x = conv(cfg["embed_dim"][0], to_pair(self.patch_kernel, "patch_kernel"),
                 strides=to_pair(self.patch_stride, "patch_stride"),
                 padding=tuple((p, p) for p in to_pair(self.patch_padding, "patch_padding",
                                                       minimum=0)),
                 dtype=self.dtype, name="patch_embed")(images.astype(self.dtype or jnp.float32))
        batch, gh, gw, width = x.shape
        x = x.reshape(batch, gh * gw, width)
        if self.use_cls_token:
            cls_token = self.param("cls_token", param_init(nn.initializers.truncated_normal(0.02),
                                                           (None, None, "embed")), (1, 1, width))
            x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, width)).astype(x.dtype),
                                 x], axis=1)
        if self.use_abs_pos:
            ref_grid = self.reference_grid()
            prefix = int(self.use_cls_token)
            pos_embed = self.param(
                "pos_embed", param_init(nn.initializers.truncated_normal(0.02),
                                        (None, "tokens", "embed")),
                (1, prefix + ref_grid[0] * ref_grid[1], width))
            x = x + resample_abs_pos_embed(pos_embed, ref_grid, (gh, gw), prefix).astype(x.dtype)
        return nn.with_logical_constraint(x, ("batch", None, "embed")), (gh, gw)

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits (B, num_classes), or the pooled features if num_classes == 0."""
        return self._forward(images, train)[1]

    def features(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        """'stage1'..'stage4' NHWC token maps (class token dropped) and the pooled 'pre_logits'."""
        return self._forward(images, train)[0]

    @nn.compact
    def _forward(self, images: jax.Array, train: bool
                 ) -> tuple[dict[str, jax.Array], jax.Array]:
        self._check_config()
        cfg = self.stage_config()
        kernel = to_pair(self.kernel_qkv, "kernel_qkv")
        x, size = self._embed(images)
        rates = drop_path_rates(self.drop_path_rate, sum(self.depths))
        rel_sizes = self._rel_pos_sizes(cfg)
        prefix = int(self.use_cls_token)
        features, block_index = collections.OrderedDict(), 0
        num_stages = len(self.depths)
        for stage, depth in enumerate(self.depths):
            if self.expand_attn:
                stage_out = cfg["embed_dim"][stage]
            else:
                stage_out = cfg["embed_dim"][min(stage + 1, num_stages - 1)]
            for i in range(depth):
                grows_here = self.expand_attn or i == depth - 1
                stride_q = cfg["stride_q"][stage] if i == 0 else (1, 1)
                pools_q = self.pool_q_all_blocks or int(np.prod(stride_q)) > 1
                kernel_q = kernel if pools_q else (1, 1)
                x, size = MultiScaleBlock(
                    dim_out=stage_out if grows_here else x.shape[-1],
                    num_heads=cfg["num_heads"][stage], rel_pos_size=rel_sizes[stage][i],
                    mlp_ratio=self.mlp_ratio, kernel_q=kernel_q, kernel_kv=kernel,
                    stride_q=stride_q,
                    stride_kv=cfg["stride_kv"][stage], mode=self.mode, qkv_bias=self.qkv_bias,
                    has_cls_token=self.use_cls_token, expand_attn=self.expand_attn,
                    residual_pooling=self.residual_pooling, drop_path=rates[block_index],
                    norm_eps=self.norm_eps, dtype=self.dtype,
                    name=f"stages_{stage}_blocks_{i}")(x, size, train=train)
                block_index += 1
            batch, _, width = x.shape
            features[f"stage{stage + 1}"] = x[:, prefix:].reshape(batch, *size, width)

        x = layer_norm(self.norm_eps, dtype=self.dtype, name="norm")(x)
        pool = self.global_pool or ("token" if self.use_cls_token else "avg")
        pooled = x[:, 0] if pool == "token" else jnp.mean(x[:, prefix:], axis=1)
        features["pre_logits"] = pooled
        pooled = nn.Dropout(self.drop_rate, deterministic=not train)(pooled)
        if self.num_classes > 0:
            logits = dense(self.num_classes, axes=("embed", "classes"), dtype=self.dtype,
                           name="head")(pooled)
        else:
            logits = pooled
        return features, logits


def resample_abs_pos_embed(pos_embed: jax.Array, ref_grid: Size, grid: Size, prefix: int
                           ) -> jax.Array:
    """Bilinear resampling of a (1, prefix + h*w, C) position embedding to another token grid.

    SlowFast ``MViT._get_pos_embed``: ``F.interpolate`` (align_corners=False) of the spatial part;
    the class-token entries pass unchanged. Identity (skipped) when the grids agree.
    """
    if tuple(grid) == tuple(ref_grid):
        return pos_embed
    prefix_part, spatial = pos_embed[:, :prefix], pos_embed[:, prefix:]
    spatial = spatial.reshape(1, ref_grid[0], ref_grid[1], -1).astype(jnp.float32)
    spatial = resize_bilinear(spatial, grid, precision=jax.lax.Precision.HIGHEST
                              ).astype(pos_embed.dtype)
    return jnp.concatenate([prefix_part, spatial.reshape(1, grid[0] * grid[1], -1)], axis=1)


# ----- registered configurations -----

#: SlowFast configs/ImageNet/MVIT_B_16_CONV.yaml in timm's stage layout. SlowFast lists per-block
#: multipliers: DIM_MUL / HEAD_MUL 2.0 at blocks 1, 3, 14 and POOL_Q_STRIDE 2x2 at the same blocks
#: of DEPTH 16, i.e. stages of 1, 2, 11, 2 blocks, widths 96-192-384-768 and heads 1-2-4-8. With
#: DIM_MUL_IN_ATT off the width grows in the MLP of the block *before* each transition (timm's
#: expand_attn=False), the shortcut projection reads the normed MLP input. CLS_EMBED_ON, USE_ABS_POS
#: (one joint embedding, SEP_POS_EMBED off), no relative positions, RESIDUAL_POOLING off,
#: POOL_KVQ_KERNEL 3x3 for k and v in every block but for q only at the transitions (the blocks
#: POOL_Q_STRIDE names), POOL_KV_STRIDE_ADAPTIVE 4x4, patch 7x7 stride 4 pad 3, head on the class
#: token after the final norm.
MVIT_V1_B16_CONFIG = dict(
    depths=(1, 2, 11, 2), embed_dim=96, num_heads=1, expand_attn=False, use_cls_token=True,
    use_abs_pos=True, residual_pooling=False, rel_pos_type="none", pool_q_all_blocks=False,
)

MVITV2_CONFIGS = {
    "mvitv2_tiny": dict(depths=(1, 2, 5, 2)),
    "mvitv2_small": dict(depths=(1, 2, 11, 2)),
    "mvitv2_base": dict(depths=(2, 3, 16, 3)),
    "mvitv2_large": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2, expand_attn=False),
    "mvitv2_small_cls": dict(depths=(1, 2, 11, 2), use_cls_token=True),
    "mvitv2_base_cls": dict(depths=(2, 3, 16, 3), use_cls_token=True),
    "mvitv2_large_cls": dict(depths=(2, 6, 36, 4), embed_dim=144, num_heads=2,
                             use_cls_token=True),
    "mvitv2_huge_cls": dict(depths=(4, 8, 60, 8), embed_dim=192, num_heads=3,
                            use_cls_token=True),
}

for _name, _config in MVITV2_CONFIGS.items():
    register_model(_name, MultiScaleVit, family="mvit",
                   description=f"MViTv2 (Li et al. 2022), timm {_name}", **_config)
register_model("mvit_base_16", MultiScaleVit, family="mvit",
               description="MViT-B-16 v1 image model (SlowFast MVIT_B_16_CONV)",
               **MVIT_V1_B16_CONFIG)
register_model("mvitv2_micro", MultiScaleVit, family="mvit", tiny=True,
               description="micro MViTv2 for CPU tests: one block per stage, width 8 doubling "
                           "per stage, one head, position tables for 32 px",
               depths=(1, 1, 1, 1), embed_dim=8, num_heads=1, img_size=32,
               stride_kv_adaptive=(2, 2))

TIMM_CFG_FIELDS = tuple(f.name for f in dataclasses.fields(MultiScaleVit)
                        if f.name not in ("parent", "name"))
