"""Named recipes (--recipe spec|tuned): a parser that fills the values a recipe names unless the command
line gave the flag, and records where each value came from.
"""
import argparse

RECIPE_NAMES = ("spec", "tuned")

_UNSET = object()           # marks a flag the command line did not give

KEEP_DEFAULT = object()     # a recipe rule's answer when the parser's default stays (e.g. a flag it yields to was given)


class RecipeParser(argparse.ArgumentParser):
    """An ArgumentParser with `--recipe {spec,tuned}`: parse_args gives every flag that `recipes[name]` names
    the recipe's value unless the command line gave the flag (in any form: --flag v, --flag=v, an
    abbreviation), and records in `args.value_sources` where each recipe-controlled value came from
    ('flag', 'recipe tuned' or 'default'). `spec` names no values: it is the parser's defaults.

    A recipe value is a constant or a rule `f(args, given) -> value or KEEP_DEFAULT`, evaluated after the
    constants (so it sees them), e.g. a warm-up that is a tenth of --num_epochs."""

    def __init__(self, *a, recipes: dict, **kw):
        super().__init__(*a, **kw)
        self.recipes = {"spec": {}, **recipes}
        assert set(self.recipes) == set(RECIPE_NAMES), self.recipes.keys()
        shown = "; ".join(f"{k}={_recipe_text(v)}" for k, v in self.recipes["tuned"].items())
        self.add_argument_group("recipe").add_argument(
            "--recipe", default="spec", choices=RECIPE_NAMES,
            help=f"spec: the original recipe's table, i.e. every default below; tuned: the measured recipe of "
                 f"benchmarks/label_efficiency.py ({shown}). Flags given explicitly win over the recipe "
                 f"(docs/design.md, Recipes)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if namespace is None:                  # a caller's namespace: its preset values are not ours to change
            apply_recipe(parsed, self.recipes, self._given(args))
        return parsed, extras

    def _given(self, argv) -> set:
        """The dests the command line set: parse again with every default replaced by a sentinel (argparse
        only fills in defaults for attributes the namespace lacks)."""
        probe = argparse.Namespace(**{a.dest: _UNSET for a in self._actions if a.default is not argparse.SUPPRESS})
        seen, _ = super().parse_known_args(argv, probe)
        return {k for k, v in vars(seen).items() if v is not _UNSET}


def _recipe_text(value) -> str:
    """A constant as written, a rule by its docstring (for --help)."""
    return (value.__doc__ or value.__name__) if callable(value) else str(value)


def apply_recipe(args, recipes: dict, given: set) -> None:
    """Set the values of recipe `args.recipe` that the command line did not give; fill `args.value_sources`."""
    values = recipes[args.recipe]
    sources = {}
    controlled = list(dict.fromkeys(k for r in recipes.values() for k in r))
    rules_last = sorted(controlled, key=lambda k: callable(values.get(k)))
    for name in rules_last:
        value = values.get(name, KEEP_DEFAULT)
        if name in given:
            sources[name] = "flag"
            continue
        if callable(value):
            value = value(args, given)
        if value is KEEP_DEFAULT:
            sources[name] = "default" if name not in values else f"default (recipe {args.recipe} leaves it here)"
        else:
            setattr(args, name, value)
            sources[name] = f"recipe {args.recipe}"
    args.value_sources = {k: sources[k] for k in controlled}
