"""``sdtrt serve --tls-cert PEM --tls-key PEM``: HTTPS, and gRPC over TLS, with a certificate
made here by a test CA (``trustme``); a client that trusts the CA gets its answers, a
plain-text client none; bad certificate files are refused before any model loads."""

from __future__ import annotations

import base64
import ssl

import httpx
import pytest
import trustme
from conftest import noise_picture, png_bytes, serving

from sdtrt.errors import InvalidInputError, ModelNotFoundError
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.options import ServeOptions

KEY = {"Authorization": "Bearer secret"}


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


@pytest.fixture(scope="module")
def certificate(authority, tmp_path_factory):
    """(certificate chain, key) PEM files for 127.0.0.1, issued by ``authority``."""
    issued = authority.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    chain, key = folder / "cert.pem", folder / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    key.write_bytes(issued.private_key_pem.bytes())
    return str(chain), str(key)


@pytest.fixture(scope="module")
def server(tiny, certificate):
    pytest.importorskip("grpc", reason="pip install 'sdtrt[grpc]'")
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    cert, key = certificate
    options = ServeOptions(api_key="secret", grpc_port=0, tls_cert=cert, tls_key=key)
    with serving(pipe, options) as running:
        yield running


def test_https_answers_a_client_that_trusts_the_ca(server, authority):
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)
    assert server.url.startswith("https://")
    assert httpx.get(f"{server.url}/health", verify=trusted).status_code == 200
    body = {"image": base64.b64encode(png_bytes(noise_picture(1))).decode(),
            "num_inference_steps": 4, "strength": 0.5}  # fmt: skip
    answer = httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, verify=trusted,
                        timeout=60)  # fmt: skip
    assert answer.status_code == 200 and answer.content[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/health")  # the system's CAs do not know this one
    plain = server.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no plain-text answer on that port
        httpx.get(f"{plain}/health", timeout=5)


def test_grpc_speaks_tls_on_its_port(server, authority):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service="")
    roots = authority.cert_pem.bytes()
    with grpc.secure_channel(server.grpc, grpc.ssl_channel_credentials(roots)) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bad_certificate_files_are_refused_before_the_model_loads(certificate, tmp_path):
    cert, key = certificate
    with pytest.raises(InvalidInputError, match="give both --tls-cert and --tls-key"):
        ServeOptions(tls_cert=cert)
    with pytest.raises(ModelNotFoundError, match="tls_key .* is not a file"):
        ServeOptions(tls_cert=cert, tls_key=str(tmp_path / "none.pem"))
    other = trustme.CA().issue_cert("127.0.0.1")  # a key that is not this certificate's
    other.private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    with pytest.raises(InvalidInputError, match="do not load as a PEM certificate and its"):
        ServeOptions(tls_cert=cert, tls_key=str(tmp_path / "other.pem"))
    assert ServeOptions(tls_cert=cert, tls_key=key).scheme == "https"


def test_the_command_line_takes_the_files(certificate, capsys):
    from sdtrt.cli import build_parser, main

    cert, key = certificate
    args = build_parser().parse_args(["serve", "--tls-cert", cert, "--tls-key", key])
    assert (args.tls_cert, args.tls_key) == (cert, key)
    assert main(["serve", "--tls-cert", cert]) == 2  # its key missing: refused at once
    assert "give both --tls-cert and --tls-key" in capsys.readouterr().err
    assert main(["serve", "--tls-cert", cert, "--tls-key", key, "--ray"]) == 2
    assert "Ray Serve's proxy speaks plain HTTP" in capsys.readouterr().err
