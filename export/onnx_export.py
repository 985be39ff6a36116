"""PyTorch -> ONNX for one network: torch's dynamo exporter with the contract's dynamic
axes, then clean-up with polygraphy's constant folding and onnx-graphsurgeon."""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from sdtrt.errors import InvalidInputError
from sdtrt.export.networks import Axis, Network

# protobuf cannot serialise a message over 2 GiB: bigger graphs keep weights outside.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# The batch axes' bound while tracing; the graph carries none (tested: 128 rows run).
# diffusers' Upsample2D branches on batch >= 64 (a .contiguous() against a CUDA kernel's
# limit, nothing in the graph): under a bound of 1024 torch.export failed on that guard and
# the exporter traced the UNet and the VAE decoder a second time with this bound.
BATCH_DIM_MAX = 63
_DIM_IDENTIFIERS = {"B": "batch", "2B": "batch2", "H": "height", "W": "width", "h": "lh", "w": "lw"}


def export_network(
    network: Network, module: torch.nn.Module, path: Path, *, precision: str, opset: int
) -> None:
    """Write ``network`` as ``path`` (plus ``path.data`` when the weights exceed 1 GiB)."""
    wrapper = network.wrap(module).eval()
    if precision == "fp16":
        # TensorRT 11's strongly typed builds take their precision from the graph, so fp16
        # is baked in here, on a copy: the caller's module stays fp32.
        wrapper = _fp16_copy(wrapper)
    samples = network.sample_inputs(precision)
    weight_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch, "raw.onnx")
        with torch.no_grad(), _exporter_quiet():
            torch.onnx.export(
                wrapper,
                tuple(samples.values()),
                str(raw),
                dynamo=True,
                opset_version=opset,
                input_names=list(network.inputs),
                output_names=list(network.outputs),
                dynamic_shapes=_dynamic_shapes(network),
                external_data=weight_bytes >= EXTERNAL_DATA_THRESHOLD,
                verbose=False,
            )
        del wrapper
        raw_data = raw.with_name(raw.name + ".data")
        model = onnx.load(str(raw), load_external_data=False)
        _check_opset(model, opset, network.name)
        if raw_data.exists():
            # Weights kept outside (the SD UNet): loading, folding and re-saving would hold
            # them three times over in memory. The exporter's optimiser has folded
            # constants already; only the axis names and the data file's name change.
            _relocate_external_data(model, f"{path.name}.data")
            raw_data.replace(path.with_name(f"{path.name}.data"))
        else:
            model = clean_graph(model)
        _name_dynamic_axes(model, network)
        onnx.save(model, str(path))
    for written in (path, path.with_name(f"{path.name}.data")):
        if written.exists():
            written.chmod(0o644)
    onnx.checker.check_model(str(path))


def _check_opset(model: onnx.ModelProto, opset: int, name: str) -> None:
    """torch's exporter writes opset 18 and converts up to the opset asked for; where its
    converter cannot (an opset past what onnx knows, or an operator without an adapter), it
    logs a warning and leaves the graph at 18 with newer operators in it, which the checker
    then rejects with a traceback. Refused here, saying what to do."""
    declared = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if declared != opset:
        raise InvalidInputError(
            f"torch's ONNX exporter could not write {name} at opset {opset}: its version "
            f"converter left the graph at opset {declared} (the warnings above say why); "
            "choose a lower opset (20, the default, is the one sdtrt is tested with)"
        )


@contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter's console noise on every run, none of it about our graphs: one line per
    torchvision operator it cannot register (torchvision is not a dependency), torch's own
    pytree deprecation warnings, and a note on each dynamic axis that shares another's
    constraints (the UNet's 2B). Real warnings and errors still show."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def _fp16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An fp16 copy that never holds a second fp32 copy of the weights (the SD UNet's are
    3.4 GB): deepcopy is handed each tensor's fp16 version in advance through its memo."""
    memo: dict[int, object] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        half = tensor.detach().half() if tensor.is_floating_point() else tensor.detach().clone()
        if isinstance(tensor, torch.nn.Parameter):
            half = torch.nn.Parameter(half, requires_grad=False)
        memo[id(tensor)] = half
    return copy.deepcopy(module, memo)


def _relocate_external_data(model: onnx.ModelProto, location: str) -> None:
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location


def _dynamic_shapes(network: Network) -> dict[str, dict[int, object] | None]:
    dims: dict[str, object] = {}

    def dim(axis: Axis) -> object:
        name, multiple = axis
        if name not in dims:
            identifier = _DIM_IDENTIFIERS[name]
            if multiple == 1:
                dims[name] = Dim(identifier, min=1, max=BATCH_DIM_MAX)
            else:
                # min 2: torch.export specialises a free size of 1.
                dims[name] = multiple * Dim(f"{identifier}_units", min=2, max=4096)
        return dims[name]

    return {
        name: {i: dim(a) for i, a in enumerate(axes) if isinstance(a, tuple)} or None
        for name, axes in network.inputs.items()
    }


def _name_dynamic_axes(model: onnx.ModelProto, network: Network) -> None:
    """The exporter names axes after its symbols ("2*lh_units"); give the graph's inputs and
    outputs the contract's names (2B, h, w...), which TensorRT profiles and users read."""
    contract = {**network.inputs, **network.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        for dim, axis in zip(value.type.tensor_type.shape.dim, contract[value.name], strict=True):
            if isinstance(axis, tuple):
                dim.dim_param = axis[0]


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants (polygraphy) and drop dead nodes, toposorted (onnx-graphsurgeon).
    Only for graphs under ``EXTERNAL_DATA_THRESHOLD``: folding serialises the whole model
    for ONNX Runtime, which protobuf's 2 GiB limit forbids for bigger ones."""
    import onnx_graphsurgeon as gs
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        model = fold_constants(model, error_ok=True)
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)
