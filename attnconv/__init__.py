"""attnconv: convert multi-head attention checkpoints into attention with a smaller KV cache.

Importing attnconv registers its own architectures (the attnconv MLA format) with transformers' Auto classes, so
`import attnconv; AutoModelForCausalLM.from_pretrained(OUT)` loads them. transformers (and torch) are not imported
for this: the registration runs when transformers is first imported, or at once if it already is, which keeps
the command line quick to start.
"""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"


def _register() -> None:
    mla = sys.modules.get("attnconv.models.mla")
    if mla is not None and not hasattr(mla, "register_auto_classes"):
        return  # transformers was first imported by attnconv.models.mla itself, which registers once it is complete
    from attnconv.models import register_auto_classes

    register_auto_classes()


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Runs `_register` right after the `transformers` package has been imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
