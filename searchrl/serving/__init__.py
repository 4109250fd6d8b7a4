"""What every gRPC service shares: settings, the server runtime, the Redis search cache."""
