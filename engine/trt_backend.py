"""The TensorRT backend: one engine and execution context per network.

Activation memory is one buffer shared by the four contexts (they run one after another
on one stream); I/O buffers are torch CUDA tensors allocated once for the profile's
maximum and viewed per request; everything is enqueued on torch's current stream, so the
denoising loop never waits on the host. Outputs are handed out as fresh float32 tensors,
never views of those buffers: the next call overwrites them, and schedulers keep model
outputs across steps (PNDM's ``ets``), as NVIDIA's demo clones its engine outputs for.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from sdtrt.engine.base import UnetCall
from sdtrt.engine.cuda_graphs import CudaGraphed
from sdtrt.engine.trt_build import (
    build_missing_engines,
    default_engine_dir,
    engine_key,
    gpu_identity,
    require_tensorrt,
)
from sdtrt.engine.trt_cache import find_engine, has_engine
from sdtrt.engine.trt_family import RuntimeCacheFile, trt_module
from sdtrt.engine.trt_profile import (
    check_request,
    fill_rows,
    max_rows,
    padded_shapes,
    pixel_range,
)
from sdtrt.errors import EngineMismatchError
from sdtrt.export.folder import ExportedModel
from sdtrt.export.networks import NETWORK_NAMES, Network, UNet
from sdtrt.options import BuildOptions, TensorRTOptions

if TYPE_CHECKING:  # TensorRT is imported lazily: machines without it still load this module
    import tensorrt as trt

logger = logging.getLogger(__name__)


class TrtNetwork:
    """One deserialised engine with its context and preallocated I/O buffers."""

    def __init__(
        self,
        trt: Any,
        runtime: trt.Runtime,
        path: Path,
        sidecar: dict[str, Any],
        log: Any,
        contract: Network,
        captured: bool = False,
    ) -> None:
        self.name = sidecar["network"]
        self.contract = contract
        self.profile = sidecar["profile"]
        family = sidecar.get("family", "tensorrt")
        log.errors.clear()
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            reason = "; ".join(log.errors) or "no reason given"
            raise EngineMismatchError(f"{family} could not deserialise {path}: {reason}")
        self.runtime_cache: RuntimeCacheFile | None = None
        self._shapes_seen: set[tuple[tuple[int, ...], ...]] = set()
        self._padding_said = False
        self.cache_dirty = False
        # TensorRT-RTX can say whether its enqueue may be captured; asked only where one is.
        self.asks_capturable = captured and family == "tensorrt-rtx"
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if family == "tensorrt-rtx":
            # The kernels TensorRT-RTX compiles on first run, kept per engine and GPU.
            config: Any = self.engine.create_runtime_config()  # TensorRT-RTX's API
            config.set_execution_context_allocation_strategy(strategy)
            cc = "".join(str(v) for v in torch.cuda.get_device_capability())
            cache_path = path.with_name(f"{path.stem}.sm{cc}.runtime-cache")
            self.runtime_cache = RuntimeCacheFile(cache_path, config.create_runtime_cache())
            config.set_runtime_cache(self.runtime_cache.cache)
            if captured:
                # A graph replays the kernels its capture saw: compile the shape-specialised
                # ones at the warm run before it (blocking), not in the background while the
                # capture records the generic fallbacks (TensorRT-RTX's default, LAZY).
                eager = trt.DynamicShapesKernelSpecializationStrategy.EAGER
                config.dynamic_shapes_kernel_specialization_strategy = eager
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context(strategy)
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.buffers: dict[str, torch.Tensor] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs).append(name)
        for name in self.inputs + self.outputs:  # outputs' sizes need every input's
            dtype = _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            self.buffers[name] = torch.empty(self._max_elements(name), dtype=dtype, device="cuda")

    def _max_elements(self, name: str) -> int:
        if name in self.profile:
            return math.prod(self.profile[name]["max"])
        if name in self.inputs:
            return math.prod(_dims(self.engine.get_tensor_shape(name)))
        # An output's largest shape: set every input to its profile maximum and ask.
        for inp in self.inputs:
            if inp in self.profile:
                self.context.set_input_shape(inp, tuple(self.profile[inp]["max"]))
        return math.prod(_dims(self.context.get_tensor_shape(name)))

    @property
    def device_memory_size(self) -> int:
        return int(self.engine.device_memory_size_v2)

    def bind(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Copy inputs into their buffers and point the context at them; returns the view
        the output will be written to. The shapes are checked against the profile first; a
        call of fewer rows than it takes is padded to them (``padded_shapes``), its answer
        the call's rows."""
        shapes = {k: tuple(v.shape) for k, v in inputs.items()}
        padded = padded_shapes(self.contract, self.profile, shapes)
        if padded is not None:
            rows, shapes = padded
            if not self._padding_said:
                self._padding_said = True
                logger.info(
                    "%s: a call of %d rows, fewer than the engine's profile takes, is padded "
                    "to its least (so are later ones); an engine built for fewer runs them "
                    "without",
                    self.name,
                    rows,
                )
        check_request(self.name, self.profile, shapes)
        if self.runtime_cache is not None:
            seen = tuple(shapes.values())
            if seen not in self._shapes_seen:
                self._shapes_seen.add(seen)
                self.cache_dirty = True  # TensorRT-RTX compiles kernels for a new shape
        for name, tensor in inputs.items():
            shape = shapes[name]
            buffer = self.buffers[name][: math.prod(shape)].view(shape)
            fill_rows(buffer, tensor)
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, buffer.data_ptr())
        for extra in self.outputs:  # optimum's text encoder also gives pooler_output
            self.context.set_tensor_address(extra, self.buffers[extra].data_ptr())
        output = self.contract.output_name
        shape = _dims(self.context.get_tensor_shape(output))
        out = self.buffers[output][: math.prod(shape)].view(shape)
        self.context.set_tensor_address(output, out.data_ptr())
        return out if padded is None else out[:rows]

    def enqueue(self) -> None:
        stream = torch.cuda.current_stream().cuda_stream
        rtx_context: Any = self.context  # is_stream_capturable: TensorRT-RTX's API
        if (
            self.asks_capturable
            and torch.cuda.is_current_stream_capturing()
            and not rtx_context.is_stream_capturable(stream)
        ):
            raise EngineMismatchError(
                f"the {self.name} engine cannot be captured in a CUDA graph (TensorRT-RTX "
                "engines need REQUIRE_USER_ALLOCATION, which sdtrt's builds set: rebuild it); "
                "run without --cuda-graphs/--step-graphs"
            )
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.name}")

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.bind(self.contract.feeds(**inputs))
        self.enqueue()
        return out


def _recording_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps the errors, so a failure can say TensorRT's reason."""

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)
                logger.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                logger.warning("TensorRT: %s", msg)

    return RecordingLogger()


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
}


def owned(output: torch.Tensor) -> torch.Tensor:
    """A float32 copy of an engine's output buffer that the caller owns (``.float()`` would
    hand out the buffer itself when the engine's output is already float32)."""
    return output.to(torch.float32, copy=True)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, exported: ExportedModel, options: TensorRTOptions = TensorRTOptions()):
        family = options.family
        require_tensorrt(family)
        trt = trt_module(family)
        self.name = family
        precision = options.precision
        self.device = torch.device("cuda")
        self.size_multiple = exported.dims.size_multiple
        engine_dir = Path(options.engine_dir) if options.engine_dir else None
        engine_dir = engine_dir or default_engine_dir(exported)
        gpu = gpu_identity()
        if options.build_missing:
            build_missing_engines(exported, precision, engine_dir, family, gpu)
        self.trt_logger = _recording_logger(trt)
        runtime = trt.Runtime(self.trt_logger)

        graphs = options.cuda_graphs or options.step_graphs

        def load(network: str, precision: str) -> TrtNetwork:
            # Found from the sidecar, before deserialising: a mismatch names its field, an
            # RTX engine whose targets miss this GPU names both.
            key = engine_key(exported, network, precision, BuildOptions(), family)
            path, sidecar = find_engine(engine_dir, key, gpu)
            contract = exported.network(network, precision)
            captured = graphs and network == "unet"
            return TrtNetwork(trt, runtime, path, sidecar, self.trt_logger, contract, captured)

        self.networks = {network: load(network, precision) for network in NETWORK_NAMES}
        self.fp32_decoder = None
        fp16_vae = exported.network_precision("vae_decoder", precision) == "fp16"
        if fp16_vae and "fp32" in exported.precisions:
            # An fp32 decoder engine, if one was built, is the fallback for fp16 overflow.
            # None built: no fallback. One built for something else: EngineMismatchError, as
            # for any engine (a stale one must not silently turn the fallback off).
            if has_engine(engine_dir, "vae_decoder", "fp32", family):
                self.fp32_decoder = load("vae_decoder", "fp32")
        shared = max(n.device_memory_size for n in self.networks.values())
        self.activations = torch.empty(shared, dtype=torch.uint8, device="cuda")
        for network in self.networks.values():
            network.context.set_device_memory(self.activations.data_ptr(), shared)
        if self.fp32_decoder is not None:
            size = self.fp32_decoder.device_memory_size
            self.fp32_activations = torch.empty(size, dtype=torch.uint8, device="cuda")
            self.fp32_decoder.context.set_device_memory(self.fp32_activations.data_ptr(), size)
        unet = self.networks["unet"]
        self.per_row_timesteps = cast(UNet, unet.contract).per_row_timesteps
        self.max_unet_rows: int | None = max_rows(unet.profile)
        engines = [*self.networks.values()]
        if self.fp32_decoder is not None:
            engines.append(self.fp32_decoder)
        self.max_image_rows: int | None = min(max_rows(n.profile) for n in engines if n is not unet)
        # Sizes outside the profiles are refused before a request takes any work.
        self.pixel_range = pixel_range([(n.contract, n.profile) for n in engines])
        # Steps that are not tabulated replay the UNet alone.
        self._graphed_unet = CudaGraphed(self._unet_enqueue) if graphs else None
        self._unet_net = unet
        # What the pipeline captures whole steps around (runtime/step_graph.py).
        self.step_unet: UnetCall | None = self._step_unet if options.step_graphs else None

    def save_runtime_caches(self) -> None:
        """TensorRT-RTX: keep the kernels compiled for new shapes for the next process."""
        for network in [*self.networks.values(), self.fp32_decoder]:
            if network is not None and network.runtime_cache is not None and network.cache_dirty:
                network.runtime_cache.save()
                network.cache_dirty = False

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return owned(self.networks["text_encoder"](input_ids=input_ids.to(self.device)))

    def _unet_enqueue(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        # Fed already (unet below): nothing here may wait on the GPU inside a graph capture.
        net = self._unet_net
        out = net.bind({"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden})
        net.enqueue()
        return out

    def _fed(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The UNet's inputs on the GPU, in the engine's dtypes and timestep shape."""
        feeds = self._unet_net.contract.feeds(
            sample=sample.to(self.device),
            timestep=timestep.to(self.device),
            encoder_hidden_states=hidden.to(self.device),
        )
        return feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]

    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        if self._graphed_unet is not None:
            args = self._fed(sample, timestep, encoder_hidden_states)
            return self._graphed_unet(*args).float()  # the graph's output is a clone already
        return self._step_unet(sample, timestep, encoder_hidden_states)

    def _step_unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """The UNet enqueued as it comes, as eager calls and captured steps make it: casts,
        the copy into the engine's buffers, the enqueue and the copy out all go on the
        stream, and so into a step's graph (one timestep for every row: a step's rows are
        at one step)."""
        return owned(self._unet_enqueue(*self._fed(sample, timestep, hidden)))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return owned(self.networks["vae_encoder"](sample=image.to(self.device)))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        out = owned(self.networks["vae_decoder"](latent_sample=latents.to(self.device)))
        if self.fp32_decoder is not None and not torch.isfinite(out).all():
            logger.warning("the fp16 VAE decoder overflowed: decoding again with the fp32 engine")
            out = owned(self.fp32_decoder(latent_sample=latents.to(self.device)))
        self.save_runtime_caches()  # the end of a request
        return out

    def synchronize(self) -> None:
        torch.cuda.synchronize()
