"""Named recipes (--recipe spec|tuned): a parser that fills the values a recipe names unless the command
line gave the flag, and records where each value came from.
"""
import argparse

from utils import UserError

RECIPE_NAMES = ("spec", "tuned")

_UNSET = object()           # marks a flag the command line did not give

KEEP_DEFAULT = object()     # a recipe rule's answer when the parser's default stays (e.g. a flag it yields to was given)


class RecipeParser(argparse.ArgumentParser):
    """An ArgumentParser with `--recipe {spec,tuned}`: parse_args gives every flag that `recipes[name]` names
    the recipe's value unless the command line gave the flag (in any form: --flag v, --flag=v, an
    abbreviation), and records in `args.value_sources` where each recipe-controlled value came from
    ('flag', 'recipe tuned' or 'default'). `spec` names no values: it is the parser's defaults.

    A recipe value is a constant or a rule `f(args, given) -> value or KEEP_DEFAULT`, evaluated after the
    constants (so it sees them), e.g. a warm-up that is a tenth of --num_epochs.

    `sets` names flags that, when nonzero, set other flags ({"num_steps": ("num_epochs",)}): value_sources
    records those other flags too, a recipe value of the setter yields to any of them given on the command line,
    and `refuse_contradictions` refuses a setter and a flag it sets both given."""

    def __init__(self, *a, recipes: dict, sets: dict | None = None, **kw):
        super().__init__(*a, **kw)
        self.recipes = {"spec": {}, **recipes}
        self.sets = sets or {}
        assert set(self.recipes) == set(RECIPE_NAMES), self.recipes.keys()
        unless = {k: f" (unless {' or '.join('--' + t for t in ts)} is given)" for k, ts in self.sets.items()}
        shown = "; ".join(f"{k}={recipe_text(v)}{unless.get(k, '')}" for k, v in self.recipes["tuned"].items())
        self.add_argument_group("recipe").add_argument(
            "--recipe", default="spec", choices=RECIPE_NAMES,
            help=f"spec: the original recipe's table, i.e. every default below; tuned: the measured recipe of "
                 f"benchmarks/label_efficiency.py ({shown}). Flags given explicitly win over the recipe "
                 f"(docs/design.md, Recipes)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if namespace is None:                  # a caller's namespace: its preset values are not ours to change
            apply_recipe(parsed, self.recipes, self._given(args), self.sets)
        return parsed, extras

    def _given(self, argv) -> set:
        """The dests the command line set: parse again with every default replaced by a sentinel (argparse
        only fills in defaults for attributes the namespace lacks)."""
        probe = argparse.Namespace(**{a.dest: _UNSET for a in self._actions if a.default is not argparse.SUPPRESS})
        seen, _ = super().parse_known_args(argv, probe)
        return {k for k, v in vars(seen).items() if v is not _UNSET}


def recipe_text(value) -> str:
    """A constant as written, a rule by its docstring (for --help)."""
    return (value.__doc__ or value.__name__) if callable(value) else str(value)


def apply_recipe(args, recipes: dict, given: set, sets: dict | None = None) -> None:
    """Set the values of recipe `args.recipe` that the command line did not give; fill `args.value_sources`
    (also for the flags that a flag in `sets` sets)."""
    values, sets = recipes[args.recipe], sets or {}
    sources = {}
    controlled = list(dict.fromkeys([k for r in recipes.values() for k in r] + [t for ts in sets.values() for t in ts]))
    rules_last = sorted(controlled, key=lambda k: callable(values.get(k)))
    for name in rules_last:
        value = values.get(name, KEEP_DEFAULT)
        yields_to = [t for t in sets.get(name, ()) if t in given]
        if name in given:
            sources[name] = "flag"
            continue
        if yields_to and value is not KEEP_DEFAULT:
            sources[name] = f"default (recipe {args.recipe} yields to --{yields_to[0]})"
            continue
        if callable(value):
            value = value(args, given)
        if value is KEEP_DEFAULT:
            sources[name] = "default" if name not in values else f"default (recipe {args.recipe} leaves it here)"
        else:
            setattr(args, name, value)
            sources[name] = f"recipe {args.recipe}"
    args.value_sources = {k: sources[k] for k in controlled}


def given_flags(args) -> set:
    """The recorded flags (value_sources) that the command line gave; none for a namespace built without a
    RecipeParser."""
    return {k for k, source in getattr(args, "value_sources", {}).items() if source == "flag"}


def refuse_contradictions(args, sets: dict) -> None:
    """A nonzero setter flag and a flag it sets, both given: a UserError naming both (neither silently wins)."""
    given = given_flags(args)
    for setter, targets in sets.items():
        for target in targets:
            if setter in given and getattr(args, setter) and target in given:
                shown = "" if isinstance(getattr(args, target), bool) else f" {getattr(args, target)}"
                raise UserError(f"--{setter} {getattr(args, setter)} sets --{target}, which was also given "
                                f"(--{target}{shown}); give one of the two")
