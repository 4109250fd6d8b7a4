"""Hostile input against the real services (#17): a property-based fuzzer (hypothesis) sends generated requests to
every method of every service running as a real ``searchrl serve`` process, over loopback gRPC.

Requests: random bytes; messages built from each method's descriptor with every field at its limits (empty and
large strings, integers at the 32/64-bit edges and past them, NaN and infinities, unknown enum numbers, long repeated
fields), then sent as they are, truncated, with unknown fields appended, or with invalid UTF-8 in a string field.
Each call has a deadline. Expectation: only OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, PERMISSION_DENIED (LoadWeights
outside the checkpoint roots) or the caller's own DEADLINE_EXCEEDED, never UNKNOWN / INTERNAL / UNAVAILABLE; the
process stays alive and healthy, its memory bounded.

``make test`` runs a small number per method (``SEARCHRL_FUZZ_EXAMPLES``, default 15, in ``SEARCHRL_FUZZ_PASSES``
passes, default 2: warm-up passes, then a last pass that must not grow memory). The long run (>= 10,000 requests per
service; the simulator and the policy service, whose valid requests run the model, take about 15 min each)::

    SEARCHRL_FUZZ_EXAMPLES=5000 SEARCHRL_FUZZ_BIG=1 .venv/bin/python -m pytest tests/serving/test_fuzz.py -p no:randomly -s --timeout 0

prints the requests sent and the statuses seen per service (``SEARCHRL_FUZZ_BIG=1`` adds 10 MB strings and
100,000-element repeated fields).
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from searchrl.policy.v1 import policy_pb2
from searchrl.retrieval.v1 import retrieval_pb2
from searchrl.reward.v1 import reward_pb2
from searchrl.simulation.v1 import simulation_pb2
from searchrl.testing import ServiceProcess

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("SEARCHRL_FUZZ_EXAMPLES", "15"))
BIG = os.environ.get("SEARCHRL_FUZZ_BIG", "") not in ("", "0")
PASSES = max(2, int(os.environ.get("SEARCHRL_FUZZ_PASSES", "2")))
DEADLINE_S = 20.0
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # the caller's own deadline: the call returned by it
}
SERVICES = {
    "reward": reward_pb2.DESCRIPTOR.services_by_name["RewardService"],
    "retriever": retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"],
    "simulator": simulation_pb2.DESCRIPTOR.services_by_name["SimulatedSearchService"],
    "policy": policy_pb2.DESCRIPTOR.services_by_name["PolicyService"],
}
SEEN: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

F = FieldDescriptor
INT32 = [0, 1, -1, 2**31 - 1, -(2**31)]
INT64 = [*INT32, 2**31, 2**63 - 1, -(2**63)]
UINT32 = [0, 1, 2**31, 2**32 - 1]
UINT64 = [*UINT32, 2**63, 2**64 - 1]
HUGE_STRING = 10 * 2**20 if BIG else 200_000
HUGE_LIST = 100_000 if BIG else 5_000


# Built once: a strategy built per draw (and a new 10 MB string in each) made the fuzzing process grow by about
# 10 MB per request until the kernel killed it in the long run.
_SMALL_STRINGS = st.one_of(st.just(""), st.text(max_size=40), st.just(" \t\n"))
_STRINGS = st.one_of(
    _SMALL_STRINGS,
    st.just("<search>x</search><answer>y</answer>" * 3),
    st.integers(1, HUGE_STRING).map(lambda n: "x" * n),
    st.just("x" * HUGE_STRING),
)


def _ints(edges: list[int], lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _scalar(fd: FieldDescriptor, small: bool = False) -> st.SearchStrategy[Any]:
    """Limit values of one field; ``small``: strings of at most 40 characters (the elements of a 100,000-element list:
    100,000 copies of a 10 MB string would be a terabyte in this process)."""
    t = fd.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return _ints(INT32, -(2**31), 2**31 - 1)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _ints(INT64, -(2**63), 2**63 - 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return _ints(UINT32, 0, 2**32 - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return _ints(UINT64, 0, 2**64 - 1)
    if t == F.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == F.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return _SMALL_STRINGS if small else _STRINGS
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in fd.enum_type.values] + [999, -1])
    raise AssertionError(f"unhandled field type {t} of {fd.full_name}")


def messages(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of type ``desc`` with any subset of fields set to limit values (recursing 3 levels)."""
    cls = _class_of(desc)
    fields = [fd for fd in desc.fields if not (fd.message_type and fd.message_type.GetOptions().map_entry)]

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for fd in fields:
            if not draw(st.booleans()):
                continue
            repeated = fd.is_repeated
            if fd.type == F.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                sub = messages(fd.message_type, depth + 1)
                if repeated:
                    for m in draw(st.lists(sub, max_size=4)):
                        getattr(msg, fd.name).add().CopyFrom(m)
                else:
                    getattr(msg, fd.name).CopyFrom(draw(sub))
            elif repeated:
                if draw(st.integers(0, 9)) == 0:  # now and then a very long list
                    getattr(msg, fd.name).extend([draw(_scalar(fd, small=True))] * HUGE_LIST)
                else:
                    getattr(msg, fd.name).extend(draw(st.lists(_scalar(fd), max_size=6)))
            else:
                setattr(msg, fd.name, draw(_scalar(fd)))
        return msg

    return build()


def _class_of(desc: Descriptor) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def _invalid_utf8(msg: Any) -> bytes | None:
    """``msg`` serialized with one string field's bytes replaced by invalid UTF-8 of the same length."""
    for fd in msg.DESCRIPTOR.fields:
        if fd.type == F.TYPE_STRING and not fd.is_repeated:
            marker = "MARKERMARKER"
            clone = type(msg)()
            clone.CopyFrom(msg)
            setattr(clone, fd.name, marker)
            return clone.SerializeToString().replace(marker.encode(), b"\xff\xfe\xc0\xc1" * 3)
    return None


@st.composite
def payloads(draw: st.DrawFn, desc: Descriptor) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["message", "message", "truncated", "unknown-fields", "invalid-utf8", "random"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=512))
    msg = draw(messages(desc))
    raw = msg.SerializeToString()
    if kind == "truncated" and len(raw) > 1:
        return kind, raw[: draw(st.integers(1, len(raw) - 1))]
    if kind == "unknown-fields":
        tag = draw(st.integers(1000, 2**29 - 1))
        return kind, raw + ((tag << 3) | 2).to_bytes(4, "little")[:3] + b"\x03abc"
    if kind == "invalid-utf8":
        bad = _invalid_utf8(msg)
        return (kind, bad) if bad is not None else ("message", raw)
    return "message", raw


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_index: Path) -> Iterator[dict[str, ServiceProcess]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "roots").mkdir()
    args = {
        "reward": [],
        "retriever": ["--index-dir", str(tiny_index), "--http-port", "-1"],
        "simulator": [
            "--engine",
            "transformers",
            "--max-tokens",
            "16",
            "--tokens-per-doc",
            "8",
            "--top-k",
            "3",
            "--max-top-k",
            "3",
            "--max-batch",
            "4",
            "--torch-threads",
            "1",
        ],  # fmt: skip
        # An operator's prompt limit: without one a prompt may fill the model's context (8k tokens), and one 8k-token
        # prefill on CPU takes longer than the deadline and about 1 GB (found by this fuzzer).
        "policy": [
            "--max-new-tokens",
            "8",
            "--max-n",
            "2",
            "--max-batch-size",
            "4",
            "--torch-threads",
            "1",
            "--max-prompt-tokens",
            "1024",
            "--search-backend",
            "none",
            "--max-turns",
            "2",
            "--weights-roots",
            str(tmp / "roots"),
        ],  # fmt: skip
    }
    procs: dict[str, ServiceProcess] = {}
    try:
        for name, a in args.items():
            procs[name] = ServiceProcess(name, ["--max-concurrent-rpcs", "8", *a], timeout_s=300)
        yield procs
    finally:
        for p in procs.values():
            p.stop()
        if SEEN:
            print("\nfuzz: requests and statuses per service")
            for name, counts in SEEN.items():
                print(
                    f"  {name}: {sum(counts.values())} requests, "
                    + ", ".join(f"{k} {v}" for k, v in counts.most_common())
                )


def _call(channel: grpc.Channel, service: str, method: Any, payload: bytes) -> grpc.StatusCode:
    path = f"/{service}/{method.name}"
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path)(payload, timeout=DEADLINE_S):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=DEADLINE_S)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("name", list(SERVICES))
def test_generated_requests_get_only_client_error_statuses(servers: dict[str, ServiceProcess], name: str) -> None:
    proc = servers[name]
    service = SERVICES[name]
    opts = [("grpc.max_send_message_length", 64 * 2**20), ("grpc.max_receive_message_length", 64 * 2**20)]
    channel = grpc.insecure_channel(proc.target, options=opts)
    health = health_pb2_grpc.HealthStub(channel)
    rss_start = _rss_mb(proc.proc.pid)
    bad: list[str] = []

    def fuzzer(method: Any) -> Any:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(payloads(method.input_type))
        def fuzz(case: tuple[str, bytes]) -> None:
            kind, payload = case
            t0 = time.monotonic()
            code = _call(channel, service.full_name, method, payload)
            SEEN[name][code.name] += 1
            took = time.monotonic() - t0
            if code not in ALLOWED or took > DEADLINE_S + 5:
                bad.append(f"{method.name} {kind} ({len(payload)} bytes {payload[:80]!r}): {code.name} in {took:.1f}s")

        return fuzz

    # Passes of the same (derandomized) requests (two, or SEARCHRL_FUZZ_PASSES): the first warms up (model buffers,
    # allocator arenas sized by the largest request), the last must not grow memory further: a leak grows with every
    # pass.
    rss = [rss_start]
    for _ in range(PASSES):
        for method in service.methods:
            fuzzer(method)()
        assert proc.proc.poll() is None, f"{name} died"
        rss.append(_rss_mb(proc.proc.pid))
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    print(f"\n{name}: RSS {' -> '.join(f'{r:.0f}' for r in rss)} MB; statuses {dict(SEEN[name])}")
    assert not bad, f"{len(bad)} requests got a status other than {sorted(c.name for c in ALLOWED)}:\n" + "\n".join(
        bad[:20]
    )
    assert rss[-1] < rss[-2] * 1.10 + 50, f"{name} RSS grew from {rss[-2]:.0f} to {rss[-1]:.0f} MB in the last pass"
