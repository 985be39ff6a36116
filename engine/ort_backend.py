"""The ONNX Runtime backend: one session per network, from an exported folder.

CPU provider here; the CUDA provider where onnxruntime-gpu is installed, with I/O bound
straight to torch CUDA tensors (no host copies).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
import torch

from sdtrt.engine.base import UnetCall
from sdtrt.engine.factory import check_available
from sdtrt.errors import GraphIntegrityError
from sdtrt.export.folder import ExportedModel
from sdtrt.export.networks import NETWORK_NAMES, UNet
from sdtrt.options import OrtOptions

logger = logging.getLogger(__name__)

# "auto", measured on SD-1.5 graphs, 2-core CPU, 256x256 (bench/README.md): "all" made the
# VAE decoder 1.07x faster for 0.3 s of session load, the UNet only 1.03x for 5.5 s more.
AUTO_LEVELS = {"text_encoder": "basic", "unet": "basic", "vae_encoder": "all", "vae_decoder": "all"}
_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


class OrtBackend:
    name = "onnxruntime"
    step_unet: UnetCall | None = None  # whole-step graphs: torch and TensorRT (CUDA graphs)

    def __init__(self, exported: ExportedModel, options: OrtOptions = OrtOptions()) -> None:
        import onnxruntime as ort

        check_available(options)
        device = options.device or (
            "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        )
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        self.device = torch.device(device)
        self.size_multiple = exported.dims.size_multiple
        self.precision = precision = options.precision
        if device == "cpu" and precision == "fp16":
            # Measured on 2 cores, the tiny model at 512x512: 308 ms per UNet call against
            # 190 in fp32 (ONNX Runtime casts around the many CPU kernels that are fp32's).
            logger.warning(
                "fp16 graphs on ONNX Runtime's CPU provider run slower than fp32 (most of its "
                "CPU kernels are fp32's): use them to check fp16 numbers, fp32 for speed"
            )
        self._contracts = {n: exported.network(n, precision) for n in NETWORK_NAMES}
        self.per_row_timesteps = cast(UNet, self._contracts["unet"]).per_row_timesteps
        self.max_unet_rows: int | None = None
        self.max_image_rows: int | None = None
        self.pixel_range: tuple[tuple[int, int], tuple[int, int]] | None = None
        self.sessions: dict[str, Any] = {}
        for network in NETWORK_NAMES:
            path = exported.graph_path(network, precision)
            level = AUTO_LEVELS[network] if options.optimization == "auto" else options.optimization
            session = session_options(
                level, options.threads, options.memory_arena, options.spinning
            )
            try:
                self.sessions[network] = ort.InferenceSession(
                    str(path), sess_options=session, providers=[provider]
                )
            except Exception as exc:  # ORT raises its own untyped errors for bad graphs
                raise GraphIntegrityError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        self._output_types = {
            network: {o.name: _NUMPY.get(o.type, np.float32) for o in session.get_outputs()}
            for network, session in self.sessions.items()
        }

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", input_ids=input_ids)

    def unet(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self._run(
            "unet", sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states
        )

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self._run("vae_encoder", sample=image)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", latent_sample=latents)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _run(self, network: str, **inputs: torch.Tensor) -> torch.Tensor:
        contract = self._contracts[network]
        feeds = contract.feeds(**inputs)  # the graph's dtypes and timestep shape
        if self.device.type == "cuda":
            return self._run_bound(network, feeds)
        arrays = {name: tensor.detach().cpu().numpy() for name, tensor in feeds.items()}
        (out,) = self.sessions[network].run([contract.output_name], arrays)
        return torch.from_numpy(out).float()

    def _run_bound(self, network: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """CUDA: bind torch tensors by pointer, so nothing crosses to the host."""
        session, contract = self.sessions[network], self._contracts[network]
        binding = session.io_binding()
        kept = []
        for name, tensor in inputs.items():
            tensor = tensor.to(self.device).contiguous()
            kept.append(tensor)
            dtype = _numpy_dtype(tensor.dtype)
            binding.bind_input(name, "cuda", 0, dtype, list(tensor.shape), tensor.data_ptr())
        output_name = contract.output_name
        shape = list(contract.output_shape({k: tuple(v.shape) for k, v in inputs.items()}))
        dtype = self._output_types[network][output_name]
        out = torch.empty(shape, dtype=_torch_dtype(dtype), device=self.device)
        binding.bind_output(output_name, "cuda", 0, dtype, shape, out.data_ptr())
        for extra in self._output_types[network]:
            if extra != output_name:  # optimum's pooler_output: ORT allocates it
                binding.bind_output(extra, "cuda")
        session.run_with_iobinding(binding)
        return out.float()


def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty((), dtype=dtype).numpy().dtype.type


def _torch_dtype(dtype: Any) -> torch.dtype:
    return torch.from_numpy(np.empty((), dtype)).dtype


def session_options(level: str, threads: int, memory_arena: bool, spinning: bool) -> Any:
    """ONNX Runtime session options for one optimisation level (not "auto") and the knobs
    the backend exposes; the ORT sweep measures through the same function."""
    import onnxruntime as ort

    levels = ort.GraphOptimizationLevel
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": levels.ORT_DISABLE_ALL,
        "basic": levels.ORT_ENABLE_BASIC,
        "extended": levels.ORT_ENABLE_EXTENDED,
        "layout": getattr(levels, "ORT_ENABLE_LAYOUT", levels.ORT_ENABLE_EXTENDED),
        "all": levels.ORT_ENABLE_ALL,
    }[level]
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = memory_arena
    # Worker threads busy-wait after each run; off frees the cores for the Python between
    # calls (scheduler step, guidance) at some cost in wake-up latency.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return options
