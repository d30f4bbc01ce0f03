"""Which class of a binary task is the positive (disease) one.

Every binary statistic (sensitivity, specificity, PPV, NPV, operating points, the decision curve,
the failure gallery, the decision threshold) is about the positive class, so meddiag puts it second:
a binary data set's ``class_names`` are always ``[negative, positive]`` and label 1 means the
finding. The positive class is chosen, in this order, by ``--positive-class NAME``, by the MedMNIST
catalog (e.g. ``malignant`` for BreastMNIST, whose file labels it 0), or, for two class names of
which exactly one reads as a normal finding (normal, benign, negative, healthy, ...), as the other;
otherwise the second in alphabetical order, with a warning asking for ``--positive-class``.
"""

from __future__ import annotations

import re
import warnings

from meddiag.errors import ConfigError

NEGATIVE_WORDS = {"normal", "benign", "negative", "neg", "healthy", "control", "controls", "no", "none", "absent",
                  "nofinding", "no_finding", "clear", "clean", "0", "false", "non"}


def reads_as_negative(name: str) -> bool:
    """Whether a class name reads as the absence of disease ("NORMAL", "normal, benign", "no finding")."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(words) and (words[0] in NEGATIVE_WORDS or "".join(words) in NEGATIVE_WORDS)


def positive_class_of(class_names: list[str], requested: str | None, source: str) -> tuple[str, str]:
    """(the positive class of a binary task, how it was chosen). :class:`ConfigError` when
    ``requested`` is not one of ``class_names``; a warning when nothing but the names' order decides."""
    if requested is not None:
        if requested not in class_names:
            raise ConfigError(f"--positive-class {requested}: {source} has the classes {', '.join(class_names)}")
        return requested, "given"
    negative = [reads_as_negative(n) for n in class_names]
    if sum(negative) == 1:
        return class_names[negative.index(False)], "the other class reads as normal"
    chosen = sorted(class_names)[1]
    warnings.warn(f"{source}: nothing says which of the classes {' / '.join(class_names)} is the finding; "
                  f"'{chosen}' is taken as the positive class (sensitivity, PPV and the threshold are about it). "
                  f"Pass --positive-class to choose", stacklevel=3)
    return chosen, "second in alphabetical order (ambiguous)"


def positive_last(class_names: list[str], positive: str) -> list[str]:
    """``class_names`` of a binary task as ``[negative, positive]``."""
    return [n for n in class_names if n != positive] + [positive]
