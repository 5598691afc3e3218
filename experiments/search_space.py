"""The search space of search.py: HParams field -> distribution, declared once, and how a trial samples it.

A distribution is a short list: `["log", low, high]` (log-uniform float), `["uniform", low, high]`,
`["int", low, high]` (every integer from low to high) or `["choice", a, b, ...]`. A `--space FILE` holds a JSON
object of the same form, which replaces `DEFAULT_SPACE`.

The field `routing` picks the routing form and becomes main.py's `--routing` flag: the form's values
(hparams.ROUTING_FORMS) are applied after the preset and before the trial's other fields, which win. The
released code's activation multiplies b_a by 5000 and b_v by 16 (ln 2π + 1) in the logit, and its class layer's
λ and W scale are much smaller, so one range per field cannot suit both forms. A field may therefore map to one
distribution per form, `{"paper": [...], "official": [...]}`: its parameter is then named `<form>.<field>` and
sampled only in trials of that form, and a form left out keeps its own value of the field. No flags are read here.
"""

import dataclasses
import json

import hparams
from run.run_dir import UsageError

KINDS = ("log", "uniform", "int", "choice")

# Paper-form ranges bracket the paper's defaults (β 0, λ 0.01, W std 0.5) and the small preset's centred β_v 3.8
# (hparams.CENTRED_BETA_V) and λ 0.1; the paper preset's searched class λ 0.00457 (hparams.SEARCHED_THREE_ITERATIONS,
# found with a space of its own: docs/experiments.md, tenth round) lies below them. Official-form ranges bracket the
# released code's own values (hparams.ROUTING_FORMS: b_a 0.5, b_v 0.5 / 2.0 class, λ 0.01 / 0.0025 class, W std
# 0.3 / 0.01 class). The form 'official-activation' has the paper's logit (the paper form's λ and β ranges) and the
# released W std ranges.
DEFAULT_SPACE = {
    "routing": ["choice", *hparams.ROUTING_FORMS],
    "learning_rate": ["log", 1e-3, 3e-2],  # Adam: 3e-3 in the official code, 0.01 in the small preset
    "iterations": ["int", 1, 3],  # the paper routes 3 times; ablate.py's Table-1 study compares 1..3
    "margin_schedule": ["choice", *hparams.MARGIN_SCHEDULES],
    "final_lambda": {"paper": ["log", 1e-2, 1.0], "official": ["log", 1e-3, 0.1]},
    "class_final_lambda": {"paper": ["log", 1e-2, 1.0], "official": ["log", 2.5e-4, 2.5e-2]},
    "beta_v_init": {"paper": ["uniform", 0.0, 5.0], "official": ["uniform", 0.0, 2.0]},
    "class_beta_v_init": {"paper": ["uniform", 0.0, 5.0], "official": ["uniform", 0.0, 4.0]},
    "beta_a_init": {"paper": ["uniform", -1.0, 1.0], "official": ["uniform", 0.0, 1.0]},
    "weight_stddev": {"paper": ["log", 0.1, 1.0], "official": ["log", 0.1, 1.0]},
    "class_weight_stddev": {"paper": ["log", 0.1, 1.0], "official": ["log", 1e-3, 0.1]},
}
for _name in ("final_lambda", "class_final_lambda", "beta_v_init", "class_beta_v_init", "beta_a_init"):
    DEFAULT_SPACE[_name]["official-activation"] = DEFAULT_SPACE[_name]["paper"]
for _name in ("weight_stddev", "class_weight_stddev"):
    DEFAULT_SPACE[_name]["official-activation"] = DEFAULT_SPACE[_name]["official"]
_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(hparams.HParams)}


def load(path):
    """The space in the JSON file at `path` (UsageError naming the file when unreadable)."""
    try:
        with open(path) as f:
            space = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError("--space %s: %s" % (path, str(error).splitlines()[0])) from None
    if not isinstance(space, dict) or not space:
        raise UsageError("--space %s must hold a JSON object of field -> distribution" % path)
    return space


def _check_distribution(name, distribution):
    """UsageError naming the parameter unless `distribution` is a well-formed list for its field's type."""
    field = name.rpartition(".")[2]
    kind = distribution[0] if isinstance(distribution, list) and distribution else None
    if kind not in KINDS:
        raise UsageError("%s: a distribution is a list starting with one of %s, got %r" % (name, KINDS, distribution))
    values = distribution[1:]
    if kind == "choice":
        if not values or not all(_suits(field, value) for value in values):
            raise UsageError("%s: 'choice' needs one or more %s values, got %r" % (name, field_type(field), values))
        return
    if (kind == "int") != (_FIELD_TYPES[field] is int) or _FIELD_TYPES[field] not in (int, float):
        raise UsageError("%s: %r is not for %s fields" % (name, kind, field_type(field)))
    if len(values) != 2 or not all(_suits(field, value) for value in values) or not values[0] <= values[1]:
        raise UsageError(
            "%s: %r needs [low, high] (%s) with low <= high, got %r" % (name, kind, field_type(field), values)
        )
    if kind == "log" and values[0] <= 0:
        raise UsageError("%s: 'log' needs low > 0, got %r" % (name, values[0]))


def _suits(field, value):
    """Whether a JSON value has the field's type (an integer suits a float field; true/false only a bool one)."""
    expected = _FIELD_TYPES[field]
    return type(value) in (int, float) if expected is float else type(value) is expected


def field_type(field):
    """The name of an HParams field's type ('routing' is a string)."""
    return _FIELD_TYPES[field].__name__


def forms_of(space, base_routing):
    """The routing forms trials can have: the space's `routing` choices, or else `base_routing` alone."""
    return space["routing"][1:] if "routing" in space else [base_routing]


def check(space, base_routing, resolve):
    """Returns `space` after checking it; UsageError (one line, naming the parameter) for any flaw.

    Args:
      space: field -> distribution, or field -> {form: distribution}.
      base_routing: the routing form of trials when the space does not choose one.
      resolve: called with (routing form, {field: value}); raises UsageError when they make no valid HParams.
        Every end of every range is tried on its own, in every form.
    """
    for field, distribution in space.items():
        if field not in _FIELD_TYPES:
            raise UsageError("unknown field %r (the fields of HParams in hparams.py)" % field)
        if field == "routing" and (
            not isinstance(distribution, list) or distribution[:1] != ["choice"] or len(distribution) < 2
        ):
            raise UsageError("routing: must be ['choice', ...] of %s" % "/".join(hparams.ROUTING_FORMS))
        if isinstance(distribution, dict):
            unknown = set(distribution) - set(hparams.ROUTING_FORMS)
            if unknown:
                raise UsageError("%s: unknown routing form %r" % (field, sorted(unknown)[0]))
            for form, per_form in distribution.items():
                _check_distribution("%s.%s" % (form, field), per_form)
        else:
            _check_distribution(field, distribution)
    for form in forms_of(space, base_routing):
        if form not in hparams.ROUTING_FORMS:
            raise UsageError("routing: unknown form %r (choose from %s)" % (form, "/".join(hparams.ROUTING_FORMS)))
        for name, distribution in _parameters(space, form):
            for value in distribution[1:] if distribution[0] == "choice" else distribution[1:3]:
                try:
                    resolve(form, {name.rpartition(".")[2]: value})
                except UsageError as error:
                    raise UsageError("%s=%r with routing %s: %s" % (name, value, form, error)) from None
    return space


def _parameters(space, form):
    """[(parameter name, distribution)] a trial of routing `form` samples, besides `routing` itself."""
    found = []
    for field, distribution in space.items():
        if field == "routing":
            continue
        if isinstance(distribution, dict):
            if distribution.get(form) is not None:
                found.append(("%s.%s" % (form, field), distribution[form]))
        else:
            found.append((field, distribution))
    return found


def suggest(trial, space, base_routing):
    """Samples a trial's parameters (the routing form first, then that form's fields); returns trial.params."""
    form = _sample(trial, "routing", space["routing"]) if "routing" in space else base_routing
    for name, distribution in _parameters(space, form):
        _sample(trial, name, distribution)
    return trial.params


def _sample(trial, name, distribution):
    kind, values = distribution[0], distribution[1:]
    if kind == "choice":
        return trial.suggest_categorical(name, values)
    if kind == "int":
        return trial.suggest_int(name, values[0], values[1])
    return trial.suggest_float(name, float(values[0]), float(values[1]), log=kind == "log")


def fields_of(params):
    """(routing form or None, {HParams field: value}) of a trial's parameters ('<form>.<field>' -> field)."""
    fields = {name.rpartition(".")[2]: value for name, value in params.items()}
    return fields.pop("routing", None), fields


def hparams_text(fields):
    """{field: value} as main.py's --hparams text, 'name=value,...' in name order (floats round-trip exactly)."""
    return ",".join("%s=%s" % (name, fields[name]) for name in sorted(fields))
