"""The comments that document config fields, read from the source that sets their defaults.

A default is documented where it is set (STYLE: a reconstructed choice is a config field
with its reason beside it), e.g. in a method's `sections()`:

    swap=ml_collections.ConfigDict(dict(
        forget_classes=(0, 1, 2, 3, 4),  # [unknown] in the paper: the authors' folders fix them

`comments(module, name)` finds the function or assignment `name` in `module`'s source and
returns {"swap.forget_classes": "[unknown] in the paper: ..."}: for every keyword of a
`dict(...)`/`ConfigDict(...)` call (or of a helper building a section), every string key
of a dict literal and every `c.field = ...` assignment, the comment at the end of its line
(shared by the fields on that line), the comment lines right above it at its indentation
and those right below it that are indented further (a continued comment). Lines above a
field that has its own comment at the end of its line, or that shares its line with other
fields, introduce a group: they become its section's comment (`"model"`), which the
printer shows on a line of its own. A helper called there (`ft=_sgd_section()`) is
followed into its body for the fields the call does not set. The config printer shows the
comments beside the values (`python -m kswap_jax.config`). Source that cannot be read
gives {}: the comments are documentation, never needed to run.
"""

from __future__ import annotations

import ast
import collections
import functools
import inspect
import io
import tokenize
from typing import Any


def _comment_lines(source: str) -> tuple[dict[int, str], dict[int, tuple[int, str]]]:
  """({line: the comment ending a line of code}, {line: (column, text) of a line that is
  only a comment})."""
  trailing, alone = {}, {}
  code_lines = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      line, col = tok.start
      text = tok.string.lstrip("#").strip()
      if line in code_lines:
        trailing[line] = text
      else:
        alone[line] = (col, text)
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      for line in range(tok.start[0], tok.end[0] + 1):
        code_lines.add(line)
  return trailing, alone


def _fields(node: ast.AST, prefix: str, out: dict[str, list[ast.AST]],
            local: dict[str, ast.AST], calls: list[tuple[str, str]]) -> None:
  """Each config field's nodes under `node`, by dotted path, in the order they take effect
  (`dict(BASE, field=...)`: the keyword, then BASE's); `local`: the enclosing
  function's names bound to a value (`scrub = dict(...)` then `cf_scrub=cd(scrub)`)."""
  if isinstance(node, ast.Name) and node.id in local:
    rest = {k: v for k, v in local.items() if k != node.id}  # a name is followed once
    _fields(local[node.id], prefix, out, rest, calls)
  elif isinstance(node, ast.Call):
    called = _dotted(node.func)
    if called:  # a helper's own defaults: `comments` follows it
      calls.append((prefix, called))
    for kw in node.keywords:  # first: dict(BASE, field=...) sets `field` here
      if kw.arg is not None:
        out.setdefault(prefix + kw.arg, []).append(kw)
        _fields(kw.value, f"{prefix}{kw.arg}.", out, local, calls)
    for arg in node.args:  # ConfigDict(dict(...)), dict(dict(...), **overrides)
      _fields(arg, prefix, out, local, calls)
  elif isinstance(node, ast.Dict):
    for key, value in zip(node.keys, node.values):
      if isinstance(key, ast.Constant) and isinstance(key.value, str):
        out.setdefault(prefix + key.value, []).append(key)
        _fields(value, f"{prefix}{key.value}.", out, local, calls)
  elif isinstance(node, ast.Assign) and len(node.targets) == 1:
    target, path = node.targets[0], []
    while isinstance(target, (ast.Attribute, ast.Subscript)):
      if isinstance(target, ast.Attribute):
        path.insert(0, target.attr)
      elif isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str):
        path.insert(0, target.slice.value)
      else:
        return
      target = target.value
    if path:  # c.section.field = value, out["section"] = value
      out.setdefault(prefix + ".".join(path), []).append(node)
      _fields(node.value, f"{prefix}{'.'.join(path)}.", out, local, calls)
    elif isinstance(target, ast.Name):  # a local: its fields where it is used
      local[target.id] = node.value
  elif isinstance(node, (ast.Return, ast.Expr)) and node.value is not None:
    _fields(node.value, prefix, out, local, calls)
  elif isinstance(node, (ast.If, ast.With, ast.For)):  # not a nested def: its own scope
    for statement in node.body:
      _fields(statement, prefix, out, local, calls)


def _dotted(node: ast.AST) -> str:
  """`f` or `config_lib.f` as a dotted name ("" for any other callee)."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    inner = _dotted(node.value)
    return f"{inner}.{node.attr}" if inner else ""
  return ""


@functools.lru_cache(maxsize=64)
def _parsed(path: str) -> tuple[ast.Module, dict, dict] | None:
  """A source file's tree and comment lines (read once per process: the printer asks for
  many methods of one module)."""
  try:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    return (ast.parse(source), *_comment_lines(source))
  except (OSError, SyntaxError, ValueError, tokenize.TokenError):
    return None


def comments(module: Any, name: str, prefix: str = "") -> dict[str, str]:
  """{dotted field: its comment} for the fields that `name` (a function or a module-level
  assignment in `module`) sets, under `prefix` ("model." for a model's DEFAULTS)."""
  try:
    parsed = _parsed(inspect.getsourcefile(module) or "")
  except TypeError:  # no source file (a built-in or a module made in memory)
    parsed = None
  if parsed is None:
    return {}
  tree, trailing, alone = parsed
  # Module-level names, for a default built from another (FACE_DEFAULTS = dict(DEFAULTS, ..)).
  top = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
         for t in node.targets if isinstance(t, ast.Name)}
  nodes: dict[str, list[ast.AST]] = {}
  calls: list[tuple[str, str]] = []
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and node.name == name:
      local = dict(top)
      for statement in node.body:
        _fields(statement, prefix, nodes, local, calls)
    elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                              for t in node.targets):
      _fields(node.value, prefix, nodes, {k: v for k, v in top.items() if k != name}, calls)
  # Lines that set several fields of one section.
  shared = {key for key, count in collections.Counter(
      (field.rpartition(".")[0], n.lineno) for field, found in nodes.items()
      for n in found).items() if count > 1}
  out, headings = {}, {}
  for field, candidates in nodes.items():
    for node in candidates:
      section = field.rpartition(".")[0]
      heading, text = _comment(node, trailing, alone, (section, node.lineno) in shared)
      if heading and not section:  # a top-level field: no section to introduce
        heading, text = "", " ".join(filter(None, (heading, text)))
      if heading and section and heading not in headings.setdefault(section, []):
        headings[section].append(heading)
      if text:
        out.setdefault(field, text)
  for section, found in headings.items():  # after the section's own comment, if any
    out[section] = " ".join(([out[section]] if section in out else []) + found)
  # The defaults a helper sets in its own body (`ft=_sgd_section()`), under the section it
  # builds; not for a field the call sets (`lora_section(alpha=8.0)`: the helper's comment
  # describes its own default).
  for at, called in calls:
    helper = module
    for part in called.split("."):
      helper = getattr(helper, part, None)
    if at and inspect.isfunction(helper) and helper not in _FOLLOWING:
      _FOLLOWING.add(helper)
      try:
        helper_module = (module if helper.__globals__ is getattr(module, "__dict__", None)
                         else inspect.getmodule(helper))
        for field, text in comments(helper_module, helper.__name__, at).items():
          if field not in nodes:
            out.setdefault(field, text)
      finally:
        _FOLLOWING.discard(helper)
  return out


_FOLLOWING: set = set()  # the helpers being followed: one that calls itself is read once


def _comment(node: ast.AST, trailing: dict, alone: dict, shared: bool) -> tuple[str, str]:
  """(a heading of the section, the comment of the field) that `node` sets (the module
  docstring's rule). The lines above a field are a heading of its section, not its own
  comment, when the field has its own comment at the end of its line, or shares its line
  with other fields (`# SFR-on's recipe:` above `iterations=1500, forget_every=5, ...`)."""
  first, last = node.lineno, getattr(node, "end_lineno", node.lineno)
  above = []
  line = first - 1
  while line in alone and abs(alone[line][0] - node.col_offset) <= 1:  # its own indent
    above.insert(0, alone[line][1])
    line -= 1
  below = []
  line = last + 1
  while line in alone and alone[line][0] > node.col_offset:
    below.append(alone[line][1])
    line += 1
  # The comment ending its line; a field written over several lines has its inner
  # fields' comments there, not its own.
  own = trailing.get(last) if first == last else None
  if above and (own or shared):
    return " ".join(above), " ".join([own] + below) if own else ""
  parts = above + ([own] if own else [])
  parts = parts + below if own else parts
  return "", " ".join(p for p in parts if p)
