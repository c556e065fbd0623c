"""Imports every built-in task module so that their ``@register_task`` runs."""

from lstmkit.tasks import corpora, synthetic  # noqa: F401
