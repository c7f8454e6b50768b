"""Weight import for the ViT family: timm state dicts and big_vision ViT/FlexiViT checkpoints.

    model, variables = convert.from_timm("flexivit_small", "model.safetensors", num_classes=10)
    model, variables = convert.from_big_vision("flexivit_s_i1k.npz")

Both return a :class:`flexvision.models.vit.VisionTransformer` carrying the source's semantics
(resize interpolation, GELU form, where the final norm sits), so eval outputs match the source.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter, torch_conv_kernel, torch_linear_kernel)
from flexvision.layers.flex import to_pair
from flexvision.models.vit import VisionTransformer, big_vision_aliases
from flexvision.registry import list_models

# timm VisionTransformer kwargs -> what they mean here. Any other kwarg is refused by name.
_TIMM_POOL = {"token": "token", "avg": "avg", "max": "max", "avgmax": "avgmax", "map": "map",
              "prr": "prr", "": "none"}
_TIMM_IGNORED = {
    "dynamic_img_size": "flexvision models always accept any image size",
    "pretrained": "weights come from the state dict",
    "pretrained_cfg": "weights come from the state dict",
    "pretrained_cfg_overlay": "weights come from the state dict",
    "attn_drop_rate": "attention dropout is not used by flexvision's ViT",
    "strict_img_size": "flexvision models always accept any image size",
}


def _strip_tag(name: str) -> str:
    """'vit_base_patch16_224.augreg_in21k' -> 'vit_base_patch16_224' (timm pretrained tags)."""
    return name.split(".", 1)[0]


def timm_config(name: str, **timm_kwargs: Any) -> dict[str, Any]:
    """flexvision VisionTransformer fields for timm's model ``name`` built with ``timm_kwargs``."""
    base = _strip_tag(name)
    if base not in list_models(family="vit"):
        raise ValueError(f"timm model {name!r} has no flexvision ViT-family configuration; "
                         f"accepted names: {list_models(family='vit')}")
    from flexvision.registry import resolve  # pylint: disable=import-outside-toplevel

    config = {f.name: f.default for f in dataclasses.fields(VisionTransformer)
              if f.name not in ("parent", "name")}
    config.update(resolve(base)[0].defaults)
    kwargs = dict(timm_kwargs)
    for key in list(kwargs):
        if key in _TIMM_IGNORED:
            kwargs.pop(key)
    mlp_ratio = kwargs.pop("mlp_ratio", None)
    patch = kwargs.pop("patch_size", None)
    img_size = kwargs.pop("img_size", None)
    base_patch = to_pair(patch, "patch_size") if patch is not None else tuple(config["patch_size"])
    if patch is not None or img_size is not None:
        image = (to_pair(img_size, "img_size") if img_size is not None else
                 tuple(g * p for g, p in zip(config["posemb_grid"], config["patch_size"])))
        config["patch_size"] = base_patch
        config["posemb_grid"] = (image[0] // base_patch[0], image[1] // base_patch[1])
    renames = {"embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads",
               "num_classes": "num_classes", "in_chans": "in_chans", "qkv_bias": "qkv_bias",
               "class_token": "class_token", "reg_tokens": "num_reg_tokens",
               "drop_rate": "drop_rate", "drop_path_rate": "drop_path_rate",
               "pool_include_prefix": "pool_include_prefix",
               "dynamic_img_pad": "dynamic_img_pad"}
    for timm_key, ours in renames.items():
        if timm_key in kwargs:
            config[ours] = kwargs.pop(timm_key)
    config["mlp_ratio"] = float(mlp_ratio if mlp_ratio is not None else 4.0)
    config["mlp_dim"] = None  # timm: hidden width int(embed_dim * mlp_ratio)
    if "no_embed_class" in kwargs:
        config["posemb_prefix"] = not kwargs.pop("no_embed_class")
    fc_norm = kwargs.pop("fc_norm", None)
    if "global_pool" in kwargs:
        pool = kwargs.pop("global_pool")
        if pool not in _TIMM_POOL:
            raise ValueError(f"timm global_pool={pool!r} is not supported; accepted: "
                             f"{sorted(_TIMM_POOL)}")
        config["global_pool"] = _TIMM_POOL[pool]
    if fc_norm is None:  # timm: fc_norm defaults to on for the reductions, off otherwise
        fc_norm = config["global_pool"] in ("avg", "max", "avgmax")
    config["fc_norm"] = bool(fc_norm)
    for key, accepted in (("pos_embed", "learn"), ("pre_norm", False), ("final_norm", True),
                          ("init_values", None), ("qk_norm", False), ("weight_init", "")):
        if key in kwargs and kwargs.pop(key) not in (accepted,):
            raise ValueError(f"timm kwarg {key} other than {accepted!r} is not supported by "
                             f"flexvision's ViT")
    if kwargs:
        raise ValueError(f"timm kwargs {sorted(kwargs)} are not supported by flexvision's ViT "
                         f"importer; supported: img_size, patch_size, embed_dim, depth, num_heads, "
                         f"mlp_ratio, num_classes, in_chans, qkv_bias, class_token, reg_tokens, "
                         f"no_embed_class, global_pool, pool_include_prefix, fc_norm, "
                         f"dynamic_img_pad, drop_rate, drop_path_rate, "
                         f"{sorted(_TIMM_IGNORED)}")
    config["resize"] = "timm"
    config["gelu_approximate"] = False
    return config


_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _timm_param(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One timm state-dict entry -> ('params/...' flat name, array in flax layout)."""
    tokens = {"cls_token": "cls_token", "dist_token": "dist_token", "reg_token": "reg_token",
              "pos_embed": "pos_embed", "attn_pool.latent": "attn_pool/latent"}
    if key in tokens:
        return f"params/{tokens[key]}", value
    if key == "patch_embed.proj.weight":
        return "params/patch_embed/kernel", torch_conv_kernel(value)
    if key == "patch_embed.proj.bias":
        return "params/patch_embed/bias", value
    match = _TIMM_BLOCK.match(key)
    if match:
        module = f"blocks_{match[1]}/{match[2].replace('.', '/')}"
    else:
        module, _, _ = key.rpartition(".")
        module = module.replace(".", "/")
    kind = key.rpartition(".")[2]
    leaf_name = module.rpartition("/")[2]
    is_norm = leaf_name.startswith("norm") or leaf_name == "fc_norm"
    if kind == "weight":
        if is_norm:
            return f"params/{module}/scale", value
        return f"params/{module}/kernel", torch_linear_kernel(value)
    return f"params/{module}/bias", value


@register_converter("timm", prefixes=("vit_", "deit_", "flexivit_"),
                    description="timm ViT / DeiT / FlexiViT (vit_*, deit_*, flexivit_*)")
def convert_timm(name: str, state_dict: StateDict, **timm_kwargs: Any):
    """timm ViT-family state dict + timm name and kwargs -> (VisionTransformer, variables)."""
    config = timm_config(name, **timm_kwargs)
    _check_posemb_grid(name, config, state_dict, timm_kwargs)
    model = VisionTransformer(**config)
    converted = dict(_timm_param(k, v) for k, v in state_dict.items())
    return model, _fit(model, converted, f"timm {name}")


def _check_posemb_grid(name: str, config: dict[str, Any], state_dict: StateDict,
                       timm_kwargs: dict[str, Any]) -> None:
    """ValueError when the checkpoint's pos_embed was trained on another grid than the config's.

    A model built for another image size cannot take the checkpoint's position embedding, but
    flexvision resamples it to every input at run time: the fix is to load at the checkpoint's
    size and feed images of any size, so the message says so (with the img_size to use).
    """
    posemb = state_dict.get("pos_embed")
    if posemb is None or np.ndim(posemb) != 3:
        return
    prefix = (int(config["class_token"]) + int(config["dist_token"]) + config["num_reg_tokens"]
              if config["posemb_prefix"] else 0)
    grid = tuple(config["posemb_grid"])
    patches = posemb.shape[1] - prefix
    if patches == grid[0] * grid[1]:
        return
    patch = tuple(config["patch_size"])
    asked = timm_kwargs.get("img_size", (grid[0] * patch[0], grid[1] * patch[1]))
    side = int(round(max(patches, 0) ** 0.5))
    if side * side == patches:
        trained = f"a {side}x{side} grid of {patch[0]}x{patch[1]} patches"
        fix = f"img_size={side * patch[0]}" + ("" if patch[0] == patch[1] else
                                               f" or ({side * patch[0]}, {side * patch[1]})")
    else:
        trained = f"{patches} patch positions, not the {grid[0] * grid[1]} of a {grid[0]}x" \
                  f"{grid[1]} grid"
        fix = f"img_size=(H, W) with (H / {patch[0]}) * (W / {patch[1]}) = {patches}"
    raise ValueError(
        f"timm {name}: the checkpoint's pos_embed covers {trained}, but the model was built "
        f"for a {grid[0]}x{grid[1]} grid (img_size={asked!r}). flexvision resamples the position "
        f"embedding to every input at run time, so load the checkpoint at the size it was "
        f"trained at ({fix}) and call the model on images of any size")


def _fit(model: VisionTransformer, converted: dict[str, np.ndarray], source: str) -> dict:
    patch = to_pair(model.patch_size, "patch_size")
    grid = to_pair(model.posemb_grid, "posemb_grid")
    dummy = jnp.zeros((1, patch[0] * grid[0], patch[1] * grid[1], model.in_chans), jnp.float32)
    template = abstract_variables(model, dummy)
    variables = fit_to_template(template, converted, source=source)
    return {"params": variables["params"]}


def _as_float32(array: np.ndarray) -> np.ndarray:
    """float32 view of a checkpoint array; np.savez stores bfloat16 as raw 2-byte void ('V2')."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        array = array.view(jnp.bfloat16)
    return array.astype(np.float32) if array.dtype.kind in "fV" else array


def _flat_big_vision(state_dict: StateDict) -> StateDict:
    """Drops the optional 'params/' prefix of big_vision's flat names; arrays in float32."""
    if any(k.startswith("params/") for k in state_dict):
        state_dict = {k[len("params/"):]: v for k, v in state_dict.items()
                      if k.startswith("params/")}
    return {k: _as_float32(np.asarray(v)) for k, v in state_dict.items()}


def big_vision_config(flat: StateDict, posemb_grid: Any = None) -> dict[str, Any]:
    """VisionTransformer fields inferred from big_vision ViT arrays (no 'params/' prefix).

    ``posemb_grid`` is only needed for a non-square position grid (it cannot be inferred).
    """
    if "embedding/kernel" not in flat:
        raise ValueError("not a big_vision ViT checkpoint: no 'embedding/kernel' (or "
                         "'params/embedding/kernel') among its arrays; found e.g. "
                         f"{sorted(flat)[:8]}")
    kernel = flat["embedding/kernel"]
    if kernel.ndim != 4:
        raise ValueError(f"embedding/kernel must be an HWIO conv kernel, got shape {kernel.shape}")
    width = int(kernel.shape[-1])
    blocks = sorted({int(m[1]) for k in flat
                     if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"big_vision checkpoint: encoder blocks {blocks} are not 0..depth-1 "
                         f"(expected Transformer/encoderblock_0/... names)")
    query = flat.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
    if query is None or query.ndim != 3:
        raise ValueError("big_vision checkpoint: attention query kernel of shape "
                         "(width, heads, head_dim) is missing or has another shape: "
                         f"{None if query is None else query.shape}")
    if "pos_embedding" not in flat:
        raise ValueError("big_vision checkpoint without a learned 'pos_embedding' (sincos2d "
                         "posemb) is not supported")
    num_posemb = int(flat["pos_embedding"].shape[1])
    side = int(round(num_posemb ** 0.5))
    grid = (side, side) if posemb_grid is None else to_pair(posemb_grid, "posemb_grid")
    if grid[0] * grid[1] != num_posemb:
        raise ValueError(f"pos_embedding has {num_posemb} entries, which is not a {grid[0]}x"
                         f"{grid[1]} grid; pass posemb_grid=(h, w) with h * w == {num_posemb} "
                         f"to from_big_vision")
    if any(k.startswith("pre_logits/") for k in flat):
        raise ValueError("big_vision checkpoint with a pre_logits (representation_size) layer "
                         "is not supported")
    if any(k.startswith("MAPHead_0/") for k in flat):
        pool = "map"
    elif "cls" in flat:
        pool = "token"
    else:
        pool = "avg"
    return dict(
        num_classes=int(flat["head/kernel"].shape[-1]) if "head/kernel" in flat else 0,
        patch_size=tuple(int(s) for s in kernel.shape[:2]), posemb_grid=grid,
        embed_dim=width, depth=len(blocks), num_heads=int(query.shape[1]),
        mlp_dim=int(flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[-1]),
        global_pool=pool, class_token=pool == "token", posemb_prefix=False,
        in_chans=int(kernel.shape[2]), resize="big_vision", gelu_approximate=True,
        head_zeroinit=True, fc_norm=False)


def _fuse_heads(*kernels: np.ndarray) -> np.ndarray:
    """(width, heads, head_dim) query/key/value kernels -> one (width, n * heads * head_dim)."""
    return np.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=-1)


def _big_vision_attention(prefix: str, flat: StateDict, out: dict, fused: tuple[str, ...],
                          names: tuple[str, ...]) -> None:
    """big_vision MultiHeadDotProductAttention -> fused projections named ``names``."""
    parts = {p: (flat.pop(f"{prefix}/{p}/kernel"), flat.pop(f"{prefix}/{p}/bias"))
             for p in ("query", "key", "value", "out")}
    for name, group in zip(names, fused):
        members = [parts[p] for p in group.split("+")]
        out[f"{name}/kernel"] = _fuse_heads(*[k for k, _ in members])
        out[f"{name}/bias"] = np.concatenate([b.reshape(-1) for _, b in members])
    kernel, bias = parts["out"]
    out["proj/kernel"] = kernel.reshape(-1, kernel.shape[-1])
    out["proj/bias"] = bias


def _big_vision_params(flat: StateDict) -> dict[str, np.ndarray]:
    flat = dict(flat)
    out: dict[str, np.ndarray] = {}

    def move(src: str, dst: str) -> None:
        if src in flat:
            out[dst] = flat.pop(src)

    move("embedding/kernel", "patch_embed/kernel")
    move("embedding/bias", "patch_embed/bias")
    move("pos_embedding", "pos_embed")
    move("cls", "cls_token")
    move("Transformer/encoder_norm/scale", "norm/scale")
    move("Transformer/encoder_norm/bias", "norm/bias")
    move("head/kernel", "head/kernel")
    move("head/bias", "head/bias")
    for key in sorted(flat):
        match = re.match(
            r"Transformer/encoderblock_(\d+)/MultiHeadDotProductAttention_0/query/kernel$", key)
        if not match:
            continue
        src, dst = f"Transformer/encoderblock_{match[1]}", f"blocks_{match[1]}"
        attention: dict[str, np.ndarray] = {}
        _big_vision_attention(f"{src}/MultiHeadDotProductAttention_0", flat, attention,
                              ("query+key+value",), ("qkv",))
        out.update({f"{dst}/attn/{k}": v for k, v in attention.items()})
        for norm, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            move(f"{src}/{norm}/scale", f"{dst}/{ours}/scale")
            move(f"{src}/{norm}/bias", f"{dst}/{ours}/bias")
        for dense, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            move(f"{src}/MlpBlock_0/{dense}/kernel", f"{dst}/mlp/{ours}/kernel")
            move(f"{src}/MlpBlock_0/{dense}/bias", f"{dst}/mlp/{ours}/bias")
    if "MAPHead_0/probe" in flat:
        move("MAPHead_0/probe", "attn_pool/latent")
        attention = {}
        _big_vision_attention("MAPHead_0/MultiHeadDotProductAttention_0", flat, attention,
                              ("query", "key+value"), ("q", "kv"))
        out.update({f"attn_pool/{k}": v for k, v in attention.items()})
        move("MAPHead_0/LayerNorm_0/scale", "attn_pool/norm/scale")
        move("MAPHead_0/LayerNorm_0/bias", "attn_pool/norm/bias")
        for dense, ours in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            move(f"MAPHead_0/MlpBlock_0/{dense}/kernel", f"attn_pool/mlp/{ours}/kernel")
            move(f"MAPHead_0/MlpBlock_0/{dense}/bias", f"attn_pool/mlp/{ours}/bias")
    out.update(flat)  # anything left is reported as unexpected by fit_to_template
    return {f"params/{k}": v for k, v in out.items()}


@register_converter("big_vision", names={"vit"},
                    description="big_vision ViT / FlexiViT (models/vit.py, proj/flexi/vit.py)")
def convert_big_vision(state_dict: StateDict, **overrides: Any):
    """big_vision ViT arrays -> (VisionTransformer with big_vision semantics, variables).

    The configuration is inferred from the arrays; ``overrides`` replace inferred fields (in
    the module's names or big_vision's: ``pool_type="tok"`` = ``global_pool="token"``, see
    :func:`flexvision.models.vit.big_vision_aliases`). A FlexiViT checkpoint evaluated at
    big_vision's ``seqhw`` uses ``patch_size = image // seqhw``.
    """
    overrides = big_vision_aliases(overrides)
    flat = _flat_big_vision(state_dict)
    config = {**big_vision_config(flat, overrides.get("posemb_grid")), **overrides}
    model = VisionTransformer(**config)
    return model, _fit(model, _big_vision_params(flat), "big_vision ViT")


__all__ = ["big_vision_config", "convert_big_vision", "convert_timm", "timm_config"]
