"""Policy inference engines behind one async interface: :mod:`.base` (``PolicyEngine``, the log-prob convention),
:mod:`.transformers` (CPU), :mod:`.sglang` (GPU), :mod:`.remote` (the PolicyService as a backend), :mod:`.kv_cache`."""
