"""Who may connect, and what a connection may do: TLS, tokens and the server's limits.

Everything runs over real sockets on 127.0.0.1 against real worker processes;
the TLS certificates are made here, fresh for each run (``cryptography``, from
the test extra). The trainer may *bind* 0.0.0.0, but every connection goes to
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import logging
import ssl
import time

import aiohttp
import gymnasium as gym
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import ws_gym
from ws_gym.protocol import EXIT_GAVE_UP, EXIT_OK, EXIT_UNAUTHORIZED, EXIT_UNTRUSTED, TOKEN_ENV
from ws_gym.worker import build_parser

from .conftest import assert_same

ENV = "CartPole-v1"


def make_cert(directory, name: str, *, ips: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """A self-signed certificate for localhost and 127.0.0.1: (certfile, keyfile, sha256 hex).

    It is its own CA (what ``--cafile`` trusts), with the extensions strict
    verification (Python 3.13's default) asks for. ``ips``: further IP
    addresses it is valid for (its subjectAltName), e.g. a network
    namespace's address.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
            ),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    der = cert.public_bytes(serialization.Encoding.DER)
    return str(certfile), str(keyfile), hashlib.sha256(der).hexdigest()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"), "trainer")


@pytest.fixture(scope="module")
def other_cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls-other"), "someone-else")


def tls_envs(cert, num_envs: int = 2, **kwargs) -> ws_gym.RemoteVectorEnv:
    certfile, keyfile, _ = cert
    return ws_gym.RemoteVectorEnv(num_envs, env_id=ENV, port=0, certfile=certfile, keyfile=keyfile,
                                  connect_timeout=30, **kwargs)


def check_steps(envs, num_envs: int) -> None:
    """The remote envs give what gymnasium's SyncVectorEnv gives."""
    ref = gym.make_vec(ENV, num_envs, vectorization_mode="sync")
    try:
        assert_same(envs.reset(seed=7), ref.reset(seed=7))
        actions = np.arange(num_envs) % 2
        for _ in range(3):
            assert_same(envs.step(actions), ref.step(actions))
    finally:
        ref.close()


def log_text(caplog, capsys) -> str:
    """What ws_gym told the user: through logging, or on stderr when none is set up."""
    return caplog.text + capsys.readouterr().err


# ------------------------------------------------------------------------ TLS


def test_wss_worker_with_cafile_steps(cert, cli_workers):
    envs = tls_envs(cert)
    try:
        assert envs.url.startswith("wss://127.0.0.1:")
        worker = cli_workers.start("--url", envs.url, "--num-envs", "2", "--cafile", cert[0])
        check_steps(envs, 2)
    finally:
        envs.close()
    code, out = cli_workers.finish(worker)
    assert code == EXIT_OK, out


@pytest.mark.parametrize("trust", ["system CAs", "another CA"])
def test_wss_untrusted_certificate_ends_the_worker(cert, other_cert, cli_workers, trust):
    envs = tls_envs(cert, num_envs=1)
    try:
        args = [] if trust == "system CAs" else ["--cafile", other_cert[0]]
        # No --retry-timeout: the worker must not retry a certificate that failed.
        worker = cli_workers.start("--url", envs.url, *args)
        code, out = cli_workers.finish(worker, timeout=30)
        assert code == EXIT_UNTRUSTED, out
        assert "certificate" in out and "failed verification" in out and "--cafile" in out, out
        assert envs._trainer.table.covered() == 0
    finally:
        envs.close()


def test_wss_insecure_connects_and_warns(cert, cli_workers):
    envs = tls_envs(cert, num_envs=1)
    try:
        worker = cli_workers.start("--url", envs.url, "--insecure")
        check_steps(envs, 1)
    finally:
        envs.close()
    code, out = cli_workers.finish(worker)
    assert code == EXIT_OK, out
    assert "WARNING --insecure" in out and "NOT verified" in out, out


def test_wss_cert_fingerprint_pins_one_certificate(cert, other_cert, cli_workers):
    envs = tls_envs(cert, num_envs=1)
    try:
        wrong = cli_workers.start("--url", envs.url, "--cert-fingerprint", other_cert[2])
        code, out = cli_workers.finish(wrong)
        assert code == EXIT_UNTRUSTED, out
        assert "not the expected one" in out and cert[2] in out, out
        pinned = ":".join(cert[2][i:i + 2] for i in range(0, 64, 2)).upper()  # as openssl prints it
        right = cli_workers.start("--url", envs.url, "--cert-fingerprint", pinned)
        check_steps(envs, 1)
    finally:
        envs.close()
    assert cli_workers.finish(right)[0] == EXIT_OK


@pytest.mark.parametrize("given", ["certfile", "ssl_context"])
def test_wss_local_workers(cert, given):
    certfile, keyfile, _ = cert
    if given == "certfile":
        tls = {"certfile": certfile, "keyfile": keyfile}
    else:  # a context alone: the trainer never sees a file its workers could trust
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile, keyfile)
        tls = {"ssl_context": ctx}
    envs = ws_gym.RemoteVectorEnv(3, env_id=ENV, port=0, local_workers=2, connect_timeout=30, **tls)
    try:
        assert envs.url.startswith("wss://")
        check_steps(envs, 3)
    finally:
        envs.close()


def test_ws_url_to_a_wss_trainer_says_so(cert, cli_workers):
    envs = tls_envs(cert, num_envs=1)
    try:
        worker = cli_workers.start("--url", "ws" + envs.url[3:], "--retry-timeout", "0.5")
        code, out = cli_workers.finish(worker)
        assert code == EXIT_GAVE_UP, out
        assert "wss://" in out, out
    finally:
        envs.close()


def test_tls_options_are_checked(cert, cli_workers):
    certfile, keyfile, _ = cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with pytest.raises(ValueError, match="not both"):
        ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, ssl_context=ctx, certfile=certfile)
    with pytest.raises(ValueError, match="keyfile= needs certfile="):
        ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, keyfile=keyfile)
    with pytest.raises(TypeError, match="ssl_context"):
        ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, ssl_context=certfile)
    # TLS flags on a ws:// URL are a mistake, not something to ignore (the worker exits before dialing).
    worker = cli_workers.start("--url", "ws://127.0.0.1:9/ws", "--cafile", certfile)
    code, out = cli_workers.finish(worker)
    assert code == 1 and "needs a wss:// URL" in out, out
    worker = cli_workers.start("--url", "wss://127.0.0.1:9/ws", "--cert-fingerprint", "abc")
    code, out = cli_workers.finish(worker)
    assert code == 1 and "SHA-256" in out, out
    help_text = build_parser().format_help()
    for flag in ("--cafile", "--insecure", "--cert-fingerprint"):
        assert flag in help_text


# ---------------------------------------------------------------------- token


def test_non_loopback_trainer_generates_a_token(cli_workers, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="ws_gym"):
        envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, host="0.0.0.0", port=0, connect_timeout=30)
    try:
        token = envs.token
        assert isinstance(token, str) and len(token) >= 40
        said = log_text(caplog, capsys)
        assert f"{TOKEN_ENV}={token} python -m ws_gym.worker --url ws://" in said, said
        assert f":{envs._trainer.server.port}/ws --env {ENV}" in said, said
        url = envs._trainer.server.local_url  # ws://127.0.0.1:PORT/ws: we only ever dial loopback
        assert url.startswith("ws://127.0.0.1:")

        none = cli_workers.start("--url", url, env={TOKEN_ENV: ""})
        code, out = cli_workers.finish(none)
        assert code == EXIT_UNAUTHORIZED and "requires a token" in out and TOKEN_ENV in out, out
        wrong = cli_workers.start("--url", url, env={TOKEN_ENV: token + "x"})
        code, out = cli_workers.finish(wrong)
        assert code == EXIT_UNAUTHORIZED and "rejected this worker's token" in out, out

        good = cli_workers.start("--url", url, env={TOKEN_ENV: token})
        check_steps(envs, 1)
    finally:
        envs.close()
    assert cli_workers.finish(good)[0] == EXIT_OK


def test_generated_token_reaches_local_workers():
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, host="0.0.0.0", port=0, local_workers=1, connect_timeout=30)
    try:
        assert envs.token and envs._trainer.server.token == envs.token
        check_steps(envs, 2)
    finally:
        envs.close()


def test_when_a_token_is_generated(caplog):
    loopback = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0)
    try:
        assert loopback.token is None and loopback._trainer.server.token is None
        assert TOKEN_ENV not in loopback._trainer.worker_command()
    finally:
        loopback.close()
    chosen = ws_gym.RemoteVectorEnv(1, env_id=ENV, host="0.0.0.0", port=0, token="my-secret")
    try:
        assert chosen.token == "my-secret"
        command = chosen._trainer.worker_command()
        assert f"{TOKEN_ENV}=<your token>" in command and "my-secret" not in command
    finally:
        chosen.close()
    with caplog.at_level(logging.WARNING, logger="ws_gym"):
        opted_out = ws_gym.RemoteVectorEnv(1, env_id=ENV, host="0.0.0.0", port=0, token="")
    try:
        assert opted_out.token is None and opted_out._trainer.server.token is None
        assert "token=''" in caplog.text
    finally:
        opted_out.close()
    single = ws_gym.RemoteEnv(env_id=ENV, host="0.0.0.0", port=0)
    try:
        assert single.token and single._trainer.server.token == single.token
    finally:
        single.close()


# --------------------------------------------------------------------- limits


def test_max_pending_handshakes(cli_workers, caplog):
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, max_pending_handshakes=2, handshake_timeout=30,
                                  connect_timeout=30)

    async def crowd() -> tuple[int, str, int]:
        async with aiohttp.ClientSession() as session:
            idle = [await session.ws_connect(envs.url) for _ in range(2)]  # upgraded, no hello
            async with session.get("http" + envs.url[2:]) as resp:  # rejected before the upgrade
                status, text = resp.status, await resp.text()
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(envs.url)
            for ws in idle:
                await ws.close()
            return status, text, info.value.status

    try:
        with caplog.at_level(logging.WARNING, logger="ws_gym"):
            status, text, ws_status = asyncio.run(asyncio.wait_for(crowd(), 30))
        assert status == 503 and ws_status == 503
        assert "too many pending handshakes (2)" in text
        assert "max_pending_handshakes" in caplog.text
        # The slots free up as the idle connections close: a real worker gets in (retrying a 503).
        worker = cli_workers.start("--url", envs.url)
        check_steps(envs, 1)
    finally:
        envs.close()
    assert cli_workers.finish(worker)[0] == EXIT_OK


def test_handshake_timeout(caplog):
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, handshake_timeout=0.3)

    async def silent() -> tuple[aiohttp.WSMsgType, float]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(envs.url) as ws:
                start = time.monotonic()
                msg = await ws.receive(timeout=20)  # we never say hello
                return msg.type, time.monotonic() - start

    try:
        with caplog.at_level(logging.WARNING, logger="ws_gym"):
            kind, waited = asyncio.run(silent())
        assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert waited < 5  # handshake_timeout=0.3, not the default 10 s
        assert "did not finish its handshake in time" in caplog.text
        assert envs._trainer.server._pending_handshakes == 0
    finally:
        envs.close()
    with pytest.raises(ValueError, match="handshake_timeout"):
        ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, handshake_timeout=0)


def test_max_msg_size(cli_workers, caplog):
    limit = 64 * 1024  # far above what CartPole's handshake and replies need
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, max_msg_size=limit, connect_timeout=30)

    async def oversized() -> aiohttp.WSMessage:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(envs.url) as ws:
                await ws.send_bytes(bytes(limit + 1))
                return await ws.receive(timeout=20)

    try:
        with caplog.at_level(logging.WARNING, logger="ws_gym"):
            msg = asyncio.run(oversized())
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        # the trainer logs after it has sent its close, so the line may come a moment later
        deadline = time.monotonic() + 10
        while "exceeded max_msg_size" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "exceeded max_msg_size" in caplog.text
        worker = cli_workers.start("--url", envs.url)  # the trainer still serves real workers
        check_steps(envs, 1)
    finally:
        envs.close()
    assert cli_workers.finish(worker)[0] == EXIT_OK
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="max_msg_size"):
            ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, max_msg_size=bad)
    with pytest.raises(ValueError, match="max_pending_handshakes"):
        ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, max_pending_handshakes=0)
