"""FLOP counts that do not depend on the backend, and utilisation that cannot come out absurd.

Convention (everywhere in flexvision.benchmark): a multiply-add is 2 FLOPs; what is counted is
the contractions, i.e. every ``dot_general`` (dense layers, einsums, both attention matmuls,
PI-resize and position-table resampling matmuls) and every ``convolution`` (patch embeddings,
convs, depthwise convs, their gradients). Elementwise ops, reductions, softmax, normalisation
and activations are not counted: in these backbones they are ~1-3 % of XLA's own count (the
difference between :func:`lowered_flops` and XLA's compiled cost analysis on CPU, which counts
them).

Three sources:

* :func:`lowered_flops`: walks the StableHLO of ``jax.jit(f).lower(...)``, i.e. the program
  before XLA optimises it, so a backend that hands a matmul to a library (cuBLAS/cuDNN custom
  calls on GPU, which XLA's compiled cost analysis does not count) cannot hide it;
* :func:`analytic_flops`: from a model's configuration alone (ViT/FlexiViT), the textbook count;
* ``analysis.xla_flops``: XLA's compiled cost analysis, kept as a third opinion.

:func:`choose_flops` picks the count the benchmark divides by, and :func:`utilization` never
returns a negative or absurd fraction (it returns None instead and says why).
"""

from __future__ import annotations

import dataclasses
import re
import numpy as np

# Bits of the StableHLO text printed by ``Lowered.as_text()`` (MLIR generic syntax of jax 0.10).
_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$\-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$\-]+)\(")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_SIGNATURE = re.compile(r":\s*\((.*)\)\s*->\s*(.*)$")
_DOT = re.compile(r"stablehlo\.dot_general\b")
_DOT_CONTRACT = re.compile(r"contracting_dims = \[([\d, ]*)\] x \[([\d, ]*)\]")
_CONV = re.compile(r"stablehlo\.convolution\b")
_CONV_DIMS = re.compile(r"dim_numbers = \[([^\]]*)\]x\[([^\]]*)\]->\[([^\]]*)\]")
_WINDOW_FIELD = r"{name} = \[((?:\[[^\]]*\](?:, )?)+|[\d, ]*)\]"
_WHILE = re.compile(r"stablehlo\.while\b")


def _shape(tensor_type: str) -> tuple[int, ...]:
    """'2x3x4xf32' -> (2, 3, 4); 'f32' -> ()."""
    dims = tensor_type.split("x")[:-1]
    if any(not d.isdigit() for d in dims):
        raise ValueError(f"lowered_flops needs static shapes, got tensor<{tensor_type}>")
    return tuple(int(d) for d in dims)


def _operand_and_result_shapes(line: str) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    signature = _SIGNATURE.search(line)
    if signature is None:
        raise ValueError(f"cannot read the type signature of: {line.strip()[:200]}")
    operands = [_shape(t) for t in _TENSOR.findall(signature.group(1))]
    result = _shape(_TENSOR.findall(signature.group(2))[0])
    return operands, result


def dot_general_flops(line: str) -> int:
    """2 * (result elements) * (product of the lhs contracting dimensions)."""
    (lhs, _), result = _operand_and_result_shapes(line)
    contract = _DOT_CONTRACT.search(line)
    dims = [int(d) for d in contract.group(1).split(",") if d.strip()] if contract else []
    return 2 * int(np.prod(result, dtype=np.int64)) * int(np.prod([lhs[d] for d in dims],
                                                                   dtype=np.int64))


def _window_field(line: str, name: str) -> list:
    match = re.search(_WINDOW_FIELD.format(name=name), line)
    if not match:
        return []
    text = match.group(1)
    if "[" in text:
        return [[int(v) for v in pair.split(",")] for pair in re.findall(r"\[([^\]]*)\]", text)]
    return [int(v) for v in text.split(",") if v.strip()]


def _valid_taps(out_size: int, in_size: int, kernel: int, stride: int, pad_lo: int,
                lhs_dilation: int, rhs_dilation: int) -> int:
    """Number of (output position, kernel tap) pairs of one spatial axis that read a real input
    element (not padding, not a hole of lhs dilation)."""
    pos = (np.arange(out_size)[:, None] * stride - pad_lo
           + np.arange(kernel)[None, :] * rhs_dilation)
    dilated = (in_size - 1) * lhs_dilation + 1
    valid = (pos >= 0) & (pos < dilated) & (pos % lhs_dilation == 0)
    return int(valid.sum())


def convolution_flops(line: str, *, count_padding: bool = True) -> int:
    """2 * (result elements) * (kernel elements per output feature): every output element is a
    sum over the kernel's spatial taps and (grouped) input features.

    ``count_padding=False`` counts only the taps that read real input (what XLA's cost analysis
    counts; at 224 px the two differ by < 1 % for 3x3 convs, at 32 px by up to ~25 %). A
    convolution with lhs dilation (the input gradient of a strided conv, a transposed conv) is
    always counted without the dilation holes and padding: its dense window would count the
    zeros inserted between inputs (4x the real work of a stride-2 conv's input gradient).
    """
    (lhs, rhs), result = _operand_and_result_shapes(line)
    dims = _CONV_DIMS.search(line)
    if dims is None:
        raise ValueError(f"cannot read the dim_numbers of: {line.strip()[:200]}")
    lhs_layout, rhs_layout, out_layout = ([d.strip() for d in g.split(",")] for g in dims.groups())
    in_features = rhs[rhs_layout.index("i")]  # per feature group already
    if any(d > 1 for d in _window_field(line, "lhs_dilate")):
        count_padding = False
    if count_padding:
        taps = int(np.prod([rhs[i] for i, d in enumerate(rhs_layout) if d.isdigit()],
                           dtype=np.int64))
        return 2 * int(np.prod(result, dtype=np.int64)) * taps * in_features
    spatial = sorted(int(d) for d in rhs_layout if d.isdigit())
    ndim = len(spatial)
    stride = _window_field(line, "stride") or [1] * ndim
    pad = _window_field(line, "pad") or [[0, 0]] * ndim
    lhs_dil = _window_field(line, "lhs_dilate") or [1] * ndim
    rhs_dil = _window_field(line, "rhs_dilate") or [1] * ndim
    taps_total = 1
    for axis in spatial:
        taps_total *= _valid_taps(result[out_layout.index(str(axis))],
                                  lhs[lhs_layout.index(str(axis))],
                                  rhs[rhs_layout.index(str(axis))], stride[axis], pad[axis][0],
                                  lhs_dil[axis], rhs_dil[axis])
    non_spatial_out = int(np.prod([result[i] for i, d in enumerate(out_layout) if not d.isdigit()],
                                  dtype=np.int64))
    return 2 * non_spatial_out * taps_total * in_features


@dataclasses.dataclass(frozen=True)
class LoweredCount:
    """FLOPs of the contractions of a lowered program (see the module docstring's convention)."""

    flops: int
    dot_flops: int
    conv_flops: int
    dots: int
    convolutions: int
    loops_with_contractions: int  # while loops whose body contracts: counted once, a lower bound


def count_stablehlo(text: str, *, count_padding: bool = True) -> LoweredCount:
    """Counts the dot_general and convolution FLOPs of a StableHLO module's text (``main`` plus
    every function it calls, once per call)."""
    body: dict[str, list[int]] = {}  # function -> [dot_flops, conv_flops, dots, convs, loops]
    calls: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = _FUNC.match(line)
        if header:
            current = header.group(1)
            body[current] = [0, 0, 0, 0, 0]
            calls[current] = []
            continue
        if current is None:
            continue
        if _DOT.search(line):
            body[current][0] += dot_general_flops(line)
            body[current][2] += 1
        elif _CONV.search(line):
            body[current][1] += convolution_flops(line, count_padding=count_padding)
            body[current][3] += 1
        elif _WHILE.search(line):
            body[current][4] += 1
        calls[current].extend(_CALL.findall(line))

    memo: dict[str, np.ndarray] = {}

    def total(name: str, depth: int = 0) -> np.ndarray:
        if depth > 200:
            raise ValueError("recursive calls in the lowered module")
        if name not in memo:
            counts = np.array(body.get(name, [0] * 5), dtype=np.int64)
            for callee in calls.get(name, []):
                counts = counts + total(callee, depth + 1)
            memo[name] = counts
        return memo[name]

    entry = "main" if "main" in body else next(iter(body), None)
    if entry is None:
        raise ValueError("no func.func in the lowered text: pass jax.jit(f).lower(...)")
    dot, conv, dots, convs, loops = (int(v) for v in total(entry))
    if loops and not (dots or convs):
        loops = 0
    return LoweredCount(dot + conv, dot, conv, dots, convs, loops)


def lowered_flops(lowered, *, count_padding: bool = True) -> LoweredCount:
    """:func:`count_stablehlo` of ``jax.jit(f).lower(*args)`` (a ``jax.stages.Lowered``)."""
    return count_stablehlo(lowered.as_text(), count_padding=count_padding)


# Analytic counts from a model's configuration.


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def vit_flops(model, resolution: tuple[int, int], patch_size: int | None = None) -> dict[str, int]:
    """Forward FLOPs of one image through a ViT/FlexiViT/DeiT (``models.vit.VisionTransformer``)
    at ``resolution`` (H, W) and run-time ``patch_size`` (default: the model's own).

    Per image, with grid g = (H/p)(W/p), tokens N = g + prefix tokens, width D, MLP width M:
    patch embedding 2 g p^2 C D; per block 2 N D (3D) for qkv, 2 N^2 D for q k^T, 2 N^2 D for
    probs v, 2 N D^2 for the output projection, 4 N D M for the MLP; pooling 'map' (probe
    query, keys/values of the pooled tokens, attention, projection, MLP) and 'prr' (attention of
    the tokens with themselves) as they compute; the head 2 D classes per head (per token with
    'none'); ``dynamic_img_pad`` grids round up. Per call, independent of the batch (``per_call``): the flexible patch kernel's PI-resize
    2 (P_stored^2) (p^2) C D when p differs from the stored size (FlexiViT, Beyer et al. 2023,
    eq. 3: one matmul by the pseudo-inverse resize matrix), and the position embedding's
    resampling from the stored grid G to the token grid, 2 G g D (``flex.resample_posemb``: one
    matmul by the cached interpolation matrix).
    """
    height, width = resolution
    stored = tuple(model.patch_size)
    patch = (patch_size, patch_size) if patch_size else stored
    rounding = _ceil if getattr(model, "dynamic_img_pad", False) else (lambda a, b: a // b)
    grid_hw = (rounding(height, patch[0]), rounding(width, patch[1]))
    grid = grid_hw[0] * grid_hw[1]
    dim = int(model.embed_dim)
    mlp = int(model.hidden_dim)
    prefix = int(model.class_token) + int(model.dist_token) + int(model.num_reg_tokens)
    tokens = grid + prefix
    chans = int(model.in_chans)
    embed = 2 * grid * patch[0] * patch[1] * chans * dim
    block = (2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim
             + 2 * tokens * dim * dim + 2 * 2 * tokens * dim * mlp)
    pool, head_rows = 0, 1
    pooled = tokens if getattr(model, "pool_include_prefix", False) else grid
    if model.global_pool == "map":  # probe q, kv of the pooled tokens, attention, proj, MLP
        pool = (2 * dim * dim + 2 * pooled * dim * 2 * dim + 2 * 2 * pooled * dim
                + 2 * dim * dim + 2 * 2 * dim * mlp)
    elif model.global_pool == "prr":  # q = k = v = the tokens, no projections
        pool = 2 * 2 * tokens * tokens * dim
    elif model.global_pool == "none":  # the head on every token
        head_rows = tokens
    heads = 1 + int(model.dist_token)
    head = 2 * dim * model.num_classes * heads * head_rows if model.num_classes else 0
    per_call = (2 * stored[0] * stored[1] * patch[0] * patch[1] * chans * dim
                if patch != stored else 0)
    posemb_grid = tuple(model.posemb_grid)
    if posemb_grid != grid_hw:
        per_call += 2 * posemb_grid[0] * posemb_grid[1] * grid * dim
    return {"per_image": embed + model.depth * block + pool + head, "per_call": per_call}


def swin_flops(model, resolution: tuple[int, int], patch_size: int | None = None
               ) -> dict[str, int]:
    """Forward FLOPs of one image through Swin (``models.swin.SwinTransformer``, Liu et al. 2021)
    at any size, with the model's own window rules (``swin.design_window_and_shift``,
    ``swin.window_and_shift``): patch embedding on the image padded to the patch size; per block
    with a map h x w padded to hp x wp (multiples of its window of N tokens) and width C:
    2 hp wp C 3C (qkv), 2 hp wp N C twice (q k^T, probs v; padding tokens attend too),
    2 hp wp C^2 (proj), 4 h w C (ratio C) (MLP); patch merging 2 h' w' 4C C' on the halved
    (ceil) map; the head 2 C classes."""
    from flexvision.layers.flex import to_pair
    from flexvision.models import swin

    del patch_size
    p = model.patch_size
    h, w = _ceil(resolution[0], p), _ceil(resolution[1], p)
    design = tuple(size // p for size in to_pair(model.img_size, "img_size"))
    windows = swin.stage_windows(model.window_size, len(model.depths))
    total = 2 * h * w * p * p * int(getattr(model, "in_chans", 3)) * model.embed_dim
    dim = model.embed_dim
    for i, depth in enumerate(model.depths):
        stage_dim = model.embed_dim * 2 ** i
        if i > 0:
            h, w = _ceil(h, 2), _ceil(w, 2)
            total += 2 * h * w * 4 * dim * stage_dim
        dim = stage_dim
        stage_design = (design[0] // 2 ** i, design[1] // 2 ** i)
        for block in range(depth):
            window, shift = swin.design_window_and_shift(stage_design, windows[i], block % 2 == 1)
            window, _ = swin.window_and_shift(h, w, window, shift)
            hp, wp = _ceil(h, window[0]) * window[0], _ceil(w, window[1]) * window[1]
            tokens = window[0] * window[1]
            hidden = int(dim * model.mlp_ratio)
            total += (2 * hp * wp * dim * 3 * dim + 2 * 2 * hp * wp * tokens * dim
                      + 2 * hp * wp * dim * dim + 2 * 2 * h * w * dim * hidden)
    total += 2 * dim * model.num_classes if model.num_classes else 0
    return {"per_image": total, "per_call": 0}


def cyclemlp_flops(model, resolution: tuple[int, int], patch_size: int | None = None
                   ) -> dict[str, int]:
    """Forward FLOPs of one image through CycleMLP (``models.cyclemlp.CycleMLP``, Chen et al.
    2022): the 7x7/4 patch embedding (padding 2) and 3x3/2 transitions (padding 1) as dense
    windows; per block on h x w x C: three channel FCs (two Cycle FCs and mlp_c) 3 x 2 h w C^2,
    the reweighting MLP on the pooled vector 2 C (C/4) + 2 (C/4) 3C, proj 2 h w C^2, the MLP
    4 h w C (ratio C); the head 2 C classes. Channel shifts are data movement, not counted."""
    del patch_size
    h = (resolution[0] + 4 - 7) // 4 + 1
    w = (resolution[1] + 4 - 7) // 4 + 1
    dim = model.embed_dims[0]
    total = 2 * h * w * 49 * int(getattr(model, "in_chans", 3)) * dim
    for stage, (depth, stage_dim) in enumerate(zip(model.depths, model.embed_dims)):
        if stage > 0 and model.transitions[stage - 1]:
            h, w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
            total += 2 * h * w * 9 * dim * stage_dim
        dim = stage_dim
        hidden = int(dim * model.mlp_ratios[stage])
        block = (4 * 2 * h * w * dim * dim + 2 * dim * (dim // 4) + 2 * (dim // 4) * 3 * dim
                 + 2 * 2 * h * w * dim * hidden)
        total += depth * block
    total += 2 * dim * model.num_classes if model.num_classes else 0
    return {"per_image": total, "per_call": 0}


def asmlp_flops(model, resolution: tuple[int, int], patch_size: int | None = None
                ) -> dict[str, int]:
    """Forward FLOPs of one image through AS-MLP (``models.asmlp.ASMLP``, Lian et al. 2022):
    patch embedding 2 h w p^2 3 C (image padded to the patch size with ``pad_to_fit``); per block
    four channel FCs (conv1, conv2_1, conv2_2, conv3) 4 x 2 h w C^2 and the MLP 4 h w C (ratio C);
    patch merging 2 h' w' 4C 2C on the halved (ceil) map; the head 2 C classes."""
    del patch_size
    p = model.patch_size
    rounding = _ceil if model.pad_to_fit else (lambda a, b: a // b)
    h, w = rounding(resolution[0], p), rounding(resolution[1], p)
    dim = model.embed_dim
    total = 2 * h * w * p * p * int(getattr(model, "in_chans", 3)) * dim
    for stage, depth in enumerate(model.depths):
        if stage > 0:
            h, w = rounding(h, 2), rounding(w, 2)
            total += 2 * h * w * 4 * dim * 2 * dim
            dim *= 2
        hidden = int(dim * model.mlp_ratio)
        total += depth * (4 * 2 * h * w * dim * dim + 2 * 2 * h * w * dim * hidden)
    total += 2 * dim * model.num_classes if model.num_classes else 0
    return {"per_image": total, "per_call": 0}


def _pooled(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]
            ) -> tuple[int, int]:
    """Grid after MViT's pooling (padding kernel // 2)."""
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s in zip(size, kernel, stride))


def mvit_flops(model, resolution: tuple[int, int], patch_size: int | None = None
               ) -> dict[str, int]:
    """Forward FLOPs of one image through MViTv2 / MViT v1 (``models.mvit.MultiScaleVit``, Li et
    al. 2022), with the model's own stage configuration (``stage_config``, ``patch_grid``,
    ``_rel_pos_sizes``). Per block with T input tokens (grid + class token), width C_in -> C_out,
    attention width A, heads n, head_dim c = A / n, pooled grids q and kv:
    shortcut projection 2 T C_in C_out where the width grows in the attention; qkv 2 T C_in 3A;
    pooling convs (mode 'conv', depthwise per head) 2 n q_h q_w c k_h k_w each for q, k, v;
    decomposed relative positions 2 q_h q_w n c (kv_h + kv_w); q k^T and probs v 2 Tq Tk A each;
    proj 2 Tq A^2; MLP 2 Tq A hidden + 2 Tq hidden C_out (+ 2 Tq A C_out shortcut projection
    where the width grows in the MLP); head 2 C classes. Per call: relative-position table
    resizes 2 L_new L_old c and the absolute position embedding's bilinear resampling."""
    from flexvision.layers.flex import to_pair

    del patch_size
    cfg = model.stage_config()
    grid = model.patch_grid(*resolution)
    kernel_patch = to_pair(model.patch_kernel, "patch_kernel")
    prefix = int(model.use_cls_token)
    dim = cfg["embed_dim"][0]
    chans = int(getattr(model, "in_chans", 3))
    total = 2 * grid[0] * grid[1] * kernel_patch[0] * kernel_patch[1] * chans * dim
    per_call = 0
    if model.use_abs_pos:
        ref = model.reference_grid()
        if tuple(ref) != tuple(grid):
            per_call += 2 * dim * (grid[0] * ref[0] * ref[1] + grid[0] * grid[1] * ref[1])
    kernel = to_pair(model.kernel_qkv, "kernel_qkv")
    rel_sizes = model._rel_pos_sizes(cfg)
    size = tuple(grid)
    num_stages = len(model.depths)
    for stage, depth in enumerate(model.depths):
        stage_out = (cfg["embed_dim"][stage] if model.expand_attn
                     else cfg["embed_dim"][min(stage + 1, num_stages - 1)])
        heads = cfg["num_heads"][stage]
        for i in range(depth):
            grows_here = model.expand_attn or i == depth - 1
            dim_out = stage_out if grows_here else dim
            att = dim_out if model.expand_attn else dim
            head_dim = att // heads
            stride_q = cfg["stride_q"][stage] if i == 0 else (1, 1)
            pools_q = model.pool_q_all_blocks or int(np.prod(stride_q)) > 1
            kernel_q = kernel if pools_q else (1, 1)
            stride_kv = cfg["stride_kv"][stage]
            tokens = size[0] * size[1] + prefix
            if dim != dim_out and model.expand_attn:
                total += 2 * tokens * dim * dim_out
            total += 2 * tokens * dim * 3 * att
            q_size, kv_size = size, size
            for k_, s_, which in ((kernel_q, stride_q, "q"), (kernel, stride_kv, "kv")):
                if int(np.prod(k_)) == 1 and int(np.prod(s_)) == 1:
                    continue
                pooled = _pooled(size, k_, s_)
                if model.mode == "conv":
                    total += (1 if which == "q" else 2) * 2 * heads * pooled[0] * pooled[1] \
                        * head_dim * k_[0] * k_[1]
                if which == "q":
                    q_size = pooled
                else:
                    kv_size = pooled
            q_tokens = q_size[0] * q_size[1] + prefix
            kv_tokens = kv_size[0] * kv_size[1] + prefix
            if rel_sizes[stage][i] is not None:
                total += 2 * q_size[0] * q_size[1] * heads * head_dim * (kv_size[0] + kv_size[1])
                table = 2 * max(rel_sizes[stage][i]) - 1
                for q_len, k_len in zip(q_size, kv_size):
                    needed = 2 * max(q_len, k_len) - 1
                    if needed != table:
                        per_call += 2 * needed * table * head_dim
            total += 2 * 2 * q_tokens * kv_tokens * att + 2 * q_tokens * att * att
            hidden = int(att * model.mlp_ratio)
            total += 2 * q_tokens * att * hidden + 2 * q_tokens * hidden * dim_out
            if dim != dim_out and not model.expand_attn:
                total += 2 * q_tokens * att * dim_out
            dim, size = dim_out, q_size
    total += 2 * dim * model.num_classes if model.num_classes else 0
    return {"per_image": total, "per_call": per_call}


def _conv2d(size: tuple[int, int], cin: int, cout: int, kernel: int, stride: int = 1
            ) -> tuple[int, tuple[int, int]]:
    """(FLOPs, output size) of a k x k conv with PyTorch padding k // 2 (dense windows)."""
    out = tuple((n + 2 * (kernel // 2) - kernel) // stride + 1 for n in size)
    return 2 * out[0] * out[1] * kernel * kernel * cin * cout, out


def _resnet_block(kind: str, size, cin: int, planes: int, stride: int = 1
                  ) -> tuple[int, tuple[int, int], int]:
    """(FLOPs, output size, output channels) of HRNet's BasicBlock / Bottleneck (He et al.
    2016) including the 1x1 projection of the skip when width or stride change."""
    from flexvision.models.hrnet import BOTTLENECK_EXPANSION

    expansion = BOTTLENECK_EXPANSION if kind == "bottleneck" else 1
    cout = planes * expansion
    total = 0
    if stride != 1 or cin != cout:
        total += _conv2d(size, cin, cout, 1, stride)[0]
    if kind == "bottleneck":
        f1, _ = _conv2d(size, cin, planes, 1)
        f2, out = _conv2d(size, planes, planes, 3, stride)
        f3, _ = _conv2d(out, planes, cout, 1)
        return total + f1 + f2 + f3, out, cout
    f1, out = _conv2d(size, cin, planes, 3, stride)
    f2, _ = _conv2d(out, planes, planes, 3)
    return total + f1 + f2, out, cout


def hrnet_flops(model, resolution: tuple[int, int], patch_size: int | None = None
                ) -> dict[str, int]:
    """Forward FLOPs of one image through the HRNet classifier (``models.hrnet.HRNet``, Wang et
    al. 2020; timm's HighResolutionNet): every conv with its dense k x k x C_in window per output
    element (stem, residual blocks with their projections, transitions, the exchange units'
    1x1 and strided 3x3 fusions, the classification head's bottlenecks, downsampling and final
    1x1 conv), and the classifier 2 C classes. Nearest upsampling is a copy, not counted."""
    from flexvision.models.hrnet import BOTTLENECK_EXPANSION, HEAD_CHANNELS

    del patch_size
    total, size = _conv2d(tuple(resolution), int(model.in_chans), model.stem_width, 3, 2)
    flops, size = _conv2d(size, model.stem_width, 64, 3, 2)
    total += flops
    first = model.stages[0]
    channels = 64
    for _ in range(first.num_blocks[0]):
        flops, size, channels = _resnet_block(first.block, size, channels,
                                              first.num_channels[0])
        total += flops
    branches = [(size, channels)]
    for spec in model.stages[1:]:
        widths = spec.out_channels
        new = []
        for i, width in enumerate(widths):  # transition
            if i < len(branches):
                (b_size, b_ch) = branches[i]
                if b_ch != width:
                    flops, b_size = _conv2d(b_size, b_ch, width, 3)
                    total += flops
                new.append((b_size, width))
            else:
                b_size, last = branches[-1]
                steps = i + 1 - len(branches)
                for k in range(steps):
                    out_ch = width if k == steps - 1 else last
                    flops, b_size = _conv2d(b_size, last, out_ch, 3, 2)
                    total += flops
                new.append((b_size, width))
        branches = new
        for _ in range(spec.num_modules):
            out = []
            for b, (depth, planes) in enumerate(zip(spec.num_blocks, spec.num_channels)):
                b_size, b_ch = branches[b]
                for _ in range(depth):
                    flops, b_size, b_ch = _resnet_block(spec.block, b_size, b_ch, planes)
                    total += flops
                out.append((b_size, b_ch))
            branches = out
            if len(branches) > 1:
                for i in range(len(branches)):
                    for j in range(len(branches)):
                        if j > i:
                            total += _conv2d(branches[j][0], widths[j], widths[i], 1)[0]
                        elif j < i:
                            j_size = branches[j][0]
                            for step in range(i - j):
                                out_ch = widths[i] if step == i - j - 1 else widths[j]
                                flops, j_size = _conv2d(j_size, widths[j], out_ch, 3, 2)
                                total += flops
    y = None
    for i, (b_size, b_ch) in enumerate(branches):
        flops, l_size, l_ch = _resnet_block("bottleneck", b_size, b_ch, HEAD_CHANNELS[i])
        total += flops
        if y is not None:
            total += _conv2d(y[0], y[1], HEAD_CHANNELS[i] * BOTTLENECK_EXPANSION, 3, 2)[0]
        y = (l_size, l_ch)
    total += _conv2d(y[0], y[1], model.num_features, 1)[0]
    total += 2 * model.num_features * model.num_classes if model.num_classes else 0
    return {"per_image": total, "per_call": 0}


ANALYTIC = {"vit": vit_flops, "swin": swin_flops, "cyclemlp": cyclemlp_flops,
            "asmlp": asmlp_flops, "mvit": mvit_flops, "hrnet": hrnet_flops}
"""Family -> analytic forward count ``(model, resolution, patch_size) -> {per_image, per_call}``."""


def analytic_flops(family: str, model, resolution: tuple[int, int], batch_size: int,
                   patch_size: int | None = None) -> int | None:
    """Forward FLOPs of a batch from the configuration (None for a family without a formula)."""
    formula = ANALYTIC.get(family)
    if formula is None:
        return None
    counts = formula(model, resolution, patch_size)
    return batch_size * counts["per_image"] + counts["per_call"]


# Choosing a count and a utilisation that cannot be absurd.

ABSURDLY_LOW = 0.5
"""XLA's count is distrusted below this fraction of the lowered count (XLA counts more than the
contractions, so a correct count is >= ~1x; cuBLAS custom calls make it far lower, or -1)."""


def choose_flops(xla: float | None, lowered: int | None) -> tuple[float | None, str]:
    """The FLOPs the benchmark divides by and which count they are: XLA's compiled count when it
    is positive and not below :data:`ABSURDLY_LOW` x the lowered count, else the lowered count."""
    if lowered and lowered > 0:
        if xla is None or not np.isfinite(xla) or xla <= 0 or xla < ABSURDLY_LOW * lowered:
            return float(lowered), "lowered"
        return float(xla), "xla"
    if xla is not None and np.isfinite(xla) and xla > 0:
        return float(xla), "xla"
    return None, "none"


def utilization(flops_per_s: float | None, peak_flops_per_s: float | None
                ) -> tuple[float | None, str]:
    """``flops_per_s / peak`` as a fraction, or (None, why) when either is unknown, not positive
    or the fraction exceeds 1.5 (a measurement can beat a *measured* matmul a little, never by
    half again: such a figure means a wrong FLOP count, and is not printed)."""
    if not flops_per_s or not peak_flops_per_s or not np.isfinite(flops_per_s) \
            or not np.isfinite(peak_flops_per_s):
        return None, "n/a (unknown)"
    if flops_per_s <= 0 or peak_flops_per_s <= 0:
        return None, "n/a (non-positive count)"
    fraction = flops_per_s / peak_flops_per_s
    if fraction > 1.5:
        return None, f"n/a (absurd: {fraction:.1f}x the peak)"
    return fraction, f"{100 * fraction:.0f}%"


# Datasheet dense peaks (no 2:4 sparsity), FLOP/s. GPU figures are the SXM parts'; the TPU
# figures are per chip. fp32 on NVIDIA is plain FP32 (not TF32); TPUs run float32 matmuls as
# bf16 passes and have no separate fp32 figure.
DATASHEET_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},
}


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak FLOP/s of ``device_kind`` (``jax.devices()[0].device_kind``, e.g.
    'NVIDIA H200', 'TPU v5 lite') for ``dtype``; None for an unknown device (every CPU) or a
    dtype it has no figure for."""
    kind = device_kind.upper()
    for name in sorted(DATASHEET_PEAKS, key=len, reverse=True):
        if name.upper() in kind:
            return DATASHEET_PEAKS[name].get(dtype)
    return None
