#!/usr/bin/env python3
"""Container health probe: one ``grpc.health.v1.Health/Check`` call, exit 0 when SERVING.

The Python equivalent of ``grpc_health_probe`` for the images' ``HEALTHCHECK`` and for Kubernetes ``exec`` probes when
TLS is on (kubelet's native ``grpc:`` probe cannot speak TLS). Settings come from flags or the same ``SEARCHRL_*``
environment variables the service reads, so the probe follows the service's port and TLS files without repeating them.

CA used to verify the server (``--tls``): ``--tls-ca-file`` (``SEARCHRL_PROBE_CA_FILE``, the TLS Secret's ``ca.crt``)
when that file exists; otherwise the server's own certificate (``SEARCHRL_TLS_CERT_FILE``) when it is self-signed (a
Secret made with ``kubectl create secret tls`` from a self-signed pair has no ``ca.crt``); otherwise the probe fails
with a message saying which key the Secret lacks.

Exit codes: 0 SERVING; 1 NOT_SERVING/UNKNOWN/SERVICE_UNKNOWN; 2 RPC failed (connection refused, deadline, TLS), or no
CA to verify the server with.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def _der_item(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at ``pos`` (definite lengths only, as DER requires)."""
    tag, length = buf[pos], buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(buf[pos : pos + n], "big")
        pos += n
    return tag, pos, pos + length


def is_self_issued(pem: bytes) -> bool:
    """Whether the first certificate of a PEM file names itself as issuer (issuer Name == subject Name, RFC 5280 6.1).

    Reads the DER structure directly (Certificate -> tbsCertificate -> [version], serial, signature, issuer,
    validity, subject), so the probe needs nothing beyond the standard library. False for anything it cannot parse.
    """
    text = pem.decode("ascii", "replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if begin not in text or end not in text:
        return False
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        der = base64.b64decode("".join(body.split()))
        _tag, cert, _ = _der_item(der, 0)
        _tag, tbs, _ = _der_item(der, cert)
        fields = []
        pos = tbs
        while len(fields) < 6:
            tag, start, stop = _der_item(der, pos)
            if not (fields == [] and tag == 0xA0):  # [0] version is optional
                fields.append(der[pos:stop])
            pos = stop
        # fields: serial, signature algorithm, issuer, validity, subject, subjectPublicKeyInfo
        return fields[2] == fields[4]
    except (IndexError, ValueError):
        return False


class NoTrustAnchor(Exception):
    """No CA to verify the server with; the message says what the TLS Secret lacks."""


def root_certificates(ca_file: str, server_cert_file: str) -> bytes | None:
    """The PEM roots to verify the server with (see the module docstring); ``None``: the system roots.

    Raises:
        NoTrustAnchor: ``ca_file`` is named but missing and the server certificate is not self-signed.
    """
    if ca_file and os.path.exists(ca_file):
        return _read(ca_file)
    cert = _read(server_cert_file) if server_cert_file and os.path.exists(server_cert_file) else None
    if cert is not None and is_self_issued(cert):
        return cert
    if ca_file:
        raise NoTrustAnchor(
            f"{ca_file} does not exist and the server certificate {server_cert_file or '(none)'} is not self-signed: "
            "the TLS Secret needs ca.crt, the CA that signed tls.crt (cert-manager writes it with a CA Issuer; or "
            "kubectl create secret generic NAME --type=kubernetes.io/tls --from-file=tls.crt --from-file=tls.key "
            "--from-file=ca.crt)"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default=f"127.0.0.1:{env('SEARCHRL_GRPC_PORT', '50051')}", help="host:port to probe")
    parser.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline of the call, in seconds")
    parser.add_argument("--tls", action="store_true", default=bool(env("SEARCHRL_TLS_CERT_FILE")), help="use TLS")
    parser.add_argument(
        "--tls-ca-file", default=env("SEARCHRL_PROBE_CA_FILE", ""), help="CA bundle to verify the server"
    )
    parser.add_argument("--tls-cert-file", default=env("SEARCHRL_PROBE_CERT_FILE", ""), help="client cert (mTLS)")
    parser.add_argument("--tls-key-file", default=env("SEARCHRL_PROBE_KEY_FILE", ""), help="client key (mTLS)")
    parser.add_argument("--tls-server-name", default=env("SEARCHRL_PROBE_SERVER_NAME", ""), help="SNI / name override")
    parser.add_argument(
        "--server-cert-file",
        default=env("SEARCHRL_TLS_CERT_FILE", ""),
        help="the server's certificate: the trust anchor when it is self-signed and the CA file is missing",
    )
    args = parser.parse_args(argv)

    if args.tls:
        try:
            roots = root_certificates(args.tls_ca_file, args.server_cert_file)
        except NoTrustAnchor as exc:
            print(f"health check of {args.addr} cannot verify TLS: {exc}", file=sys.stderr)
            return 2
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=_read(args.tls_key_file),
            certificate_chain=_read(args.tls_cert_file),
        )
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(args.addr, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.addr)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"health check of {args.addr} failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{args.addr}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
