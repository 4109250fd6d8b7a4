"""Which RPCs change a server's state, read from the protos (protobuf's ``MethodOptions.idempotency_level``).

The protos mark every method without side effects ``option idempotency_level = NO_SIDE_EFFECTS``. Clients retry only
those (:func:`searchrl.client.base.service_config_json`); servers with auth on let only the admin token call the
others (``PolicyService.LoadWeights``; :class:`searchrl.serving.runtime.GrpcServer`).
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool

_SAFE = (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)


def retryable_methods(service_name: str) -> list[str]:
    """Methods of ``service_name`` (fully qualified, e.g. ``searchrl.policy.v1.PolicyService``) that the proto marks
    ``NO_SIDE_EFFECTS`` or ``IDEMPOTENT``, in declaration order. Empty for a service whose generated module has not
    been imported (it is not in the default descriptor pool)."""
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        return []
    return [m.name for m in service.methods if m.GetOptions().idempotency_level in _SAFE]


def changes_state(method_path: str) -> bool:
    """True for a ``/package.Service/Method`` path whose proto declares no idempotency level (it may change the
    server's state); False for a side-effect-free method and for a path not in the descriptor pool."""
    service, _, method = method_path.lstrip("/").rpartition("/")
    try:
        desc = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    except KeyError:
        return False
    return desc is not None and desc.GetOptions().idempotency_level not in _SAFE
