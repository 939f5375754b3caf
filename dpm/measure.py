"""MACs, parameters and latency of a model (docs/method.md section 8).

Counters disagree by a few percent on the same network, so one rule holds for every row of every
table: the **headline** counter :func:`count_macs_params` is thop on a deep copy with every module
except convolutions and Linear layers mapped to zero ops, i.e. conv + linear multiply-accumulates.
That equals ``torch.utils.flop_counter.FlopCounterMode`` total / 2 and OTOv2's own counter.
ResNet-56 (1x1 projection shortcuts, 32x32 input) reads 125,747,840 MACs (125.75 M); with
zero-padding shortcuts 125,485,696 (125.49 M).

Beside it each base method's **native** counter, so a row can be set against the paper in the
paper's own units (:func:`native_macs_params`):

| pruner | counter (function) | ResNet-56 |
|---|---|---|
| depgraph | Torch-Pruning's count (+ BN, ReLU modules, pooling, biases): :func:`torch_pruning_macs_params` | 127.12 M |
| otov2 | conv + linear (same as the headline): :func:`conv_linear_macs_params` | 125.75 M |
| gate_decorator | thop's default rules (+ BN, average pooling): :func:`thop_default_macs_params` | 127.93 M |
| none | the headline: :func:`count_macs_params` | 125.75 M |

Conventions shared by every counter here:
- MACs are **per sample**: every counter runs on the first sample of the inputs (``x[:1]`` of
  each positional tensor), so a training batch may be passed as is. (Dividing a batch count by N
  would be inexact for Torch-Pruning, which adds Linear bias ops once per batch.)
- Params are ``sum(p.numel() for p in model.parameters())`` (shared tensors once, frozen ones too).
- The caller's model is never profiled: counters work on a deep copy, so its train/eval mode, its
  buffers and its BatchNorm statistics are left exactly as they were.
- Count only after physical removal (zeroed channels still cost MACs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import statistics
import time
import warnings
from typing import Any, Callable, Sequence, Union

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.conv import _ConvNd

with warnings.catch_warnings():  # thop's import warns that distutils' Version classes are deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    import thop
    from thop.vision.basic_hooks import count_convNd, count_linear, zero_ops

Inputs = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[int], None]

DEFAULT_INPUT_SHAPE: tuple[int, ...] = (1, 3, 32, 32)

# pruner name -> the counter its paper reports in; see the module docstring.
NATIVE_COUNTERS: dict[str, str] = {
    "depgraph": "torch_pruning",
    "otov2": "conv_linear",
    "gate_decorator": "thop_default",
    "none": "conv_linear",
}


def count_macs_params(
    model: nn.Module,
    example_inputs: Inputs = None,
    *,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
) -> tuple[int, int]:
    """Headline counter: conv + linear MACs per sample, and the number of parameters.

    Args:
        model: any ``nn.Module``; profiled through a deep copy, never itself.
        example_inputs: a tensor, a tuple of tensors (positional inputs), or a shape such as
            ``(1, 3, 32, 32)``; ``None`` means a random tensor of ``input_shape``. Random inputs
            are made on the model's device. Only the first sample is used: MACs are per sample.
        input_shape: shape used when ``example_inputs`` is None.

    Returns:
        ``(macs, params)`` as ints.
    """
    inputs = _resolve_inputs(model, example_inputs, input_shape)
    macs = _thop_macs(model, inputs, headline=True)
    return macs, count_params(model)


def conv_linear_macs_params(
    model: nn.Module,
    example_inputs: Inputs = None,
    *,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
) -> tuple[int, int]:
    """OTOv2's native units: conv + linear MACs. Identical to :func:`count_macs_params`."""
    return count_macs_params(model, example_inputs, input_shape=input_shape)


def thop_default_macs_params(
    model: nn.Module,
    example_inputs: Inputs = None,
    *,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
) -> tuple[int, int]:
    """Gate Decorator's native units: thop with its built-in rules (BatchNorm counts 2 ops per
    element, average pooling counts too). ResNet-56: 127,931,072 (127.93 M)."""
    inputs = _resolve_inputs(model, example_inputs, input_shape)
    macs = _thop_macs(model, inputs, headline=False)
    return macs, count_params(model)


def torch_pruning_macs_params(
    model: nn.Module,
    example_inputs: Inputs = None,
    *,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
) -> tuple[int, int]:
    """DepGraph's native units: ``torch_pruning.utils.count_ops_and_params`` (conv/linear with
    bias adds, BatchNorm, ReLU modules, pooling). ResNet-56: 127,115,914 (127.12 M)."""
    inputs = _resolve_inputs(model, example_inputs, input_shape)
    # count_ops_and_params deep-copies the model itself.
    with _quiet():
        ops, _ = tp.utils.count_ops_and_params(model, inputs)
    return int(round(ops)), count_params(model)


_NATIVE_FUNCTIONS: dict[str, Callable[..., tuple[int, int]]] = {
    "torch_pruning": torch_pruning_macs_params,
    "conv_linear": conv_linear_macs_params,
    "thop_default": thop_default_macs_params,
}


def native_macs_params(model: nn.Module, example_inputs: Inputs, pruner: str) -> tuple[str, int, int]:
    """The base method's own counter for ``pruner`` (depgraph, otov2, gate_decorator, none).

    Returns:
        ``(counter_name, macs, params)``; counter_name is one of ``torch_pruning``,
        ``conv_linear``, ``thop_default``.

    Raises:
        ValueError: unknown pruner name.
    """
    try:
        counter = NATIVE_COUNTERS[pruner]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pruner {pruner!r}; valid: {', '.join(NATIVE_COUNTERS)}") from None
    macs, params = _NATIVE_FUNCTIONS[counter](model, example_inputs)
    return counter, macs, params


def max_speedup_bound(model: nn.Module, example_inputs: Inputs, max_pruning_ratio: float = 1.0) -> float:
    """An upper bound on the conv + linear MACs speed-up any channel pruner can reach on `model`.

    Every conv / linear layer keeps at least one channel, and at least (1 - max_pruning_ratio) of
    each dimension a pruner may shrink; the input channels of layers that read the network's input
    and the outputs of the final layer never shrink. Channel couplings only lower what is reachable,
    so a target above this bound is infeasible (validated before any training starts).
    """
    inputs = _resolve_inputs(model, example_inputs, DEFAULT_INPUT_SHAPE)  # one sample
    model_input = inputs[0]
    layers: list[tuple[nn.Module, int, bool]] = []  # (layer, MACs, reads the network input)

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            macs = module.in_features * output.numel()
        else:
            macs = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        layers.append((module, int(macs), args[0].data_ptr() == model_input.data_ptr()))

    probe = copy.deepcopy(model).eval()
    handles = [m.register_forward_hook(hook) for m in probe.modules() if isinstance(m, (_ConvNd, nn.Linear))]
    with torch.no_grad():
        probe(*inputs)
    for h in handles:
        h.remove()
    if not layers:
        return 1.0
    keep = 1.0 - max_pruning_ratio
    total = minimum = 0.0
    for i, (layer, macs, reads_input) in enumerate(layers):
        n_in = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        n_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        depthwise = not isinstance(layer, nn.Linear) and layer.groups > 1 and layer.groups == n_in
        last = i == len(layers) - 1
        f_out = 1.0 if last else max(1.0 / n_out, keep)
        f_in = 1.0 if reads_input or depthwise else max(1.0 / n_in, keep)
        total += macs
        minimum += macs * f_in * f_out
    return total / max(minimum, 1e-12)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (each shared tensor once, frozen tensors included)."""
    return int(sum(p.numel() for p in model.parameters()))


def layer_widths(model: nn.Module) -> dict[str, int]:
    """The pruned architecture: each convolution's output channels and each linear layer's output
    features, by module name in definition order. Two runs at the same FLOPs % can differ in shape
    (a global ranking may leave a stage 2 channels wide); this says which shape a number belongs to."""
    return {
        name: module.out_channels if isinstance(module, _ConvNd) else module.out_features
        for name, module in model.named_modules()
        if isinstance(module, (_ConvNd, nn.Linear))
    }


def compare_models(base: tuple[int, int], pruned: tuple[int, int]) -> dict[str, float]:
    """Relate a pruned model's ``(macs, params)`` to its base model's.

    Returns:
        base_macs, pruned_macs, base_params, pruned_params (ints), flops_remaining_pct and
        params_remaining_pct (100 * pruned / base), speedup (base MACs / pruned MACs; ``inf`` when
        the pruned model has no MACs left).

    Raises:
        ValueError: a base count that is not positive, or a negative pruned count.
    """
    base_macs, base_params = (int(v) for v in base)
    pruned_macs, pruned_params = (int(v) for v in pruned)
    if base_macs <= 0 or base_params <= 0:
        raise ValueError(f"base MACs and params must be positive, got {base_macs} and {base_params}")
    if pruned_macs < 0 or pruned_params < 0:
        raise ValueError(f"pruned MACs and params must be non-negative, got {pruned_macs} and {pruned_params}")
    return {
        "base_macs": base_macs,
        "pruned_macs": pruned_macs,
        "base_params": base_params,
        "pruned_params": pruned_params,
        "flops_remaining_pct": 100.0 * pruned_macs / base_macs,
        "params_remaining_pct": 100.0 * pruned_params / base_params,
        "speedup": base_macs / pruned_macs if pruned_macs else math.inf,
    }


def measure_latency(
    model: nn.Module,
    example_inputs: Inputs = None,
    device: Union[str, torch.device] = "cpu",
    warmup: int = 10,
    reps: int = 50,
) -> float:
    """Median wall-clock milliseconds of one forward pass on ``example_inputs`` (the whole batch).

    Runs a deep copy of the model on ``device`` in eval mode under ``torch.inference_mode`` (the
    caller's model is neither moved nor switched to eval). ``warmup`` passes are discarded; on
    CUDA each timed pass is bracketed by synchronisation so the kernel time is included. A
    measurement, not a benchmark harness: compare ratios taken in one process on one machine.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    device = torch.device(device)
    inputs = tuple(t.to(device) for t in _resolve_inputs(model, example_inputs, DEFAULT_INPUT_SHAPE, per_sample=False))
    runner = copy.deepcopy(model).to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            sync()
            start = time.perf_counter()
            runner(*inputs)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


# ---- internals ---------------------------------------------------------------------------------


def _resolve_inputs(
    model: nn.Module, example_inputs: Inputs, input_shape: Sequence[int], per_sample: bool = True
) -> tuple[torch.Tensor, ...]:
    """Positional input tensors; with ``per_sample`` only the first sample of each."""
    first = _first_sample if per_sample else (lambda t: t)
    if example_inputs is None:
        example_inputs = tuple(input_shape)
    if isinstance(example_inputs, torch.Tensor):
        return (first(example_inputs),)
    items = tuple(example_inputs)
    if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        return (first(torch.randn(*items, device=device)),)
    if items and all(isinstance(v, torch.Tensor) for v in items):
        return tuple(first(t) for t in items)
    raise TypeError(f"example_inputs must be a tensor, a tuple of tensors or a shape of ints, got {example_inputs!r}")


def _first_sample(t: torch.Tensor) -> torch.Tensor:
    return t[:1] if t.dim() > 0 else t


@contextlib.contextmanager
def _quiet():
    """Silence third-party counters' prints and their import-time DeprecationWarnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _headline_ops(model: nn.Module) -> dict[type, Callable[..., Any]]:
    """thop ``custom_ops`` that keep conv and Linear MACs and zero everything else.

    Built from the model's own leaf types rather than a fixed list so that no module (a new
    activation, our zero-pad shortcut, a parametrised subclass of Conv2d) slips through with a
    thop default. Only types whose every instance is a leaf get a rule: thop treats any hooked
    module other than Sequential/ModuleList as a leaf and would skip its children.
    """
    leaf_types: set[type] = set()
    container_types: set[type] = set()
    for m in model.modules():
        (container_types if any(True for _ in m.children()) else leaf_types).add(type(m))
    ops: dict[type, Callable[..., Any]] = {}
    for t in leaf_types - container_types:
        if issubclass(t, _ConvNd):
            ops[t] = count_convNd  # thop counts no bias adds, like FlopCounterMode
        elif issubclass(t, nn.Linear):
            ops[t] = count_linear
        else:
            ops[t] = zero_ops
    return ops


def _thop_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...], headline: bool) -> int:
    with _quiet():
        # thop registers total_ops/total_params buffers on every module it visits and switches
        # the model to eval; a deep copy keeps the caller's model untouched either way.
        shadow = copy.deepcopy(model)
        custom_ops = _headline_ops(shadow) if headline else None
        ops, _ = thop.profile(shadow, inputs=inputs, custom_ops=custom_ops, verbose=False, report_missing=False)
    return int(round(ops))


__all__ = [
    "NATIVE_COUNTERS",
    "compare_models",
    "conv_linear_macs_params",
    "count_macs_params",
    "count_params",
    "measure_latency",
    "native_macs_params",
    "thop_default_macs_params",
    "torch_pruning_macs_params",
]
