"""attnconv's own model classes: the MLA format (attnconv/models/mla.py), registered with transformers' Auto classes
as soon as transformers is imported in a process that imported attnconv (see attnconv/__init__.py). Importing this
package imports neither torch nor transformers (models/mla_layout.py is read by the conversion too)."""


def register_auto_classes() -> None:
    from attnconv.models.mla import register_auto_classes as register

    register()


__all__ = ["register_auto_classes"]
