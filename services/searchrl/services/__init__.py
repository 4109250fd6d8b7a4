"""Shared gRPC server runtime, service entrypoints, policy inference, reward scoring and the Redis layer."""
