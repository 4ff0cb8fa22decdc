"""attnconv's own model classes: the MLA format (attnconv/models/mla.py), registered with transformers' Auto classes
as soon as transformers is imported in a process that imported attnconv (see attnconv/__init__.py)."""

from attnconv.models.mla import register_auto_classes

__all__ = ["register_auto_classes"]
