"""plugins/http1.py over TLS against a real TLS server on loopback: the certificate is verified against the
trusted CAs (a CA made here with the openssl CLI, trusted through SSL_CERT_FILE), SNI names the host, and
a certificate for another name is refused."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from plugins.http1 import ConnectFailed, Http1Pool


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Strait test CA",
             "-keyout", "ca.key", "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    for name, san in (("good", "DNS:localhost,IP:127.0.0.1"), ("wrong", "DNS:wrong.example")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _make_pki(d)
    return d


class TLSUpstream:
    def __init__(self) -> None:
        self.sni: list[str | None] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n{}")
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{"ok":1}')
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
async def tls_upstream(pki: Path) -> AsyncIterator[tuple[TLSUpstream, TLSUpstream]]:
    ups = []
    for name in ("good", "wrong"):
        up = TLSUpstream()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki / f"{name}.pem", pki / f"{name}.key")
        ctx.sni_callback = lambda sock, server_name, _ctx, up=up: up.sni.append(server_name)  # type: ignore[misc]
        up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0, ssl=ctx)
        ups.append(up)
    yield ups[0], ups[1]
    for up in ups:
        assert up.server is not None
        up.server.close()


def _pool(url: str) -> Http1Pool:
    return Http1Pool(url, limit=2, connect_timeout_s=5.0, read_timeout_s=5.0, headers={})


async def _post(p: Http1Pool) -> bytes:
    response = await p.post("/chat/completions", b"{}", {})
    body = await response.content.read()
    response.release()
    return body


async def test_a_certificate_from_an_untrusted_ca_is_refused(tls_upstream, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    good, _ = tls_upstream
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    p = _pool(f"https://127.0.0.1:{good.port}/v1")
    # A failed handshake sent nothing: a connect failure (the dispatcher fails over at once), caused by
    # the certificate check.
    with pytest.raises(ConnectFailed) as failed:
        await _post(p)
    assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
    assert p._open == 0
    await p.close()


async def test_a_trusted_certificate_for_the_host_is_accepted_and_sni_names_the_host(  # type: ignore[no-untyped-def]
    tls_upstream, pki, monkeypatch
) -> None:
    good, _ = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    p = _pool(f"https://localhost:{good.port}/v1")
    assert await _post(p) == b'{"ok":1}'
    assert good.sni == ["localhost"]
    await p.close()


async def test_a_trusted_certificate_for_another_host_is_refused(tls_upstream, pki, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    _, wrong = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    p = _pool(f"https://localhost:{wrong.port}/v1")
    with pytest.raises(ConnectFailed, match=r"[Hh]ostname") as failed:
        await _post(p)
    assert isinstance(failed.value.__cause__, ssl.SSLCertVerificationError)
    assert p._open == 0
    await p.close()
