"""``ServeConfig``: where the server listens and how much work it takes on (help reused by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigMixin, field
from ..errors import ConfigError


@dataclass
class ServeConfig(ConfigMixin):
    """Settings of ``ctxaware serve``."""

    host: str = field("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    port: int = field(8000, help="TCP port to listen on (0 = any free port)")
    max_concurrency: int = field(8, help="requests decoded together in the running batch")
    prefill_tokens: int = field(8192, help="padded prompt tokens prefilled together in one forward pass when "
                                "requests join the batch (rows × longest prompt; a longer prompt goes alone)")
    max_queue: int = field(64, help="requests waiting for a batch slot; beyond it the server answers 503")
    timeout: float = field(300.0, help="seconds a request may take, queueing included; then it gets a 504 error",
                           metavar="S")
    default_max_tokens: int = field(256, help="reply length limit of requests that set neither max_tokens nor "
                                    "max_completion_tokens (always capped by the context window)")

    def __post_init__(self) -> None:
        if not 0 <= int(self.port) <= 65535:
            raise ConfigError(f"port must lie in 0..65535, got {self.port}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.prefill_tokens < 1:
            raise ConfigError(f"prefill_tokens must be at least 1, got {self.prefill_tokens}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be 0 or more, got {self.max_queue}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be positive seconds, got {self.timeout}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be at least 1, got {self.default_max_tokens}")
