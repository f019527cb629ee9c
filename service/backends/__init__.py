"""Generation backends: the engine hands them projected queries and prompts, they return `Generated` rows.

    torch  service.backends.torch_backend.TorchBackend   our decode loop, scheduled token by token (CPU or CUDA)
    vllm   service.backends.vllm_backend.VllmBackend     vLLM AsyncLLM fed with prompt embeddings

See `service.backends.base.Backend` for the interface.
"""
