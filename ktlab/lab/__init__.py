"""The lab: a notebook-facing :class:`Session`, its dashboard and plots."""

from ktlab.lab.session import Session

__all__ = ["Session"]
