"""Reading a recipe's YAML: safe loading that keeps each node's line, with the file's size, nesting and expanded
aliases bounded so that a hostile file fails at once, in one line, instead of exhausting memory or the stack."""

from __future__ import annotations

from pathlib import Path

from attnconv.errors import AttnconvError


class RecipeError(AttnconvError):
    """Every problem of a recipe, one message each; str() joins them on one line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


MAX_BYTES = 1 << 20  # a recipe is a few KB; a bigger file is not one
MAX_DEPTH = 50  # stages -> stage -> command -> settings -> a list: 5 levels are used
MAX_NODES = 100_000  # nodes after expanding aliases (a "billion laughs" file expands to 9**9)


def _bounded_loader(text: str):
    """A safe YAML loader that refuses deep nesting while composing (the composer recurses per level)."""
    import yaml

    def too_deep(mark):
        return yaml.scanner.ScannerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)

    class Loader(yaml.SafeLoader):
        depth = 0

        # The scanner's work per token grows with the open brackets and indents: stop before it is quadratic.
        def fetch_flow_collection_start(self, token_class):
            if self.flow_level >= MAX_DEPTH:
                raise too_deep(self.get_mark())
            super().fetch_flow_collection_start(token_class)

        def add_indent(self, column):
            if len(self.indents) >= MAX_DEPTH:
                raise too_deep(self.get_mark())
            return super().add_indent(column)

        def compose_node(self, parent, index):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise too_deep(self.peek_event().start_mark)
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return Loader(text)


def _expanded_size(node) -> int:
    """How many nodes NODE stands for once every alias is expanded; each node counted once (memoised)."""
    import yaml

    sizes: dict[int, int] = {}
    order, stack = [], [node]
    while stack:  # children before parents, without recursion
        n = stack.pop()
        if id(n) in sizes:
            continue
        sizes[id(n)] = 0
        order.append(n)
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            stack.extend(x for pair in n.value for x in pair)
    for n in reversed(order):
        children = n.value if isinstance(n, yaml.SequenceNode) else \
            [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else []
        sizes[id(n)] = min(1 + sum(sizes[id(c)] for c in children), MAX_NODES + 1)
    return sizes[id(node)]


def read_yaml(path: Path):
    """(node tree, data): the nodes keep each key's line and show duplicate keys, which plain loading hides. The
    file's size, nesting and expanded aliases are bounded, so a hostile file fails at once in one line."""
    import yaml

    try:
        if path.stat().st_size > MAX_BYTES:
            raise AttnconvError(f"{path} is {path.stat().st_size:,} bytes; a recipe is at most {MAX_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AttnconvError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise AttnconvError(f"{path} is a folder; pass the recipe's .yaml file") from None
    except UnicodeDecodeError:
        raise AttnconvError(f"{path} is not UTF-8 text; save the recipe as UTF-8") from None
    loader = _bounded_loader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_NODES:
            raise RecipeError([f"{path.name}: expands to more than {MAX_NODES:,} values through its aliases (& and "
                               "*); write the stages out"])
        return node, (loader.construct_document(node) if node is not None else None)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark is not None else path.name
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise RecipeError([f"{where}: not valid YAML ({what})"]) from None
    except ValueError:  # PyYAML's int() of more digits than Python converts (4,300)
        raise RecipeError([f"{path.name}: a number has thousands of digits; no setting takes one"]) from None
    finally:
        loader.dispose()


def duplicate_keys(node, where) -> list[str]:
    """A problem for each key the mapping NODE gives twice (loading keeps the last silently); WHERE(line) names
    the place."""
    seen, problems = set(), []
    for key, _ in node.value:
        if key.value in seen:
            problems.append(f"{where(key.start_mark.line + 1)}: {key.value!r} is given twice; keep one")
        seen.add(key.value)
    return problems
