"""``sdtrt serve``'s options: how requests are batched and what the protocols accept (the
command line's ``serve`` and the Ray app build them here). Light: no torch, no FastAPI."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdtrt.errors import InvalidInputError, ModelNotFoundError
from sdtrt.options import DEFAULT_STRENGTH, Img2ImgJob, check_integer, one_of, parse_sizes

SERVE_POLICIES = ("step", "request", "single")


@dataclass(frozen=True)
class ServeOptions:
    """``sdtrt serve``: how requests are batched and what the HTTP side accepts."""

    policy: str = "step"
    """step: one UNet call per iteration for every active job of a size (continuous
    batching); request: identical requests within the queue delay run as one batch (what
    Triton and PyTriton do); single: one request at a time. The load benchmark compares."""
    max_rows: int | None = None
    """UNet rows per call ([uncond, cond] per guided image); None: the TensorRT engine's
    profile maximum, else 16."""
    max_queue: int = 64
    """Requests waiting beyond this are refused with 429 and Retry-After."""
    intra_op_threads: int | None = 1
    """On a CPU device: PyTorch's intra-op threads in the worker thread (its
    ``torch.set_num_threads``); None: PyTorch's own (one per core). 1 by default: a second
    thread with its own OpenMP pool next to the one that loaded the model oversubscribes
    the cores, and then every small operator waits for its pool to wake (tiny model, 2
    cores: 3.5x slower requests); big models on many cores gain from more."""
    queue_delay: float = 0.05
    """request policy: seconds the oldest request waits for identical ones."""
    timeout: float = 300.0
    """Seconds a request may take in all; past it the answer is 504 and its job is dropped."""
    host: str = "127.0.0.1"
    """Loopback unless told otherwise."""
    port: int = 8000
    api_key: str | None = None
    """Required on /v1 and /metrics when set (Authorization: Bearer KEY or X-API-Key)."""
    max_body_mb: float = 16.0
    drain_timeout: float = 30.0
    """On SIGTERM: seconds the requests in flight get to finish before the server exits."""
    warmup_sizes: tuple[tuple[int, int], ...] = ()
    """(height, width) image sizes at which every shape the server can form runs once
    before /ready says 200: the UNet at each row count up to ``max_rows``, the VAE at each
    number of images up to it, the text encoder at each number of prompts up to it times
    the number of sizes (jobs admitted together are encoded together). Where a shape costs
    on first sight (a CUDA graph captured, ``--compile`` compiling, TensorRT-RTX compiling
    kernels), the first requests then do not pay for it; the largest batches also prove
    the memory holds them. Also takes "HxW,HxW". Empty: one small request warms up, at the
    sample picture's size."""
    steps: int = Img2ImgJob.steps
    """A request's ``num_inference_steps`` when it sends none (as ``guidance`` its
    ``guidance_scale``, ``strength`` its strength when it sends neither strength nor
    start_step, and the pipeline's scheduler its scheduler): an LCM-LoRA server's few
    unguided steps need not be sent with every request."""
    guidance: float = Img2ImgJob.guidance
    strength: float = DEFAULT_STRENGTH
    guidance_cutoff: float | None = None
    """A request's ``guidance_cutoff`` when it sends none (a request sends 1 to be guided
    throughout); None: guided throughout."""
    model_name: str = "img2img"
    """The model's name in the Open Inference Protocol's paths (``/v2/models/NAME/infer``):
    what Triton and KServe clients ask for (a KServe InferenceService's name); and its id in
    OpenAI's API (``model`` of ``/v1/images/edits``, ``/v1/models``) and A1111's
    (``sd_model_checkpoint``, ``/sdapi/v1/sd-models``)."""
    priority_levels: int = 0
    """Priority levels a request may name (Triton's schedule-policy ``priority``): 1 is the
    highest, ``priority_levels`` the lowest and a request's default (priority 0). A waiting
    request of a higher level is admitted before those of lower ones, which do not take
    the UNet rows it waits for; within a level, in arrival order. 0: none (a request's
    priority must then be 0)."""
    preview_vae: str | None = None
    """A TAESD (AutoencoderTiny: its diffusers folder, or a folder of TAESD's own
    taesd_decoder .safetensors, with taesd_encoder or alone) that decodes the stream's
    previews in place of the model's VAE, as web UIs preview: SD's VAE decoder is much
    work next to a UNet step, TAESD's a small share of it (bench/preview_ab.py). Its
    images are approximate (TAESD's). None: the model's VAE."""
    cors_origins: tuple[str, ...] = ()
    """The web pages' origins (``https://ui.example.com``; ``*``: any) whose scripts may call
    the API from a browser (CORS, FastAPI's CORSMiddleware): their preflight requests are
    answered, and the answers' X-Seed, X-Unet-Calls, X-Queue-Wait-Ms and X-Request-ID
    headers are exposed to them. Also takes "ORIGIN,ORIGIN". Empty: none (browsers refuse
    a page of another origin the answers)."""
    grpc_port: int | None = None
    """Also serve the Open Inference Protocol over gRPC on this port, at ``host`` (Triton
    serves it on 8001; 0: a free port). None: HTTP only. Needs ``pip install
    'sdtrt[grpc]'``."""
    tls_cert: str | None = None
    """A PEM certificate (chain) to serve HTTPS with, and gRPC over TLS (uvicorn's
    ``--ssl-certfile``, Triton's ``--grpc-server-cert``); with ``tls_key``. None: plain HTTP
    (where a proxy in front terminates TLS)."""
    tls_key: str | None = None
    """The certificate's PEM private key (unencrypted)."""

    def __post_init__(self) -> None:
        from sdtrt.runtime.guidance import check_guidance_cutoff
        from sdtrt.runtime.inputs import check_steps_and_guidance, resolve_start_step

        check_steps_and_guidance(self.steps, self.guidance)
        check_guidance_cutoff(self.guidance_cutoff)
        resolve_start_step(self.steps, self.strength, None)
        one_of("policy", self.policy, SERVE_POLICIES)
        if not isinstance(self.model_name, str) or not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name
        ):
            raise InvalidInputError(
                "model name must be letters, digits, '_', '.' and '-' (one path segment), "
                f"got {self.model_name!r}"
            )
        sizes = self.warmup_sizes
        if isinstance(sizes, str):
            sizes = parse_sizes(sizes, "warm-up sizes")
        object.__setattr__(self, "warmup_sizes", tuple(tuple(size) for size in sizes))
        for size in self.warmup_sizes:
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise InvalidInputError(
                    f"warm-up sizes are (height, width) pairs of positive integers, got {size!r}"
                )
        if self.intra_op_threads is not None:
            check_integer("intra-op threads", self.intra_op_threads, 1)
        check_integer("max_queue", self.max_queue, 1)  # 0: nothing, the warm-up included, could run
        check_integer("priority_levels", self.priority_levels, 0)
        for name in ("port", "grpc_port"):
            port = getattr(self, name)
            if port is not None:
                check_integer(name, port, 0)
                if port > 65535:
                    raise InvalidInputError(f"{name} must be in [0, 65535], got {port}")
        if self.grpc_port == self.port != 0:
            raise InvalidInputError(f"grpc_port and port are both {self.port}: give two ports")
        if self.max_rows is not None and self.max_rows < 2:
            raise InvalidInputError(
                f"max rows must be >= 2 (one guided image), got {self.max_rows}"
            )
        origins = self.cors_origins
        if isinstance(origins, str):
            origins = tuple(o.strip() for o in origins.split(",") if o.strip())
        object.__setattr__(self, "cors_origins", tuple(origins))
        for origin in self.cors_origins:
            if not (isinstance(origin, str) and re.fullmatch(r"\*|https?://[^/\s]+", origin)):
                raise InvalidInputError(
                    f"CORS origins are scheme://host[:port] (no path), or *: got {origin!r}"
                )
        if self.preview_vae is not None:  # said before the model loads (minutes, for some)
            from sdtrt.source import expand_home

            object.__setattr__(self, "preview_vae", expand_home(self.preview_vae))
            if not Path(self.preview_vae).is_dir():
                raise ModelNotFoundError(
                    f"preview VAE {self.preview_vae} is not a folder: give a TAESD's "
                    "(madebyollin/taesd's diffusers folder, or one holding taesd_encoder and "
                    "taesd_decoder .safetensors)"
                )
        if self.tls_cert is not None or self.tls_key is not None:
            self._check_tls()
        for name in ("queue_delay", "drain_timeout"):
            if not getattr(self, name) >= 0:
                raise InvalidInputError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("timeout", "max_body_mb"):  # 0: every request refused
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def _check_tls(self) -> None:
        """Both files, a key that is the certificate's: read here, before the model loads
        (uvicorn would say so only once it starts listening)."""
        import ssl

        from sdtrt.source import expand_home

        if self.tls_cert is None or self.tls_key is None:
            raise InvalidInputError(
                "TLS needs a certificate and its key: give both --tls-cert and --tls-key"
            )
        for name in ("tls_cert", "tls_key"):
            object.__setattr__(self, name, expand_home(getattr(self, name)))
            if not Path(getattr(self, name)).is_file():
                raise ModelNotFoundError(f"{name} {getattr(self, name)} is not a file")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.tls_cert,
                self.tls_key,
                password=b"",  # no prompt for an encrypted key
            )
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidInputError(
                f"the TLS certificate {self.tls_cert} and key {self.tls_key} do not load as a "
                f"PEM certificate and its unencrypted key: {exc}"
            ) from None

    @property
    def tls(self) -> tuple[str, str] | None:
        """(certificate, key) PEM files, or None: plain HTTP and gRPC."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return self.tls_cert, self.tls_key

    @property
    def scheme(self) -> str:
        """http, or https with a certificate."""
        return "https" if self.tls else "http"
