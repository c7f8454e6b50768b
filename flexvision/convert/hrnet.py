"""timm HRNet state dicts -> flexvision HRNet variables (params and batch_stats).

    model, variables = convert.from_timm("hrnet_w18_small", "hrnet_w18_small.safetensors")
    model, variables = convert.from_timm("hrnet_w18_seg", timm_w18_state_dict, num_classes=19)

Classification names (``hrnet_w*``) take a timm ``HighResolutionNet`` state dict; the number of
classes is read from its classifier unless given. Segmentation names (``hrnet_w*_seg``) take
either a timm classification state dict, whose backbone initializes the HRNetV2 model (its
classification neck is dropped and the segmentation head is freshly initialized from ``seed``,
as HRNet-Semantic-Segmentation starts from ImageNet weights), or a HRNet-Semantic-Segmentation
state dict with its ``last_layer.{0,1,3}`` head.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from flexvision import registry
from flexvision.convert.common import (StateDict, abstract_variables, fit_to_template,
                                       register_converter, torch_conv_kernel, torch_linear_kernel)
from flexvision.models.hrnet import HRNetSegmentation, HRNetV2Head

_SEQ = {"0": "conv", "1": "bn"}  # Sequential(Conv2d, BatchNorm2d, ...) positions
_BLOCK_LEAF = r"(?P<leaf>conv\d|bn\d|downsample\.[01])"
_CB = r"(?P<cb>[01])"

# timm module path -> flexvision module path (see the module names in models/hrnet.py).
_MODULE_RULES = tuple((re.compile(pattern), template) for pattern, template in (
    (r"(?P<leaf>conv[12]|bn[12])", "backbone/{leaf}"),
    (rf"layer1\.(?P<k>\d+)\.{_BLOCK_LEAF}", "backbone/layer1_{k}/{leaf}"),
    (rf"transition(?P<t>\d)\.(?P<i>\d+)\.{_CB}", "backbone/transition{t}_{i}/step_0/{cb}"),
    (rf"transition(?P<t>\d)\.(?P<i>\d+)\.(?P<k>\d+)\.{_CB}",
     "backbone/transition{t}_{i}/step_{k}/{cb}"),
    (rf"stage(?P<s>\d)\.(?P<m>\d+)\.branches\.(?P<b>\d+)\.(?P<k>\d+)\.{_BLOCK_LEAF}",
     "backbone/stage{s}_{m}/branch{b}_{k}/{leaf}"),
    (rf"stage(?P<s>\d)\.(?P<m>\d+)\.fuse_layers\.(?P<i>\d+)\.(?P<j>\d+)\.{_CB}",
     "backbone/stage{s}_{m}/fuse_{i}_{j}/{cb}"),
    (rf"stage(?P<s>\d)\.(?P<m>\d+)\.fuse_layers\.(?P<i>\d+)\.(?P<j>\d+)\.(?P<k>\d+)\.{_CB}",
     "backbone/stage{s}_{m}/fuse_{i}_{j}/step_{k}/{cb}"),
    (rf"incre_modules\.(?P<i>\d+)\.0\.{_BLOCK_LEAF}", "incre{i}/{leaf}"),
    (rf"downsamp_modules\.(?P<i>\d+)\.{_CB}", "downsamp{i}/{cb}"),
    (rf"final_layer\.{_CB}", "final_layer/{cb}"),
    (r"classifier", "classifier"),
    (rf"last_layer\.{_CB}", "head/last_layer/{cb}"),  # HRNet-Semantic-Segmentation head
    (r"last_layer\.3", "head/classifier"),
))
_CLASSIFICATION_NECK = re.compile(r"(incre_modules|downsamp_modules|final_layer|classifier)\.")
_TIMM_KWARGS = ("num_classes", "in_chans", "drop_rate", "head_conv_bias", "global_pool")


def timm_module_path(module: str) -> str:
    """The flexvision module path of timm module ``module`` (e.g. 'stage2.0.fuse_layers.1.0.0.1'
    -> 'backbone/stage2_0/fuse_1_0/step_0/bn'); ValueError for names HRNet does not have."""
    for pattern, template in _MODULE_RULES:
        match = pattern.fullmatch(module)
        if match:
            groups = match.groupdict()
            if "cb" in groups:
                groups["cb"] = _SEQ[groups["cb"]]
            if "leaf" in groups:
                groups["leaf"] = groups["leaf"].replace("downsample.0", "downsample/conv").replace(
                    "downsample.1", "downsample/bn")
            return template.format(**groups)
    raise ValueError(f"unexpected timm HRNet module {module!r} in the state dict")


def convert_state_dict(state_dict: StateDict) -> dict[str, np.ndarray]:
    """timm names and PyTorch layouts -> flat '/'-joined flexvision variables.

    Conv2d (out, in, kh, kw) -> HWIO kernel; Linear (out, in) -> (in, out); BatchNorm weight/bias
    -> params scale/bias, running_mean/var -> batch_stats mean/var; num_batches_tracked dropped.
    """
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        modules.setdefault(module, {})[leaf] = np.asarray(value)
    out = {}
    for module, tensors in modules.items():
        path = timm_module_path(module)
        if "running_mean" in tensors:  # BatchNorm2d
            out[f"params/{path}/scale"] = tensors["weight"]
            out[f"params/{path}/bias"] = tensors["bias"]
            out[f"batch_stats/{path}/mean"] = tensors["running_mean"]
            out[f"batch_stats/{path}/var"] = tensors["running_var"]
            continue
        weight = tensors["weight"]
        if weight.ndim == 4:
            out[f"params/{path}/kernel"] = torch_conv_kernel(weight)
        elif weight.ndim == 2:
            out[f"params/{path}/kernel"] = torch_linear_kernel(weight)
        else:
            raise ValueError(f"{module}.weight: unexpected shape {weight.shape} for an HRNet "
                             f"conv or linear layer")
        if "bias" in tensors:
            out[f"params/{path}/bias"] = tensors["bias"]
    return out


def _strip_training_wrapper(state_dict: StateDict) -> StateDict:
    """Removes the 'model.' prefix and 'loss.' entries of a HRNet-Semantic-Segmentation training
    checkpoint (its FullModel wrapper); other state dicts pass unchanged."""
    if state_dict and all(k.startswith(("model.", "loss.")) for k in state_dict):
        return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    return state_dict


def _model_kwargs(name: str, state_dict: StateDict, timm_kwargs: dict[str, Any]) -> dict:
    unknown = sorted(set(timm_kwargs) - set(_TIMM_KWARGS))
    if unknown:
        raise ValueError(f"{name}: unsupported timm kwargs {unknown}; accepted are "
                         f"{list(_TIMM_KWARGS)}")
    kwargs = dict(timm_kwargs)
    pool = kwargs.pop("global_pool", "avg")
    if pool != "avg":
        raise ValueError(f"{name}: global_pool={pool!r} is not supported; HRNet uses 'avg'")
    classifier = "last_layer.3.weight" if name.endswith("_seg") else "classifier.weight"
    if "num_classes" not in kwargs and classifier in state_dict:
        kwargs["num_classes"] = int(state_dict[classifier].shape[0])
    if "in_chans" not in kwargs and "conv1.weight" in state_dict:
        kwargs["in_chans"] = int(state_dict["conv1.weight"].shape[1])
    if name.endswith("_seg"):
        kwargs.pop("head_conv_bias", None)
    elif "head_conv_bias" not in kwargs and "final_layer.0.weight" in state_dict:
        kwargs["head_conv_bias"] = "final_layer.0.bias" in state_dict  # False for *_ssld
    return kwargs


@register_converter("timm", prefixes=("hrnet_",),
                    description="timm HRNet (hrnet_w18_small .. hrnet_w64, *_ssld; *_seg: HRNetV2 "
                                "segmentation from a classification or segmentation checkpoint)")
def from_timm_hrnet(name: str, state_dict: StateDict, *, seed: int = 0, **timm_kwargs):
    """Imports a timm HRNet state dict as ``(model, variables)``; see the module docstring."""
    state_dict = _strip_training_wrapper(state_dict)
    model = registry.create_model(name, **_model_kwargs(name, state_dict, timm_kwargs))
    dummy = jnp.zeros((1, 32, 32, model.in_chans), jnp.float32)
    segmentation = name.endswith("_seg")
    if segmentation and "last_layer.3.weight" not in state_dict:
        state_dict = {k: v for k, v in state_dict.items() if not _CLASSIFICATION_NECK.match(k)}
    converted = convert_state_dict(state_dict)
    if segmentation and "last_layer.3.weight" not in state_dict:
        converted.update(_fresh_segmentation_head(model, seed))
    template = abstract_variables(model, dummy)
    variables = fit_to_template(template, converted, source=f"timm {name}")
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


def _fresh_segmentation_head(model: HRNetSegmentation, seed: int) -> dict[str, np.ndarray]:
    """Newly initialized HRNetV2 head variables, flat under 'params/head/...' and
    'batch_stats/head/...'; only the head is initialized, the backbone is not run."""
    head = HRNetV2Head(model.num_classes, model.drop_rate, model.bn_momentum, model.dtype)
    branches = [jnp.zeros((1, 1, 1, c), jnp.float32) for c in model.stages[-1].out_channels]
    variables = meta.unbox(head.init(jax.random.PRNGKey(seed), branches))
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    return {f"{k.split('/', 1)[0]}/head/{k.split('/', 1)[1]}": np.asarray(v)
            for k, v in flat.items()}
