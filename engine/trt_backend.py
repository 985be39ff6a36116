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
from typing import TYPE_CHECKING, Any

import torch

from sdtrt.engine.cuda_graphs import CudaGraphed
from sdtrt.engine.trt_build import build_engines, default_engine_dir, engine_key, require_tensorrt
from sdtrt.engine.trt_cache import find_engine, has_engine
from sdtrt.engine.trt_profile import check_request
from sdtrt.errors import EngineMismatchError
from sdtrt.export.folder import ExportedModel
from sdtrt.export.networks import NETWORK_NAMES
from sdtrt.options import BuildOptions, TensorRTOptions

if TYPE_CHECKING:  # TensorRT is imported lazily: machines without it still load this module
    import tensorrt as trt

logger = logging.getLogger(__name__)


class TrtNetwork:
    """One deserialised engine with its context and preallocated I/O buffers."""

    def __init__(self, runtime: trt.Runtime, path: Path, sidecar: dict[str, Any]) -> None:
        import tensorrt as trt

        self.name = sidecar["network"]
        self.profile = sidecar["profile"]
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialise {path}: rebuild it")
        self.context = self.engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED
        )
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
        the output will be written to. The shapes are checked against the profile first."""
        check_request(self.name, self.profile, {k: tuple(v.shape) for k, v in inputs.items()})
        for name, tensor in inputs.items():
            buffer = self.buffers[name][: tensor.numel()].view(tensor.shape)
            buffer.copy_(tensor, non_blocking=True)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, buffer.data_ptr())
        (output,) = self.outputs
        shape = _dims(self.context.get_tensor_shape(output))
        out = self.buffers[output][: math.prod(shape)].view(shape)
        self.context.set_tensor_address(output, out.data_ptr())
        return out

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.name}")

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.bind(inputs)
        self.enqueue()
        return out


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
        require_tensorrt()
        import tensorrt as trt

        precision = options.precision
        self.device = torch.device("cuda")
        self.size_multiple = exported.dims.size_multiple
        engine_dir = Path(options.engine_dir) if options.engine_dir else None
        engine_dir = engine_dir or default_engine_dir(exported)
        if options.build_missing:
            build_engines(exported, precision, BuildOptions(), engine_dir)
        self.trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.trt_logger)
        self.networks: dict[str, TrtNetwork] = {}
        for network in NETWORK_NAMES:
            # Found from the sidecar, before deserialising: a mismatch names its field.
            path, sidecar = find_engine(
                engine_dir, engine_key(exported, network, precision, BuildOptions())
            )
            self.networks[network] = TrtNetwork(runtime, path, sidecar)
        self.fp32_decoder = self._fp32_decoder(runtime, exported, precision, engine_dir)
        shared = max(n.device_memory_size for n in self.networks.values())
        self.activations = torch.empty(shared, dtype=torch.uint8, device="cuda")
        for network in self.networks.values():
            network.context.set_device_memory(self.activations.data_ptr(), shared)
        if self.fp32_decoder is not None:
            size = self.fp32_decoder.device_memory_size
            self.fp32_activations = torch.empty(size, dtype=torch.uint8, device="cuda")
            self.fp32_decoder.context.set_device_memory(self.fp32_activations.data_ptr(), size)
        unet = self.networks["unet"]
        self._graphed_unet = CudaGraphed(self._unet_enqueue) if options.cuda_graphs else None
        self._unet_net = unet

    def _fp32_decoder(
        self, runtime: trt.Runtime, exported: ExportedModel, precision: str, engine_dir: Path
    ) -> TrtNetwork | None:
        """An fp32 VAE decoder engine, if one was built, as the fallback for fp16 overflow.
        None built: no fallback. One built for something else: EngineMismatchError, as for
        any engine (a stale one must not silently turn the fallback off)."""
        if exported.network_precision("vae_decoder", precision) == "fp32":
            return None
        if "fp32" not in exported.precisions or not has_engine(engine_dir, "vae_decoder", "fp32"):
            return None
        key = engine_key(exported, "vae_decoder", "fp32", BuildOptions())
        path, sidecar = find_engine(engine_dir, key)
        return TrtNetwork(runtime, path, sidecar)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device, torch.int32)
        return owned(self.networks["text_encoder"](input_ids=ids))

    def _unet_enqueue(
        self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        return self._unet_net(sample=sample, timestep=timestep, encoder_hidden_states=hidden)

    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        dtype = self._unet_net.buffers["sample"].dtype
        args = (
            sample.to(self.device, dtype),
            timestep.to(self.device, torch.float32).reshape(1),
            encoder_hidden_states.to(self.device, dtype),
        )
        if self._graphed_unet is not None:
            return self._graphed_unet(*args).float()  # the graph's output is a clone already
        return owned(self._unet_enqueue(*args))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        net = self.networks["vae_encoder"]
        return owned(net(sample=image.to(self.device, net.buffers["sample"].dtype)))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        net = self.networks["vae_decoder"]
        out = owned(net(latent_sample=latents.to(self.device, net.buffers["latent_sample"].dtype)))
        if self.fp32_decoder is not None and not torch.isfinite(out).all():
            logger.warning("the fp16 VAE decoder overflowed: decoding again with the fp32 engine")
            out = owned(self.fp32_decoder(latent_sample=latents.to(self.device, torch.float32)))
        return out

    def synchronize(self) -> None:
        torch.cuda.synchronize()
