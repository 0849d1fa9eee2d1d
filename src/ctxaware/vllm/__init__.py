"""ctxaware inside vLLM: per-request user-turn steering as a vLLM plugin.

`plugin.register` is the `vllm.general_plugins` entry point; `request` defines the request extension
and the `SamplingParams.extra_args` keys; nothing here imports vLLM at package import time.
"""
