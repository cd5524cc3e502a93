"""The lab: a notebook-facing :class:`Session`, its dashboard and plots."""

from ktlab.lab.session import Session
from ktlab.lab.workloads import ChatCacheConfig

__all__ = ["ChatCacheConfig", "Session"]
