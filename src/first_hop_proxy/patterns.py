"""What a configured regular expression can cost, and what happens when it costs too much.

Every pattern in the config (rewrite rules, hard stops, status
recategorizations) runs on text an upstream or a client chose. A pattern such
as ``(x|xx)+$`` can take exponential time on a text that almost matches, so
each runs under a time limit (the ``regex`` module's ``timeout``), except a
pattern :func:`bounded` proves cannot run away. A rule that runs out of time is
skipped for that text and reported as a :class:`RuleTimeout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex  # type: ignore[import-untyped, unused-ignore]

#: How many ``|`` a pattern without repetition may hold and still count as bounded.
MAX_BOUNDED_BRANCHES = 4
VERBOSE = regex.compile(r"\(\?[a-zA-Z^-]*x")
_COUNTED = regex.compile(r"\{(\d*)(,?)(\d*)\}")


@dataclass(frozen=True, slots=True)
class RuleTimeout:
    """A rule ran out of time on one text and was skipped for it."""

    section: str
    index: int
    description: str
    role: str | None

    def __str__(self) -> str:
        where = f" on a {self.role} message" if self.role else ""
        about = f" ({self.description})" if self.description else ""
        return f"{self.section}.rules[{self.index}]{about} timed out{where}; skipped"


def bounded(pattern: str, flags: str = "") -> bool:
    """Whether every match attempt of ``pattern`` costs at most a few passes over it.

    Without repetition or backreferences, backtracking can only try the
    alternatives of each ``|`` (at most 2 ** branches ways), so a rule is
    linear in the text and cannot run away. Unsure syntax counts as unbounded.
    """
    if "x" in flags or VERBOSE.search(pattern):
        return False  # a comment could hide a "[" that misleads the scan below
    branches = 0
    opened = False  # the previous token is an unescaped "(": a "?" now starts group syntax
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if (nxt.isdigit() and nxt != "0") or nxt in ("g", "k"):
                return False  # a backreference
            i, opened = i + 2, False
            continue
        if ch == "[":
            i, opened = class_end(pattern, i), False
            continue
        if ch in "*+{" or (ch == "?" and not opened):
            return False  # repetition
        if ch == "?":
            kind = pattern[i + 1 : i + 3]
            if kind[:1] in ("(", "R", "&", "|") or kind[:1].isdigit() or kind in ("P=", "P>"):
                return False  # conditionals, recursion, branch reset, named backreferences
        branches += ch == "|"
        opened = ch == "("
        i += 1
    return branches <= MAX_BOUNDED_BRANCHES


def class_end(pattern: str, i: int) -> int:
    """The index just past the character class that starts at ``pattern[i]``."""
    j = i + 1
    if pattern[j : j + 1] == "^":
        j += 1
    if pattern[j : j + 1] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _repeats(pattern: str, i: int) -> bool:
    """Whether a quantifier that matches a varying number of times starts at ``pattern[i]``."""
    ch = pattern[i : i + 1]
    if ch in ("*", "+"):
        return True
    if ch != "{":
        return False
    counted = _COUNTED.match(pattern, i)
    if counted is None or not (counted[1] or counted[3]):
        return False  # a literal "{"
    low, comma, high = counted.groups()
    return bool(comma) and (not high or int(high) > int(low or 0))


def nested_repetition(pattern: str, flags: str = "") -> bool:
    """Whether a repeated group holds a repetition or an alternation: ``(a+)+``, ``(x|xx)*``.

    Such a pattern can try exponentially many ways to split a text that almost
    matches (34 ``x`` and a ``!`` took ``(x|xx)+$`` 8 s). A verbose pattern is
    not scanned (a comment could mislead the scan), so it gets no warning.
    """
    if "x" in flags or VERBOSE.search(pattern):
        return False
    groups: list[bool] = []  # per open group: whether it holds a repetition or an alternation
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            i = class_end(pattern, i)
            continue
        if ch == "(":
            groups.append(False)
            i += 2 if pattern[i + 1 : i + 2] == "?" else 1  # "(?": group syntax, no quantifier
            continue
        if ch == ")":
            inner = groups.pop() if groups else False
            repeated = _repeats(pattern, i + 1)
            if repeated and inner:
                return True
            if groups and (repeated or inner):
                groups[-1] = True
        elif groups and (ch == "|" or _repeats(pattern, i)):
            groups[-1] = True
        i += 1
    return False


#: Inline flags or named groups: the scan in :func:`required_literal` does not follow them.
_INLINE_SYNTAX = regex.compile(r"\(\?[a-zA-Z]")
#: A literal shorter than this is too common to tell texts apart.
MIN_REQUIRED_LITERAL = 3


def required_literal(pattern: str, flags: str = "") -> str | None:
    """A run of plain characters that every match of ``pattern`` contains, else None.

    When a text lacks it, the pattern cannot match that text, however long it
    would take to find that out: the caller can then skip the pattern, or run
    it where its time limit would not matter. Only the top level is read
    (groups, classes and escapes such as ``\\d`` end a run; a quantifier drops
    the character before it); anything unusual gives None.
    """
    if "i" in flags or "x" in flags or VERBOSE.search(pattern) or _INLINE_SYNTAX.search(pattern):
        return None
    runs: list[str] = []
    run: list[str] = []
    depth = 0
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if depth == 0 and nxt and nxt.isascii() and not nxt.isalnum():
                run.append(nxt)  # an escaped punctuation character is itself
            elif depth == 0:
                runs.append("".join(run))
                run = []
            i += 2
            continue
        if ch == "[":
            runs.append("".join(run))
            run = []
            i = class_end(pattern, i)
            continue
        if ch in "()":
            depth += 1 if ch == "(" else -1
            if depth < 0:
                return None
            runs.append("".join(run))
            run = []
            i += 1
            continue
        if depth:
            i += 1
            continue
        if ch == "|":
            return None  # another branch need not contain it
        if ch in "*+?{":  # the character before may be absent, or repeated
            if run:
                run.pop()
            runs.append("".join(run))
            run = []
            if ch == "{":
                close = pattern.find("}", i)
                i = n if close == -1 else close + 1
            else:
                i += 1
            if pattern[i : i + 1] in ("?", "+"):
                i += 1  # lazy or possessive
            continue
        if ch in ".^$":
            runs.append("".join(run))
            run = []
        else:
            run.append(ch)
        i += 1
    if depth:
        return None
    runs.append("".join(run))
    best = max(runs, key=len)
    return best if len(best) >= MIN_REQUIRED_LITERAL else None
