"""The Python client SDK for searchrl's gRPC services.

Every client takes a target (``host:port``, or ``dns:///name.namespace.svc:port`` for a headless Kubernetes Service, so
that ``round_robin`` spreads calls over every replica), optional TLS and bearer token, a default deadline, and retries
UNAVAILABLE with exponential backoff through the gRPC service config.

    >>> from searchrl.client import RewardClient
    >>> async with RewardClient("127.0.0.1:50051") as rc:
    ...     results = await rc.score(["<answer>\\boxed{Paris}</answer>"], [["Paris"]])
"""

from searchrl.client.base import ChannelOptions, make_channel, service_config_json

__all__ = [
    "ChannelOptions",
    "make_channel",
    "service_config_json",
    "RewardClient",
    "RetrievalClient",
    "SimulatorClient",
    "PolicyClient",
]


def __getattr__(name: str) -> type:  # lazy: importing the SDK must not import every service's stubs
    if name == "RewardClient":
        from searchrl.client.reward import RewardClient

        return RewardClient
    if name == "RetrievalClient":
        from searchrl.client.retrieval import RetrievalClient

        return RetrievalClient
    if name == "SimulatorClient":
        from searchrl.client.simulation import SimulatorClient

        return SimulatorClient
    if name == "PolicyClient":
        from searchrl.client.policy import PolicyClient

        return PolicyClient
    raise AttributeError(name)
