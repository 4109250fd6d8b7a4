"""PolicyService: policy inference engines (transformers on CPU, SGLang on GPU) and the gRPC server."""
