"""What the SDK raises: every error says what to check or do next."""

from __future__ import annotations

from ctxflow.streams.config import Settings

#: What to check when the broker does not answer.
CHECK_BROKER = (
    "check that the broker is running (`ctxflow up`), that the bootstrap address (CTXFLOW_BOOTSTRAP) "
    "names its host:port, and that its advertised listener is reachable from this host"
)


class CtxflowError(Exception):
    """Base class of every error the SDK raises."""


class BrokerUnavailable(CtxflowError):
    """The broker could not be reached within the connect timeout; the message says what to check."""


class TopicMissing(CtxflowError):
    """A topic the client needs does not exist on the broker; the message says how to create it."""

    def __init__(self, topic: str, settings: Settings) -> None:
        super().__init__(
            f"topic {topic} does not exist on the broker at {settings.bootstrap}: create the topics with `ctxflow up` "
            f"(or `ctxflow topics create`), or check CTXFLOW_TOPIC_PREFIX (now {settings.topic_prefix!r}); ctxflow "
            "never lets the broker auto-create a topic with its default partition count")
        self.topic = topic


class PublishFailed(CtxflowError):
    """Some queued records were not acknowledged; ``failures`` holds ``(topic, error)`` for the first ones."""

    def __init__(self, message: str, failures: list[tuple[str, BaseException]]) -> None:
        super().__init__(message)
        self.failures = failures
