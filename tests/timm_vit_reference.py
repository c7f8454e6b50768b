"""An independent NumPy (float64) forward of timm's VisionTransformer, read from a timm state dict.

torch and timm are not installed here, so the pooling parity tests compare flexvision (through
``convert.from_timm``) with this transcription of timm's eval-mode semantics, written from
timm/models/vision_transformer.py (``_pos_embed``, ``Block``, ``pool``/``global_pool_nlc``,
``forward_head``) and timm/layers/attention_pool.py (``AttentionPoolLatent``,
``AttentionPoolPrr``). It runs at the checkpoint's own grid (no position-embedding resampling)
and is itself checked against the real timm outputs in the parity fixtures
(tests/test_vit_timm_pooling.py::test_reference_reproduces_timm_fixtures).

Everything is inferred from the state dict's names and shapes except what the weights cannot
say: ``num_heads``, ``global_pool`` (for the parameter-free reductions) and
``pool_include_prefix``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

LN_EPS = 1e-6  # timm ViT: partial(nn.LayerNorm, eps=1e-6)
POOLS = ("token", "avg", "avgmax", "max", "map", "prr", "")


def _linear(x, state, name):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def _layer_norm(x, state, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * state[f"{name}.weight"] + state[f"{name}.bias"]


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _softmax(x):
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def _heads(x, num_heads):
    """(B, N, D) -> (B, heads, N, D / heads)."""
    batch, length, width = x.shape
    return x.reshape(batch, length, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def _merge(x):
    """(B, heads, N, hd) -> (B, N, heads * hd)."""
    batch, heads, length, head_dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)


def _attend(q, k, v):
    scale = q.shape[-1] ** -0.5
    return _softmax(q @ k.transpose(0, 1, 3, 2) * scale) @ v


def _mlp(x, state, name):
    return _linear(_gelu(_linear(x, state, f"{name}.fc1")), state, f"{name}.fc2")


def _block(x, state, index, num_heads):
    name = f"blocks.{index}"
    y = _layer_norm(x, state, f"{name}.norm1")
    qkv = _linear(y, state, f"{name}.attn.qkv")
    q, k, v = (_heads(part, num_heads) for part in np.split(qkv, 3, axis=-1))
    x = x + _linear(_merge(_attend(q, k, v)), state, f"{name}.attn.proj")
    return x + _mlp(_layer_norm(x, state, f"{name}.norm2"), state, f"{name}.mlp")


def _attention_pool_latent(x, state, num_heads):
    """AttentionPoolLatent, latent_len 1, pool 'token': probe attends, then x + mlp(norm(x))."""
    table = state["attn_pool.latent"]  # (1, latent_len, D)
    latent = np.broadcast_to(table, (x.shape[0],) + table.shape[1:])
    q = _heads(_linear(latent, state, "attn_pool.q"), num_heads)
    k, v = (_heads(part, num_heads) for part in np.split(_linear(x, state, "attn_pool.kv"), 2, -1))
    out = _linear(_merge(_attend(q, k, v)), state, "attn_pool.proj")
    out = out + _mlp(_layer_norm(out, state, "attn_pool.norm"), state, "attn_pool.mlp")
    return out[:, 0]


def _attention_pool_prr(x, num_heads, reduce):
    """AttentionPoolPrr without pre/post norms (as VisionTransformer builds it): q = k = v = x."""
    heads = _heads(x, num_heads)
    refined = _merge(_attend(heads, heads, heads))
    return refined[:, 0] if reduce == "token" else refined.mean(1)


def forward(state: dict[str, np.ndarray], images: np.ndarray, *, num_heads: int,
            global_pool: str = "token", pool_include_prefix: bool = False,
            dynamic_img_pad: bool = False) -> dict[str, np.ndarray]:
    """timm VisionTransformer eval forward; returns {'pre_logits': ..., 'logits': ...}.

    state: timm state_dict names and PyTorch layouts (Linear (out, in), Conv2d (out, in, kh, kw)).
    images: NHWC, (B, H, W, C) with H, W the checkpoint's image size (no posemb resampling),
    or less by up to a patch with ``dynamic_img_pad`` (PatchEmbed pads bottom/right with zeros).
    """
    if global_pool not in POOLS:
        raise ValueError(f"global_pool={global_pool!r}; timm accepts {POOLS}")
    state = {k: np.asarray(v, np.float64) for k, v in state.items()}
    images = np.asarray(images, np.float64)
    weight = state["patch_embed.proj.weight"]  # (D, C, ph, pw)
    width, _, ph, pw = weight.shape
    if dynamic_img_pad:
        pad_h, pad_w = -images.shape[1] % ph, -images.shape[2] % pw
        images = np.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    batch, height, img_w, chans = images.shape
    gh, gw = height // ph, img_w // pw
    patches = images[:, :gh * ph, :gw * pw].reshape(batch, gh, ph, gw, pw, chans)
    x = np.einsum("bhpwqc,dcpq->bhwd", patches, weight) + state["patch_embed.proj.bias"]
    x = x.reshape(batch, gh * gw, width)

    prefix = [np.broadcast_to(state[name], (batch,) + state[name].shape[1:])
              for name in ("cls_token", "reg_token") if name in state]
    num_prefix = sum(p.shape[1] for p in prefix)
    pos_embed = state["pos_embed"]
    if pos_embed.shape[1] == gh * gw:  # no_embed_class: add, then concatenate
        x = np.concatenate(prefix + [x + pos_embed], axis=1)
    else:  # concatenate, then add (the posemb has entries for the prefix tokens)
        x = np.concatenate(prefix + [x], axis=1) + pos_embed

    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for index in range(depth):
        x = _block(x, state, index, num_heads)
    if "norm.weight" in state:
        x = _layer_norm(x, state, "norm")

    if global_pool == "map":
        pooled = _attention_pool_latent(x if pool_include_prefix else x[:, num_prefix:],
                                        state, num_heads)
    elif global_pool == "prr":  # timm sets pool_include_prefix=True for 'prr'
        pooled = _attention_pool_prr(x, num_heads, "token" if "cls_token" in state else "avg")
    elif global_pool == "token":
        pooled = x[:, 0]
    elif global_pool == "":
        pooled = x
    else:
        tokens = x if pool_include_prefix else x[:, num_prefix:]
        mean, peak = tokens.mean(1), tokens.max(1)
        pooled = {"avg": mean, "max": peak, "avgmax": 0.5 * (mean + peak)}[global_pool]
    if "fc_norm.weight" in state:
        pooled = _layer_norm(pooled, state, "fc_norm")
    logits = _linear(pooled, state, "head") if "head.weight" in state else pooled
    return {"pre_logits": pooled, "logits": logits}


def random_state_dict(rng: np.random.Generator, *, embed_dim: int, depth: int, patch: int,
                      grid: tuple[int, int], num_classes: int, mlp_ratio: float = 4.0,
                      in_chans: int = 3, class_token: bool = True, reg_tokens: int = 0,
                      no_embed_class: bool = False, global_pool: str = "token",
                      fc_norm: bool | None = None) -> dict[str, np.ndarray]:
    """A timm VisionTransformer state dict with random float32 weights (every one matters).

    Parameter names and shapes follow timm's constructor for those kwargs: ``norm`` or
    ``fc_norm`` (fc_norm None = on for 'avg'/'avgmax'/'max'), ``attn_pool.*`` for 'map'.
    """
    hidden = int(embed_dim * mlp_ratio)

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(name, dim):
        state[f"{name}.weight"] = 1.0 + normal(dim, scale=0.1)
        state[f"{name}.bias"] = normal(dim, scale=0.1)

    def linear(name, out_dim, in_dim):
        state[f"{name}.weight"] = normal(out_dim, in_dim, scale=in_dim ** -0.5)
        state[f"{name}.bias"] = normal(out_dim, scale=0.1)

    state: dict[str, np.ndarray] = {}
    num_prefix = int(class_token) + reg_tokens
    if class_token:
        state["cls_token"] = normal(1, 1, embed_dim, scale=1.0)
    if reg_tokens:
        state["reg_token"] = normal(1, reg_tokens, embed_dim, scale=1.0)
    state["pos_embed"] = normal(1, grid[0] * grid[1] + (0 if no_embed_class else num_prefix),
                                embed_dim, scale=0.5)
    state["patch_embed.proj.weight"] = normal(embed_dim, in_chans, patch, patch,
                                              scale=(in_chans * patch * patch) ** -0.5)
    state["patch_embed.proj.bias"] = normal(embed_dim, scale=0.1)
    for index in range(depth):
        name = f"blocks.{index}"
        norm(f"{name}.norm1", embed_dim)
        linear(f"{name}.attn.qkv", 3 * embed_dim, embed_dim)
        linear(f"{name}.attn.proj", embed_dim, embed_dim)
        norm(f"{name}.norm2", embed_dim)
        linear(f"{name}.mlp.fc1", hidden, embed_dim)
        linear(f"{name}.mlp.fc2", embed_dim, hidden)
    use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
    norm("fc_norm" if use_fc_norm else "norm", embed_dim)
    if global_pool == "map":
        state["attn_pool.latent"] = normal(1, 1, embed_dim, scale=1.0)
        linear("attn_pool.q", embed_dim, embed_dim)
        linear("attn_pool.kv", 2 * embed_dim, embed_dim)
        linear("attn_pool.proj", embed_dim, embed_dim)
        norm("attn_pool.norm", embed_dim)
        linear("attn_pool.mlp.fc1", hidden, embed_dim)
        linear("attn_pool.mlp.fc2", embed_dim, hidden)
    if num_classes > 0:
        linear("head", num_classes, embed_dim)
    return state
