"""Import a torchvision-layout AlexNet or VGG state dict (``zfserve import torchvision``) as a model directory.

torchvision keeps a model's layers in two ``nn.Sequential`` s, so a checkpoint's keys are ``features.N.weight``
/ ``.bias`` (N counts every slot of ``features``: convs, ReLUs, pools and, in the BN variants, BatchNorm2d with
``running_mean`` / ``running_var`` / ``num_batches_tracked``) and ``classifier.N.weight`` / ``.bias``. The
table below maps those slots onto the layer names of :mod:`zfserve.architecture`; BatchNorm is folded into the
conv before it (:func:`zfserve.model.fold_batchnorm_`), so ``vgg16_bn`` becomes a plain ``vgg16``. Conv widths,
fc width and classes are read from the tensors (free); kernels, strides and the layer count are the
architecture's and are checked.

Every problem is one :class:`~zfserve.errors.ModelLoadError` naming the key and what was expected, found before
anything is written; the directory is written beside ``out`` and renamed into place, so a failed import leaves
nothing. ``.pth`` / ``.pt`` files are read only with PyTorch's weights-only loader (never a plain pickle load).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import architecture as arch
from .config import TORCHVISION_MEAN, TORCHVISION_SCALE, TORCHVISION_STD, ModelConfig, PreprocessConfig
from .errors import ModelLoadError

# What ``--arch`` accepts: torchvision's names (the _bn variants fold into their plain architecture).
ARCHS = ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
TORCHVISION_PREPROCESS = dict(resize=256, crop=224, scale=TORCHVISION_SCALE, mean=TORCHVISION_MEAN,
                              std=TORCHVISION_STD)
BN_KEYS = ("weight", "bias", "running_mean", "running_var")
BN_EPS = 1e-5          # torchvision's BatchNorm2d default, which its VGG-BN models use
MAX_CLASS_NAME = 200


@dataclass(frozen=True)
class Slot:
    """One weighted layer of the torchvision layout: its key prefix, our layer name, and its BatchNorm's prefix
    (BN variants)."""

    prefix: str
    layer: arch.Layer
    bn: str | None = None


def layout(name: str) -> list[Slot]:
    """The weighted slots of torchvision's ``name`` (an entry of :data:`ARCHS`), in forward order."""
    if name not in ARCHS:
        raise ModelLoadError(f"--arch: {name!r}; accepted: {', '.join(ARCHS)}")
    base, bn = name.removesuffix("_bn"), name.endswith("_bn")
    table = arch.layer_table(base, arch.DEFAULT_WIDTHS[base], 4096, 1000)
    convs = [layer for layer in table if layer.kind == "conv"]
    fcs = [layer for layer in table if layer.kind == "fc"]
    slots, index = [], 0
    if base == "alexnet":   # Conv ReLU Pool Conv ReLU Pool Conv ReLU Conv ReLU Conv ReLU Pool
        slots = [Slot(f"features.{i}", layer) for i, layer in zip((0, 3, 6, 8, 10), convs)]
        return slots + [Slot(f"classifier.{i}", layer) for i, layer in zip((1, 4, 6), fcs)]
    for layer in table:     # VGG: Conv [BN] ReLU per conv, one slot per pool
        if layer.kind == "conv":
            slots.append(Slot(f"features.{index}", layer, f"features.{index + 1}" if bn else None))
            index += 3 if bn else 2
        elif layer.kind == "pool":
            index += 1
    return slots + [Slot(f"classifier.{i}", layer) for i, layer in zip((0, 3, 6), fcs)]


def expected_keys(name: str) -> list[str]:
    """Every key a torchvision ``name`` state dict holds, ``num_batches_tracked`` (optional) left out."""
    keys = []
    for slot in layout(name):
        keys += [f"{slot.prefix}.weight", f"{slot.prefix}.bias"]
        if slot.bn:
            keys += [f"{slot.bn}.{part}" for part in BN_KEYS]
    return keys


def _fitting(state: dict) -> list[str]:
    """The architectures whose keys are exactly these (for the hint in a mismatch message)."""
    keys = {k for k in state if not k.endswith(".num_batches_tracked")}
    return [name for name in ARCHS if set(expected_keys(name)) == keys]


def _shape(t) -> tuple:
    return tuple(int(d) for d in t.shape)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a ``.safetensors`` file, or a ``.pth`` / ``.pt`` file read with
    ``torch.load(weights_only=True)`` (a dict of tensors, or one under ``state_dict`` / ``model``)."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from .weights import read_tensors
        return read_tensors(path)
    if path.suffix not in (".pth", ".pt"):
        raise ModelLoadError(f"{path}: unknown weights format {path.suffix!r}; accepted: .safetensors, .pth, .pt "
                             f"(a torchvision state dict)")
    try:
        with warnings.catch_warnings():   # its note on pickle protocols is about the loader, not the user's file
            warnings.simplefilter("ignore")
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler's refusals and truncation, as one line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # The unpickler's own reason (the line after "WeightsUnpickler error:": an unsupported global or opcode,
        # a truncated file), without torch's advice to retry with weights_only=False, which would run its code.
        marker = next((i for i, line in enumerate(lines) if line.endswith("WeightsUnpickler error:")), None)
        reason = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else \
            (lines[0] if lines and "weights_only" not in lines[0] else type(exc).__name__)
        raise ModelLoadError(f"{path}: not a weights-only PyTorch checkpoint: only tensors are read from .pth files "
                             f"({reason})") from None
    if isinstance(loaded, dict) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        nested = [loaded[k] for k in ("state_dict", "model") if isinstance(loaded.get(k), dict)]
        loaded = nested[0] if nested else loaded
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in loaded.items()):
        raise ModelLoadError(f"{path}: expected a state dict (names -> tensors, or one under 'state_dict' or "
                             f"'model'), got {type(loaded).__name__}")
    return loaded


def _check_keys(state: dict, name: str) -> None:
    expected = expected_keys(name)
    known = set(expected) | {f"{s.bn}.num_batches_tracked" for s in layout(name) if s.bn}
    fits = [a for a in _fitting(state) if a != name]
    hint = f"; the keys fit {', '.join(fits)}" if fits else ""
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(f"{name}: key {missing[0]!r} is missing ({len(missing)} of {len(expected)} expected keys "
                             f"missing{hint})")
    extra = sorted(k for k in state if k not in known)
    if extra:
        raise ModelLoadError(f"{name}: unexpected key {extra[0]!r} ({len(extra)} keys that {name} does not have"
                             f"{hint})")


def _check_tensor(key: str, tensor, expected: tuple, what: str) -> None:
    """``expected``: the shape, with None for a free dimension (shown as C or F)."""
    import torch
    shape = _shape(tensor)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        shown = _fmt("C" if e is None else e for e in expected)
        raise ModelLoadError(f"{key}: shape {_fmt(shape)}; expected {shown} for {what}")
    if not tensor.is_floating_point():
        raise ModelLoadError(f"{key}: dtype {tensor.dtype}; expected a floating-point tensor")
    if not bool(torch.isfinite(tensor).all()):
        raise ModelLoadError(f"{key}: holds non-finite values (NaN or infinity)")


def convert(state: dict, name: str, input_size: int = 224) -> tuple[dict, dict]:
    """Check a torchvision ``name`` state dict and turn it into (our state dict, the config's architecture
    fields: architecture, widths, fc_width, num_classes). Raises one ModelLoadError naming the first misfit."""
    import torch
    _check_keys(state, name)
    base = name.removesuffix("_bn")
    slots = layout(name)
    convs = [s for s in slots if s.layer.kind == "conv"]
    fcs = [s for s in slots if s.layer.kind == "fc"]
    out, widths, channels, previous = {}, [], 3, "the RGB input"
    for slot in convs:
        layer, key = slot.layer, f"{slot.prefix}.weight"
        what = f"{name}'s {layer.name} ({layer.kernel}x{layer.kernel}, {channels} input channels from {previous})"
        _check_tensor(key, state[key], (None, channels, layer.kernel, layer.kernel), what)
        width = _shape(state[key])[0]
        tensors = {"weight": state[key], "bias": state[f"{slot.prefix}.bias"]}
        _check_tensor(f"{slot.prefix}.bias", tensors["bias"], (width,), f"{name}'s {layer.name} ({width} filters)")
        for part in BN_KEYS if slot.bn else ():
            _check_tensor(f"{slot.bn}.{part}", state[f"{slot.bn}.{part}"], (width,),
                          f"the BatchNorm after {layer.name} ({width} channels)")
        out.update(_folded(tensors, state, slot) if slot.bn else
                   {f"{layer.name}.{k}": v.to(torch.float32) for k, v in tensors.items()})
        widths.append(width)
        channels, previous = width, layer.name
    table = arch.layer_table(base, widths, 1, 1)
    arch.check_input_size(base, table, input_size)
    side = arch.last_map_side(table, input_size)
    features = channels * side * side
    for i, slot in enumerate(fcs):
        key = f"{slot.prefix}.weight"
        reads = f"the flattened {channels} x {side} x {side} last pool" if i == 0 else fcs[i - 1].layer.name
        rows = None if i != 1 else features   # fc7 is as wide as fc6 (one fc_width)
        _check_tensor(key, state[key], (rows, features), f"{name}'s {slot.layer.name} (reading {reads}"
                                                        f"{'; fc6 and fc7 share one width' if i == 1 else ''})")
        width = _shape(state[key])[0]
        _check_tensor(f"{slot.prefix}.bias", state[f"{slot.prefix}.bias"], (width,), f"{name}'s {slot.layer.name}")
        out[f"{slot.layer.name}.weight"] = state[key].to(torch.float32)
        out[f"{slot.layer.name}.bias"] = state[f"{slot.prefix}.bias"].to(torch.float32)
        features = width
    fields = dict(architecture=base, widths=tuple(widths), fc_width=_shape(state[fcs[0].prefix + ".weight"])[0],
                  num_classes=features)
    return out, fields


def _folded(tensors: dict, state: dict, slot: Slot) -> dict:
    """A conv's weight and bias with the BatchNorm after it folded in (float32)."""
    import torch
    from .model import fold_batchnorm_
    w = tensors["weight"].to(torch.float32)
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2])
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(tensors["bias"].to(torch.float32))
    bn = {part: state[f"{slot.bn}.{part}"] for part in BN_KEYS}
    fold_batchnorm_(conv, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], BN_EPS)
    return {f"{slot.layer.name}.weight": conv.weight.detach().clone(),
            f"{slot.layer.name}.bias": conv.bias.detach().clone()}


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (UTF-8; blank lines at the end ignored, other blank lines refused)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ModelLoadError(f"--classes: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"--classes: {path}: unreadable as UTF-8 text ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    for number, text in enumerate(names, 1):
        if not text or len(text) > MAX_CLASS_NAME:
            raise ModelLoadError(f"--classes: {path} line {number}: a class name must be 1..{MAX_CLASS_NAME} "
                                 f"characters, got {len(text)}")
    if not names:
        raise ModelLoadError(f"--classes: {path} holds no class names (one per line)")
    return names


def import_torchvision(weights: str | Path, name: str, classes: str | Path, out: str | Path, *,
                       model_name: str | None = None, version: str = "1", preprocess: dict | None = None) -> Path:
    """Turn a torchvision ``name`` (:data:`ARCHS`) state dict into the model directory ``out`` (which must not
    exist, or be empty): weights.safetensors (float32, BN folded) + config.json with the class names and the
    preprocessing (torchvision's by default; ``preprocess`` overrides keys of it). Returns ``out``."""
    from .model import build
    from .weights import save_model
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"--out: {out} already exists and is not an empty directory; give a new directory")
    layout(name)
    pre = PreprocessConfig(**{**TORCHVISION_PREPROCESS, **(preprocess or {})})
    state = read_state_dict(weights)
    converted, fields = convert(state, name, pre.crop)
    names = read_class_names(classes)
    if len(names) != fields["num_classes"]:
        last = [s for s in layout(name) if s.layer.kind == "fc"][-1].prefix
        raise ModelLoadError(f"--classes: {classes} names {len(names)} classes; the weights have "
                             f"{fields['num_classes']} ({last}.weight has {fields['num_classes']} rows)")
    config = ModelConfig(name=model_name or out.name, version=str(version), class_names=names, preprocess=pre,
                         input_size=pre.crop, provenance=_provenance(weights, name), **fields)
    model = build(config)
    model.load_state_dict(converted)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-import-"))
    try:
        save_model(model, staging)
        os.chmod(staging, 0o755)   # mkdtemp makes it private; a model directory is as readable as its parent
        if out.is_dir():
            out.rmdir()            # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _provenance(weights, name: str) -> dict:
    import hashlib
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"source": "zfserve import torchvision", "torchvision_arch": name, "weights_file": Path(weights).name,
            "weights_sha256": digest.hexdigest(), "batchnorm_folded": name.endswith("_bn")}
