"""Transfer learning: start a network from the weights of a model deepyard registered (or a local
state-dict file), copy all or part of it, freeze what should not train, and unfreeze it later.

Every registered version of a supervised job carries its network's tensors (``WEIGHTS_ARTIFACT``)
and the train spec that built them (``SPEC_ARTIFACT``), so a source is rebuilt without unpickling.
The preprocessing is never copied: the new job standardizes with its own data's statistics.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepyard.errors import BadInput

WEIGHTS_ARTIFACT = "weights/state_dict.pt"
SPEC_ARTIFACT = "weights/train_spec.yaml"
_PREPROCESSING = "standardize."


@dataclass
class Source:
    state: dict[str, torch.Tensor]  # the network's tensors, named as in ``Pipeline.net``
    lineage: str | None  # "name:version" of a registered source; None for a file
    run_id: str | None = None


def is_file(ref: str) -> bool:
    return ref.endswith((".pt", ".pth")) or "/" in ref or Path(ref).expanduser().exists()


def pinned(ref: str, uri: str | None = None) -> str:
    """``ref`` with an alias resolved to the version it points at now, so that every worker (and a
    restarted one) copies the same weights even if the alias moves during the run."""
    if is_file(ref):
        return str(Path(ref).expanduser().resolve())
    from deepyard import tracking
    from deepyard.serve.options import parse_model_ref

    name, alias, version = parse_model_ref(ref)
    return f"{name}:{tracking.model_version(name, alias=alias, version=version, uri=uri)['version']}"


def load_source(ref: str, uri: str | None = None) -> Source:
    """The network tensors of ``ref``; a clear BadInput if it does not exist or holds no weights."""
    if is_file(ref):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise BadInput(f"init.from: no file {path}; give NAME@alias, NAME:version or a state-dict file")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise BadInput(f"init.from: {path} is not a PyTorch state dict ({error})") from None
        return Source(network_state(loaded, str(path)), lineage=None)
    from deepyard import tracking
    from deepyard.serve.options import parse_model_ref

    name, alias, version = parse_model_ref(ref)
    found = tracking.model_version(name, alias=alias, version=version, uri=uri)
    local = tracking.download(found["run_id"], WEIGHTS_ARTIFACT, uri)
    if local is None:
        raise BadInput(f"init.from: {name}:{found['version']} has no {WEIGHTS_ARTIFACT} (registered before "
                       "deepyard kept weights, or not a supervised network); retrain it, or pass a state-dict file")
    state = torch.load(local, map_location="cpu", weights_only=True)
    return Source(network_state(state, ref), lineage=f"{name}:{found['version']}", run_id=found["run_id"])


@functools.cache
def source_vocabulary(ref: str, uri: str | None = None) -> tuple[tuple[str, ...], str] | None:
    """A registered text model's vocabulary and token level ("word" or "char"): what its embeddings
    were trained on, so a job that starts from it codes its own text with them (as a Hugging Face
    model comes with its tokenizer). None for a state-dict file, or a model that reads no text."""
    if is_file(ref):
        return None
    from deepyard import tracking
    from deepyard.serve.options import parse_model_ref

    name, alias, version = parse_model_ref(ref)
    found = tracking.model_version(name, alias=alias, version=version, uri=uri)
    metadata = tracking.model_metadata(name, found["version"], uri)
    if not metadata.get("vocab"):
        return None
    return tuple(metadata["vocab"]), metadata.get("token_level", "word")


def network_state(loaded, where: str) -> dict[str, torch.Tensor]:
    """A network's tensors from a plain state dict, a whole pipeline's (``net.`` + preprocessing) or
    a deepyard checkpoint (``{"model": ...}``)."""
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BadInput(f"init.from: {where} holds no state dict of tensors")
    if any(key.startswith("net.") for key in loaded):
        return {key.removeprefix("net."): value for key, value in loaded.items() if key.startswith("net.")}
    return {key: value for key, value in loaded.items() if not key.startswith(_PREPROCESSING)}


def matching(names: list[str], pattern: str, where: str) -> list[str]:
    """The names ``pattern`` finds; a BadInput that lists the names if it finds none."""
    try:
        found = [name for name in names if re.search(pattern, name)]
    except re.error as error:
        raise BadInput(f"{where}: {pattern!r} is not a regular expression ({error})") from None
    if not found:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise BadInput(f"{where}: {pattern!r} matches no parameter of this network ({shown})")
    return found


def output_layer(net: nn.Module) -> list[str]:
    """The tensor names of the last module with parameters of its own: the layer that a job with a
    different number of outputs makes new."""
    last = None
    for name, module in net.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    prefix = f"{last}." if last else ""
    return [f"{prefix}{key}" for key, _ in net.get_submodule(last or "").named_parameters(recurse=False)]


def copy_plan(net: nn.Module, source: dict[str, torch.Tensor], modules: list[str] | None) -> tuple[dict, list[str]]:
    """(name -> source tensor to copy, the names left new). Every copied tensor's shape must match:
    the error names the first one that does not, but a token embedding whose vocabulary this job
    extended (its first rows are copied). Without ``modules``, everything is copied except an
    output layer whose size differs (a new head for a different number of classes)."""
    target = net.state_dict()
    names = list(target)
    chosen = names if modules is None else sorted({n for p in modules for n in matching(names, p, "init.modules")},
                                                  key=names.index)
    head = set(output_layer(net)) if modules is None else set()
    plan, fresh = {}, [name for name in names if name not in chosen]
    for name in chosen:
        if name not in source:
            raise BadInput(f"init.from: the source has no tensor {name!r} (it has {', '.join(list(source)[:8])}...): "
                           "the architectures differ; match model.params to the source's, or copy less "
                           "with init.modules")
        if source[name].shape != target[name].shape:
            if name in head:
                fresh.append(name)
                continue
            if _grown_vocabulary(name, source[name], target[name]):  # the source's tokens, then new ones
                grown = target[name].detach().clone()
                grown[: len(source[name])] = source[name]
                plan[name] = grown
                continue
            raise BadInput(f"init.from: tensor {name!r} is {tuple(source[name].shape)} in the source but "
                           f"{tuple(target[name].shape)} here; match model.params to the source's, or leave it "
                           "out of init.modules")
        plan[name] = source[name]
    return plan, fresh


def _grown_vocabulary(name: str, source: torch.Tensor, target: torch.Tensor) -> bool:
    """A token embedding whose vocabulary this job extended (``splits.fit_vocabulary``): the same
    width, more rows. The source's rows are copied; the new tokens' keep their fresh start."""
    return name.split(".")[-2:] == ["tokens", "weight"] and source.ndim == target.ndim == 2 \
        and source.shape[1] == target.shape[1] and source.shape[0] < target.shape[0]


def copy_into(net: nn.Module, plan: dict[str, torch.Tensor]) -> None:
    net.load_state_dict(plan, strict=False)


class Freezer:
    """Which parameters train: those matching ``patterns`` are frozen until ``unfreeze_at_epoch``.
    A batch norm whose parameters are all frozen keeps its running statistics too (eval mode)."""

    def __init__(self, net: nn.Module, patterns: list[str], unfreeze_at_epoch: int | None):
        names = [name for name, _ in net.named_parameters()]
        self.frozen = {n for p in patterns for n in matching(names, p, "init.freeze")}
        self.net, self.unfreeze_at_epoch = net, unfreeze_at_epoch
        self._active: bool | None = None

    def set_epoch(self, epoch: int) -> bool:
        """Freeze or unfreeze for ``epoch``; True if that changed which parameters train."""
        active = bool(self.frozen) and (self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch)
        previous, self._active = self._active, active
        for name, parameter in self.net.named_parameters():
            parameter.requires_grad_(not (active and name in self.frozen))
        return previous is not None and previous != active

    def hold_norms(self) -> None:
        """After ``model.train()``: frozen batch norms go back to eval mode (their statistics stay)."""
        if not self._active:
            return
        for name, module in self.net.named_modules():
            own = [f"{name}.{key}" if name else key for key, _ in module.named_parameters(recurse=False)]
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and own and set(own) <= self.frozen:
                module.eval()


def param_groups(net: nn.Module, groups, *, lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: the first spec group whose regex matches a name takes it; the rest
    train at ``lr`` (the first group). Empty groups are left out (a torch optimizer refuses them)."""
    # (pruning masks rename a weight to weight_orig while it fine-tunes: match the name it had)
    named = [(name.removesuffix("_orig"), parameter) for name, parameter in net.named_parameters()]
    names = [name for name, _ in named]
    taken: set[str] = set()
    built = []
    for index, group in enumerate(groups):
        members = [n for n in matching(names, group.match, f"optim.param_groups[{index}].match") if n not in taken]
        taken.update(members)
        decay = weight_decay if group.weight_decay is None else group.weight_decay
        built.append({"params": [p for n, p in named if n in members], "lr": group.lr, "weight_decay": decay})
    rest = [p for n, p in named if n not in taken]
    built.insert(0, {"params": rest, "lr": lr, "weight_decay": weight_decay})  # first: the logged `lr` is optim.lr
    return [group for group in built if group["params"]]


def pinned_spec(spec):
    """The spec with ``init.from`` pinned to a version (or an absolute file path); any other spec as it is."""
    if getattr(spec, "init", None) is None:
        return spec
    return spec.model_copy(update={"init": spec.init.model_copy(update={"from_": pinned(spec.init.from_)})})


def start_from(init, net: nn.Module, uri: str | None = None) -> tuple[Freezer, str]:
    """Copy ``init.from_``'s tensors into ``net`` and set up its freezing (``init``: the spec's
    ``InitSpec``). Returns the freezer and one line that says what was copied, left new and frozen."""
    if init.unfreeze_at_epoch is not None and not init.freeze:
        raise BadInput("init.unfreeze_at_epoch: nothing is frozen; add init.freeze regexes or leave it out")
    source = load_source(init.from_, uri)
    plan, fresh = copy_plan(net, source.state, init.modules)
    copy_into(net, plan)
    freezer = Freezer(net, init.freeze, init.unfreeze_at_epoch)
    if len(freezer.frozen) == len(list(net.parameters())) and (init.unfreeze_at_epoch or 2) > 1:
        raise BadInput("init.freeze: every parameter is frozen, so nothing would train; freeze fewer, or set "
                       "init.unfreeze_at_epoch")
    shown = lambda names: ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")  # noqa: E731
    line = f"init: {len(plan)} tensors from {source.lineage or init.from_}"
    line += f"; new: {shown(fresh)}" if fresh else ""
    line += f"; frozen: {len(freezer.frozen)} parameters" if freezer.frozen else ""
    line += f" until epoch {init.unfreeze_at_epoch}" if init.unfreeze_at_epoch else ""
    return freezer, line
