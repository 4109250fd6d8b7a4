"""Test utilities for searchrl and for teams testing against it: real servers on free loopback ports.

Mirrors vLLM's ``RemoteOpenAIServer``: start the real process, wait for its health check with a deadline, fail fast
if the child exits, and kill the whole process tree at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from searchrl.serving.process import free_port, serve_command, start_redis, stop_process_group, wait_for_health

__all__ = [
    "CertAuthority",
    "ServiceProcess",
    "free_port",
    "redis_server",
    "self_signed_certificate",
    "wait_for_health",
]


class ServiceProcess:
    """A ``searchrl serve <service>`` child process on free ports (gRPC, metrics, and the retriever's HTTP API:
    ``http_port``, unless ``args`` set ``--http-port``).

    Args:
        service: ``reward``, ``retriever``, ``simulator`` or ``policy``.
        args: extra CLI flags.
        env: extra environment variables.
        timeout_s: deadline for the health check.
        root_ca: PEM CA of the server certificate when the service runs with TLS (health is checked over TLS).
        client_cert: ``(certificate PEM, key PEM)`` for the health check when the service requires client
            certificates (mTLS).

    Attributes:
        secrets: the secret values it was started with (tokens and passwords from ``env`` and ``args``, and the
            contents of the token, password and key files they name); :meth:`leaked_secrets` looks for them in its
            output.
    """

    launched: ClassVar[list[ServiceProcess]] = []  # every instance of this process, for suite-wide log checks

    def __init__(
        self,
        service: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        timeout_s: float = 180.0,
        root_ca: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.service = service
        self.secrets = _secrets_in(list(args), env or {})
        ServiceProcess.launched.append(self)
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        # the retriever also serves HTTP (default port 8000): a free one too, unless the caller chose
        self.http_port = free_port() if service == "retriever" and "--http-port" not in args else None
        if self.http_port is not None:
            args = [*args, "--http-port", str(self.http_port)]
        self.log_path = Path(tempfile.mkstemp(prefix=f"searchrl-{service}-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            serve_command(service, self.port, self.metrics_port, args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            wait_for_health(self.target, timeout_s=timeout_s, proc=self.proc, root_ca=root_ca, client_cert=client_cert)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{service} did not start: {exc}\n--- log ---\n{self.output()[-4000:]}") from exc

    def output(self) -> str:
        """Everything the child printed so far."""
        return self.log_path.read_text(errors="replace")

    def leaked_secrets(self) -> list[str]:
        """Which of :attr:`secrets` appear in the child's output (shown by their first 4 characters)."""
        out = self.output()
        return [f"{s[:4]}..." for s in self.secrets if s in out]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Sends ``sig`` to the child."""
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL of the process group after ``timeout_s``; returns the exit code."""
        code = stop_process_group(self.proc, timeout_s)
        self._log.close()
        return code

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|API_KEY", re.IGNORECASE)
_SECRET_FILE = re.compile(r"(TOKEN|PASSWORD|KEY)_FILE$", re.IGNORECASE)
_SECRET_FLAGS = {"--auth-token", "--redis-password", "--openai-api-key"}
_SECRET_FILE_FLAGS = {"--auth-token-file", "--tls-key-file"}


def _secrets_in(args: list[str], env: dict[str, str]) -> list[str]:
    """Secret values among a child's flags and environment (and inside the files they name); a PEM key counts by
    its base64 body lines, the part a log could leak."""
    values: list[str] = []
    files: list[str] = []
    for name, value in env.items():
        if _SECRET_FILE.search(name):
            files.append(value)
        elif _SECRET_NAME.search(name):
            values.append(value)
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
        if flag in _SECRET_FLAGS:
            values.append(value)
        elif flag in _SECRET_FILE_FLAGS:
            files.append(value)
    for path in files:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        if "-----BEGIN" in text:
            values += [line for line in text.splitlines() if line and not line.startswith("-----")]
        else:
            values.append(text.strip())
    return sorted({v for v in values if len(v) >= 6})


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence, AUTH with ``password`` when given);
    yields its URL (without the password).

    Raises:
        FileNotFoundError: no ``redis-server`` binary (install Debian's ``redis-server``).
        RuntimeError | TimeoutError: it exited or did not answer within 20 s.
    """
    with tempfile.TemporaryDirectory() as d:
        proc, url = start_redis(free_port(), d, password=password)
        try:
            yield url
        finally:
            stop_process_group(proc, 10, group=False)


class CertAuthority:
    """A throwaway CA (``cryptography``) that issues server and client certificates, as a cert-manager CA Issuer
    would; valid from 5 minutes ago for one day.

    Args:
        name: the CA's common name.
    """

    def __init__(self, name: str = "searchrl test CA") -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._now = datetime.datetime.now(datetime.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip

    @staticmethod
    def _sans(names: list[str]) -> Any:
        import ipaddress

        from cryptography import x509

        out: list[Any] = []
        for n in names:
            try:
                out.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                out.append(x509.DNSName(n))
        return x509.SubjectAlternativeName(out)

    @staticmethod
    def _pem(cert: Any, key: Any) -> tuple[bytes, bytes]:
        from cryptography.hazmat.primitives import serialization

        return (
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    @property
    def pem(self) -> bytes:
        """The CA certificate, PEM: what clients trust (a cert-manager Secret's ``ca.crt``)."""
        return self._pem(self.cert, self.key)[0]

    def issue(self, names: list[str]) -> tuple[bytes, bytes]:
        """``(tls.crt, tls.key)`` PEM of a leaf certificate for ``names`` (DNS or IP SANs) signed by this CA."""
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + datetime.timedelta(days=1))
            .add_extension(self._sans(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return self._pem(cert, key)

    @classmethod
    def self_signed(cls, names: list[str]) -> tuple[bytes, bytes]:
        """``(tls.crt, tls.key)`` of a self-signed server certificate for ``names`` (what `openssl req -x509` makes)."""
        ca = cls(names[0])
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = (
            x509.CertificateBuilder()
            .subject_name(ca.cert.subject)
            .issuer_name(ca.cert.subject)
            .public_key(ca.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(ca._now - datetime.timedelta(minutes=5))
            .not_valid_after(ca._now + datetime.timedelta(days=1))
            .add_extension(cls._sans(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca.key, hashes.SHA256())
        )
        return cls._pem(cert, ca.key)


def self_signed_certificate(folder: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> tuple[Path, Path]:
    """Writes ``tls.crt`` and ``tls.key`` (PEM) of a self-signed CA certificate valid for ``hosts`` into ``folder``
    (:meth:`CertAuthority.self_signed`).

    The certificate is its own CA, so clients trust it with ``root_ca=tls.crt`` (``SEARCHRL_TLS_CA_FILE``). Names that
    parse as IP addresses become IP SANs, the others DNS SANs. Valid from 5 minutes ago for one day.

    Returns:
        ``(certificate path, key path)``.
    """
    crt, key = CertAuthority.self_signed(list(hosts))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(crt)
    (folder / "tls.key").write_bytes(key)
    return folder / "tls.crt", folder / "tls.key"
