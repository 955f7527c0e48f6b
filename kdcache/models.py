"""timm models: create, load local weights safely, save checkpoints.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors, so
loading never unpickles arbitrary objects. kdcache writes its own checkpoints
as ``{"model": state_dict, "arch": name, "num_classes": C, ...}`` with plain
Python values only; plain state dicts and timm's ``{"state_dict": ...}`` files
load too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, KdcacheError
from .outputs import write_atomic


def create_model(name: str, num_classes: int, img_size: int, pretrained: bool = False) -> nn.Module:
    """A timm model with a `num_classes` head, built for `img_size` inputs where it needs to know."""
    import timm

    if not timm.is_model(name):
        raise KdcacheError(f"unknown timm model '{name}' (list them with: python -c \"import timm; print(timm.list_models())\")")
    try:
        try:  # transformers with fixed position grids (Swin, Twins, ConViT, MViT) need the size
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, img_size=img_size)
        except TypeError:  # convolutional models take any size and no img_size argument
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained:
            raise KdcacheError(
                f"could not load timm's pretrained weights for '{name}': {e}. "
                "Without network access, pass a local file with --checkpoint instead."
            ) from None
        raise


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad or unsafe file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: nn.Module, path: str | Path, name: str, allow_new_head: bool = False) -> None:
    """Load `path` into `model`, with an error that says why it does not fit.

    With `allow_new_head` (fine-tuning from weights trained on other classes),
    classifier tensors whose shape differs are skipped and the new head keeps
    its fresh initialisation; every other tensor must match.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = set()
    if allow_new_head and hasattr(model, "pretrained_cfg"):
        classifier = model.pretrained_cfg.get("classifier")
        names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        head = {k for k in own if any(n and k.startswith(n + ".") for n in names)}
    shape_bad = [k for k in state if k in own and state[k].shape != own[k].shape and k not in head]
    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    if shape_bad or missing or unexpected:
        parts = []
        if shape_bad:
            k = shape_bad[0]
            parts.append(f"{len(shape_bad)} tensors differ in shape (e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)")
        if missing:
            parts.append(f"{len(missing)} model tensors are missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} file tensors are not in the model (e.g. {unexpected[0]})")
        raise CheckpointError(f"checkpoint {path} does not fit model '{name}': " + "; ".join(parts))
    keep = {k: v for k, v in state.items() if not (k in head and v.shape != own[k].shape)}
    model.load_state_dict(keep, strict=not allow_new_head)


def build(name: str, num_classes: int, img_size: int, pretrained: bool = False,
          checkpoint: str | None = None, allow_new_head: bool = False) -> nn.Module:
    """Create a timm model and load local weights into it if `checkpoint` is given."""
    model = create_model(name, num_classes, img_size, pretrained=pretrained and not checkpoint)
    if checkpoint:
        load_weights(model, checkpoint, name, allow_new_head=allow_new_head)
    return model


@torch.inference_mode()
def check_input_size(model: nn.Module, name: str, img_size: int, device: torch.device) -> None:
    """One forward of a blank batch of one `img_size` image, so a size the model cannot take fails now.

    Some architectures fail only deep inside the first step (a kernel larger
    than the feature map, a size that is not a multiple of the patch); this
    turns that into one line before any data is read or file written. The
    model is left in eval mode; the training loop sets train mode itself.
    """
    model.eval()
    try:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model {name} cannot take --img-size {img_size} inputs: {first}") from None


def checkpoint_bytes(model: nn.Module) -> int:
    """About how many bytes :func:`save_checkpoint` writes for `model` (its tensors)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def save_checkpoint(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> None:
    """Write the weights with plain metadata, atomically (see :func:`kdcache.outputs.write_atomic`)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(path, lambda f: torch.save({"model": state, **meta}, f))


def save_checkpoint_elsewhere(model: nn.Module, meta: dict[str, Any]) -> Path | None:
    """The checkpoint saved in a new folder under the system's temporary folder, or None if that fails too."""
    import tempfile

    try:
        path = Path(tempfile.mkdtemp(prefix="kdcache-model-")) / "model.pt"
        save_checkpoint(model, path, meta)
        return path
    except (OSError, KdcacheError):
        return None


PROJECTOR = "projector.safetensors"  # a feature-KD student's projector, saved next to its model.pt


def save_projector(projector: nn.Linear, path: str | Path) -> None:
    """The pooled-feature projector (student width -> teacher width) as safetensors, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    write_atomic(path, lambda f: f.write(save(state, {"in_features": str(projector.in_features),
                                                      "out_features": str(projector.out_features)})))


def load_projector(path: str | Path) -> nn.Linear:
    """A projector saved by :func:`save_projector`."""
    state = read_state_dict(path)
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        raise CheckpointError(f"{path} is not a kdcache projector (expected a weight and a bias)")
    out_features, in_features = state["weight"].shape
    projector = nn.Linear(in_features, out_features)
    projector.load_state_dict(state)
    return projector
