"""model.safetensors: the network without a pickle.

`save_weights` writes the network's state dict as safetensors (plain tensors and a JSON header:
loading it runs no code). `load_network` rebuilds the exact fastai network from metadata.json alone
(`create_vision_model` with the recorded architecture, outputs and head arguments, no pretrained
download), on the meta device so no memory is spent on a random initialisation, then puts the
weights in with `load_state_dict(strict=True, assign=True)`: a missing, extra or misshapen tensor
is an error, never a half-loaded model.

    from models.contract import read_metadata
    from models.weights import load_network
    net = load_network("models/mnist/model.safetensors", read_metadata("models/mnist"))

The architecture comes from `arch_builders()`, an allow-list of torchvision constructors keyed by the
names `models.contract.ARCHS` accepts: a name read from a file is looked up, never `getattr`-ed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.contract import ARCHS, ModelFolderError, ModelMetadata

__all__ = ["arch_builders", "save_weights", "build_network", "load_network"]


def arch_builders() -> dict:
    """`models.contract.ARCHS` -> torchvision constructor (imported here, on first use)."""
    from torchvision.models import resnet18, resnet34, resnet50
    builders = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
    return {name: builders[name] for name in ARCHS}


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """The model's state dict as safetensors, every tensor contiguous and on the CPU (safetensors
    stores raw buffers: a channels-last or a GPU tensor must be copied out first)."""
    from safetensors.torch import save
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # through bytes: `save_file` creates the file owner-only (0600), unlike every other file of the folder
    Path(path).write_bytes(save(state, metadata={"format": "pt"}))  # "pt": what transformers' loaders check
    return Path(path)


def build_network(meta: ModelMetadata, device: str | torch.device = "meta") -> torch.nn.Module:
    """fastai's vision model as `vision_learner` built it, from the metadata alone, with no weights
    (on the meta device by default: shapes only, no memory, no initialisation cost)."""
    from fastai.vision.learner import create_vision_model
    builders = arch_builders()
    if meta.arch not in builders:
        raise ModelFolderError(f"cannot rebuild a {meta.arch!r}: known architectures are {', '.join(builders)}")
    with torch.device(device):
        return create_vision_model(builders[meta.arch], meta.n_out, pretrained=False, n_in=meta.input_channels,
                                   **meta.head.kwargs())


def load_network(path: Path, meta: ModelMetadata) -> torch.nn.Module:
    """The network of `meta` with the weights in `path`, on the CPU, in eval mode. Raises
    `ModelFolderError` (one line) for a file that is not safetensors or does not fit the network."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFolderError(f"cannot load {path}: not a safetensors file ({e})") from None
    model = build_network(meta)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # missing/unexpected keys, wrong shapes: say which, in one line
        reason = " ".join(str(e).split())
        raise ModelFolderError(f"cannot load {path}: its tensors do not fit a {meta.arch} with {meta.n_out} "
                               f"outputs as metadata.json describes ({reason[:300]})") from None
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the state dict did not cover (strict=True should have caught it)
        raise ModelFolderError(f"cannot load {path}: no weights for {', '.join(left[:3])}")
    return model.eval()
