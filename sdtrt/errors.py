"""Typed errors: everything a user can cause is one of these, with a message that says
what is allowed. The command line turns them into exit code 2 and one line, no traceback."""

from __future__ import annotations


class SdtrtError(Exception):
    """Base of every error sdtrt raises on purpose."""


class InvalidInputError(SdtrtError, ValueError):
    """An argument or file the user gave is outside what is allowed."""


class ModelNotFoundError(SdtrtError, FileNotFoundError):
    """A model name is unknown, or a model folder is missing or incomplete."""


class UnsupportedModelError(InvalidInputError):
    """The model is a kind sdtrt does not run: its UNet needs inputs img2img does not make
    (an inpainting, SDXL, upscaler or LCM model)."""


class BackendUnavailableError(SdtrtError, RuntimeError):
    """The requested backend or device cannot run on this machine (missing library or GPU)."""


class GraphIntegrityError(SdtrtError, RuntimeError):
    """An exported ONNX folder is missing a graph, corrupt, or does not match its manifest."""


class ShapeOutsideProfileError(InvalidInputError):
    """A request's shape lies outside what an engine or graph was built for: input that
    this engine does not take (a server answers 422, as for any invalid input)."""


class EngineMismatchError(SdtrtError, RuntimeError):
    """A TensorRT engine was built for another graph, TensorRT version, GPU or profile."""


class NonFiniteOutputError(SdtrtError, FloatingPointError):
    """A network produced NaN or infinite values (typically an fp16 VAE overflowing)."""


class EngineBuildError(SdtrtError, RuntimeError):
    """TensorRT could not build an engine (out of GPU memory, unsupported graph...)."""


class ServerBusyError(SdtrtError, RuntimeError):
    """The server's queue is full (HTTP 429), or it is draining and takes nothing new (503)."""


class DeadlineExceededError(SdtrtError, TimeoutError):
    """A request was not done within its deadline; its job was dropped (HTTP 504)."""


class RequestCancelledError(SdtrtError, RuntimeError):
    """The client went away; its job was dropped at the next denoising step."""
