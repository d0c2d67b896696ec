"""Layer-wise onloading: decoder layers live off the compute device, one is brought in at a time.

``onload: layer`` keeps every decoder layer's weights in host memory (or, with an
``offload_dir``, in memory-mapped safetensors files there) and puts only the embeddings, the
final norm, the LM head and the layer that is running on the compute device. A forward
pre-hook on each layer brings it in (a copy of its tensors on the device) and sends the layer
that was there before home, so device memory is about one layer + its activations + the
resident parts, whatever the depth.

The layer that ran last stays on the device until another one is needed: a layer-sequential
algorithm (Wanda / SparseGPT calibration, CoMe statistics) runs a layer over every batch and
edits its weights there before moving on, at one transfer each way per layer. Code that mixes
several layers' weights (CoMe's merge) calls :func:`settle` first, so every layer is home.

Sending a layer home copies its (possibly edited) tensors back into host memory; with an
``offload_dir`` a layer whose tensors changed is written to a new safetensors file there and
mapped back (unchanged layers are just dropped from the device), so host memory holds no
layer's weights: the mappings are page cache the OS can reclaim (and glibc is asked to return
freed layer copies to the OS, :func:`return_freed_memory`). Tensors are assigned through
``tensor.data`` so that parameter objects (and everything that refers to them) stay the same.

Gradients through an onloaded stack need :func:`lightning_prune.importance.layerwise.layer_gradients`
(a layer's backward must run while it is on the device, so the stack is differentiated layer by
layer from stored layer inputs); a plain ``backward()`` would read layers that went home.
"""

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lightning_prune.capture import to_device
from lightning_prune.errors import InputError
from lightning_prune.model.anatomy import Anatomy

__all__ = [
    "ONLOAD_MODES",
    "LayerOnloader",
    "active_onloader",
    "check_onload",
    "check_device_memory",
    "finish_onload",
    "onloading",
    "settle",
    "onloaded",
    "holding",
    "edited",
    "map_tensors",
]

ONLOAD_MODES = ("none", "layer")
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, LayerOnloader]" = weakref.WeakKeyDictionary()


def check_onload(onload: str, offload_dir: str | None = None, option: str = "onload") -> None:
    """``onload`` must be none or layer; an ``offload_dir`` only goes with ``onload: layer``."""
    if onload not in ONLOAD_MODES:
        raise InputError(f"{option} {onload!r} is not known; choose one of {', '.join(ONLOAD_MODES)}")
    if offload_dir and onload != "layer":
        raise InputError(f"offload_dir {offload_dir!r} keeps onloaded layers on disk; it needs {option} layer")


def _gib(size: int) -> str:
    """A byte count in the largest binary unit that keeps it >= 1 (e.g. ``1.62 GiB``)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def check_device_memory(config, dtype: torch.dtype, onload: str, budget: str | None) -> None:
    """Refuse a ``max_device_memory`` that cannot hold what the run puts on the device (before any weight loads).

    With ``onload: layer`` that is one decoder layer plus the embeddings, final norm and head;
    otherwise the whole model. Activations come on top and are not counted.
    """
    if budget is None:
        return
    from transformers import AutoModelForCausalLM

    from lightning_prune.results import size_bytes

    limit = size_bytes(budget, "max_device_memory")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = Anatomy(model).layers
    layer = sum(t.numel() * t.element_size() for t in _tensors(layers[0]))
    total = sum(t.numel() * t.element_size() for t in _tensors(model))
    resident = total - layer * len(layers)
    if onload == "layer" and resident + layer > limit:
        raise InputError(
            f"max_device_memory {budget} cannot hold one decoder layer ({_gib(layer)}) plus the embeddings, final norm and "
            f"head ({_gib(resident)}) in {str(dtype).removeprefix('torch.')}; allow at least {_gib(resident + layer)} plus activations"
        )
    if onload != "layer" and total > limit:
        raise InputError(
            f"max_device_memory {budget} cannot hold the whole model ({_gib(total)} in {str(dtype).removeprefix('torch.')}); "
            f"use onload layer (one layer at a time needs {_gib(resident + layer)}) or a smaller dtype"
        )


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` (shared ones once)."""
    seen, found = set(), []
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            found.append(tensor)
    return found


def map_tensors(sources: list[tuple[str, str]]) -> list[torch.Tensor]:
    """Tensors ``(file, key)`` of safetensors files as fresh copy-on-write memory maps (one mapping per file and call).

    A fresh mapping holds no resident pages yet; once its tensors are dropped the pages it
    read leave this process's resident set (they stay in the OS page cache).
    """
    from safetensors import safe_open

    handles = {path: safe_open(path, "pt") for path in {path for path, _ in sources}}
    return [handles[path].get_tensor(key) for path, key in sources]


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def return_freed_memory() -> None:
    """Hand memory that glibc keeps after frees back to the OS (``malloc_trim``; nothing elsewhere).

    glibc raises its mmap threshold after large frees (up to 32 MiB), so layer-sized copies then
    come from the heap and stay resident once freed: host memory would grow with depth although
    nothing is kept. Called after each offloaded layer goes home.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


class _DiskHome:
    """Where an offloaded layer's tensors live on disk: one safetensors file per version, memory-mapped."""

    def __init__(self, offload_dir: str):
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".onload-", dir=offload_dir))
        self.writes = 0

    def store(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[str, str]]]:
        """Write ``tensors`` to a new file (temporary name, then rename); return mapped views and their (file, key) sources."""
        from safetensors.torch import save_file

        self.writes += 1
        final = self.path / f"layer-{self.writes:06d}.safetensors"
        temporary = final.with_suffix(".partial")
        save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors)}, str(temporary))
        os.replace(temporary, final)
        sources = [(str(final), str(i)) for i in range(len(tensors))]
        return map_tensors(sources), sources

    def close(self) -> None:
        """Remove the files (mapped tensors stay readable until dropped: the mappings keep them)."""
        shutil.rmtree(self.path, ignore_errors=True)


class LayerOnloader:
    """Run a model with its decoder layers off the device, one layer on it at a time.

    Args:
        model: a supported causal LM (its decoder layers are found through :class:`Anatomy`).
        device: the compute device.
        offload_dir: keep layers in memory-mapped safetensors files under this directory
            (``None``: in host memory).

    Attributes:
        onloads: layers brought to the device so far (a transfer count).
        writes: layer versions written to ``offload_dir``.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, offload_dir: str | None = None):
        self.model, self.device = model, torch.device(device)
        self.disk = _DiskHome(offload_dir) if offload_dir else None
        self.current: nn.Module | None = None
        self.held: list[nn.Module] = []
        self._homes: dict[int, torch.Tensor] = {}  # id(tensor) -> its home copy while its layer is onloaded
        self._sources: dict[int, tuple[str, str]] = {}  # data pointer of a mapped home -> (file, key) it maps
        self._handles = []
        self.attached = False
        self.onloads = 0

    @property
    def writes(self) -> int:
        return self.disk.writes if self.disk else 0

    # ----- attach / detach ------------------------------------------------------------------
    def attach(self) -> "LayerOnloader":
        """Resident parts to the device, every layer home (written to ``offload_dir`` unless already mapped), hooks on the layers."""
        if self.model in _ACTIVE:
            raise InputError("this model is already onloaded; detach the other onloader first")
        layers = list(Anatomy(self.model).layers)
        in_layers = {id(t) for layer in layers for t in _tensors(layer)}
        for tensor in _tensors(self.model):
            if id(tensor) not in in_layers:
                tensor.data = tensor.data.to(self.device)
        for layer in layers:
            self.send_home(layer)
        onloader = weakref.ref(self)

        def bring_in(module, args, kwargs):  # a plain function: deep copies of a layer share it
            active = onloader()
            if active is None or not active.attached:
                return None
            active.use(module)
            return to_device(args, active.device, detach=False), to_device(kwargs, active.device, detach=False)

        self._handles = [layer.register_forward_pre_hook(bring_in, with_kwargs=True) for layer in layers]
        self.attached = True
        _ACTIVE[self.model] = self
        return self

    def detach(self, device: torch.device | str = "cpu") -> None:
        """Send the current layer home, remove the hooks, move the resident parts to ``device``."""
        if not self.attached:
            return
        self.settle()
        for handle in self._handles:
            handle.remove()
        in_layers = {id(t) for layer in Anatomy(self.model).layers for t in _tensors(layer)}
        for tensor in _tensors(self.model):
            if id(tensor) not in in_layers:
                tensor.data = tensor.data.to(device)
        self.attached = False
        _ACTIVE.pop(self.model, None)
        if self.disk is not None:
            self.disk.close()

    # ----- moving layers ----------------------------------------------------------------------
    def use(self, layer: nn.Module) -> None:
        """Make ``layer`` the one on the device (the one there before goes home)."""
        if self._on_device(layer):
            return
        self.settle()
        self._bring(layer)
        self.current = layer

    def settle(self) -> None:
        """Send the layer on the device home (with its edits); afterwards no layer is on the device."""
        if self.current is None:
            return
        layer, self.current = self.current, None
        self._release(layer)

    @contextmanager
    def hold(self, layers) -> Iterator[None]:
        """Keep several layers on the device together inside the block (training a window of layers:
        their backward needs them all); they go home, with their edits, after it."""
        self.settle()
        self.held = list(layers)
        for layer in self.held:
            self._bring(layer)
        try:
            yield
        finally:
            held, self.held = self.held, []
            for layer in held:
                self._release(layer)

    def _on_device(self, layer: nn.Module) -> bool:
        """Whether ``layer`` is the current layer or one of the held ones."""
        return layer is self.current or any(layer is held for held in self.held)

    def _bring(self, layer: nn.Module) -> None:
        for tensor in _tensors(layer):
            self._homes[id(tensor)] = tensor.data
            tensor.data = tensor.data.to(self.device, copy=True)
        self.onloads += 1

    def _release(self, layer: nn.Module) -> None:
        tensors = _tensors(layer)
        homes = [self._homes.pop(id(t)) for t in tensors]
        if self.disk is None:
            for tensor, home in zip(tensors, homes):
                home = home if home.device.type == "cpu" and home.dtype == tensor.dtype else torch.empty_like(tensor, device="cpu")
                home.copy_(tensor.data)
                tensor.data = home
            return
        back = [t.data.cpu() for t in tensors]
        self._rehome(tensors, back, [self._sources.pop(h.data_ptr(), None) for h in homes])
        del back, homes
        return_freed_memory()

    def _rehome(self, tensors: list[torch.Tensor], values: list[torch.Tensor], sources: list) -> None:
        """Point ``tensors`` at fresh mappings of their files when ``values`` equal what the files hold, else write ``values``.

        Comparing with the file (not with the mapped home) also catches edits made to a home
        in place: those live in copy-on-write pages of this process, not in the file.
        """
        if None not in sources and _holds(map_tensors(sources), values):  # a throw-away mapping: its read pages go with it
            self._point(tensors, map_tensors(sources), sources)  # untouched: this visit's pages leave the resident set
            return
        self._map(tensors, values)

    def commit(self, layer: nn.Module) -> None:
        """After in-place edits of a layer that is home: with an ``offload_dir``, write them to disk (else nothing to do)."""
        if self.disk is None or self._on_device(layer):
            return
        tensors = _tensors(layer)
        self._rehome(tensors, [t.data for t in tensors], [self._sources.pop(t.data_ptr(), None) for t in tensors])

    def mark_mapped(self, tensors: list[torch.Tensor], sources: list[tuple[str, str]]) -> None:
        """These tensors already map ``(file, key)`` of safetensors files (a streamed checkpoint): they need no writing."""
        self._sources.update((t.data_ptr(), source) for t, source in zip(tensors, sources))

    def send_home(self, layer: nn.Module) -> None:
        """Put a layer that is not onloaded in its home: host memory, or (``offload_dir``) a mapped file."""
        tensors = _tensors(layer)
        if self.disk is None:
            for tensor in tensors:
                tensor.data = tensor.data.cpu()
        elif not all(t.data_ptr() in self._sources for t in tensors):
            self._map(tensors, [t.data for t in tensors])

    def _map(self, tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write ``values`` to a new layer file and point ``tensors`` at its mapping."""
        self._point(tensors, *self.disk.store(values))

    def _point(self, tensors: list[torch.Tensor], mapped: list[torch.Tensor], sources: list[tuple[str, str]]) -> None:
        for tensor, value, source in zip(tensors, mapped, sources):
            tensor.data = value
            self._sources[value.data_ptr()] = source

    def layer_bytes(self) -> int:
        """Bytes of the largest decoder layer (what one onload puts on the device)."""
        return max(sum(t.numel() * t.element_size() for t in _tensors(layer)) for layer in Anatomy(self.model).layers)


def _holds(stored: list[torch.Tensor], values: list[torch.Tensor]) -> bool:
    """Whether ``stored`` equals ``values`` tensor by tensor (dtype, shape and every element)."""
    return all(s.dtype == v.dtype and s.shape == v.shape and torch.equal(s, v) for s, v in zip(stored, values))


def active_onloader(model: nn.Module) -> LayerOnloader | None:
    """The onloader attached to ``model``, if any."""
    return _ACTIVE.get(model)


@contextmanager
def onloading(model: nn.Module, device: torch.device | str, offload_dir: str | None = None) -> Iterator[LayerOnloader]:
    """Inside the block ``model`` runs with its layers onloaded one at a time; after it, all of it is on the CPU."""
    onloader = LayerOnloader(model, device, offload_dir).attach()
    try:
        yield onloader
    finally:
        onloader.detach()


def finish_onload(model: nn.Module) -> None:
    """Detach the model's onloader, if any: all of the model on the CPU, the offload files removed."""
    onloader = active_onloader(model)
    if onloader is not None:
        onloader.detach()


def settle(model: nn.Module) -> None:
    """Every layer home (a no-op without an onloader): call before math that mixes several layers' weights."""
    onloader = active_onloader(model)
    if onloader is not None:
        onloader.settle()


def edited(model: nn.Module, layers) -> None:
    """Tell the model's onloader (if any) that ``layers`` were edited in place while home."""
    onloader = active_onloader(model)
    if onloader is not None:
        for layer in layers:
            onloader.commit(layer)


@contextmanager
def holding(model: nn.Module, layers) -> Iterator[None]:
    """Inside the block ``layers`` stay on the compute device together (a no-op without an onloader)."""
    onloader = active_onloader(model)
    if onloader is None:
        yield
        return
    with onloader.hold(layers):
        yield


def onloaded(model: nn.Module, layer: nn.Module) -> None:
    """Bring ``layer`` to the compute device for weight math (a no-op without an onloader)."""
    onloader = active_onloader(model)
    if onloader is not None:
        onloader.use(layer)
