#!/usr/bin/env python3
"""Lists the import circles between files of src/ (issue 20: no two files import each other,
directly or in a loop). An edge A -> B is any `crate::`, `super::` or `self::` path in A
(in `use` lines, braces expanded, and in code) that names an item of file B. Not counted, as
the issue says: a child module using items of its parent `mod.rs` (any ancestor), and a
parent's `mod` declarations and `pub use` re-exports of its children.

    scripts/import-cycles.py          # prints each circle; exits 1 if there is one
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_of(rel):
    parts = rel[:-3].split("/")
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


files = {}
for root, _, names in os.walk(SRC):
    for n in names:
        if n.endswith(".rs"):
            rel = os.path.relpath(os.path.join(root, n), SRC)
            if rel == "main.rs":
                continue
            files[module_of(rel)] = rel


def file_of(path, seen=0):
    """The file holding the item at module path `path` (the longest module prefix), through
    the `pub use` re-exports of that module (`crate::Cli` is cli.rs's)."""
    for k in range(len(path), -1, -1):
        mod = tuple(path[:k])
        if mod in files:
            name = path[k] if k < len(path) else None
            target = reexports.get(mod, {}).get(name)
            if target and seen < 8:
                return file_of(list(target) + list(path[k + 1 :]), seen + 1)
            return files[mod]
    return None


def expand(spec):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    spec = spec.strip()
    i = spec.find("{")
    if i < 0:
        return [spec]
    head, body = spec[:i], spec[i + 1 : spec.rfind("}")]
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    items.append(cur)
    return [p for it in items if it.strip() for p in expand(head + it.strip())]


PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")


def resolve(mod, path):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    else:
        base = list(mod)
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    return base + [s for s in segs if s not in ("self", "*")]


USE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);")


def strip(text):
    """`text` without comments, string and char literals (they may hold paths or `//`)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            j = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if j < 0 else j + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:]):
            i += len(re.match(r"'(\\.[^']*|[^\\'])'", text[i:]).group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def use_paths(mod, spec):
    for p in expand(spec):
        p = p.strip()
        alias = re.search(r"\s+as\s+(\w+)$", p)
        p = re.sub(r"\s+as\s+\w+$", "", p)
        first = p.split("::")[0]
        path = resolve(mod, p) if first in ("crate", "super", "self") else list(mod) + p.split("::")
        yield (alias.group(1) if alias else path[-1]), path


# What each module re-exports: name -> the item's full path.
reexports = {}
for mod, rel in files.items():
    for m in USE.finditer(strip(open(os.path.join(SRC, rel)).read())):
        if m.group(1):
            for name, path in use_paths(mod, m.group(2)):
                reexports.setdefault(mod, {})[name] = tuple(path)

edges = {}
for mod, rel in files.items():
    text = strip(open(os.path.join(SRC, rel)).read())
    targets = set()
    for m in USE.finditer(text):
        if m.group(1) and rel.endswith(("mod.rs", "lib.rs")):
            continue  # a parent re-exporting
        for p in expand(m.group(2)):
            p = re.sub(r"\s+as\s+\w+$", "", p.strip())
            if p.split("::")[0] in ("crate", "super", "self"):
                targets.add(tuple(resolve(mod, p)))
    code = USE.sub("", text)
    for m in PATH.finditer(code):
        targets.add(tuple(resolve(mod, m.group(1) + m.group(2))))
    out = set()
    for t in targets:
        f = file_of(list(t))
        if f is None or f == rel:
            continue
        fmod = module_of(f)
        if fmod == mod[: len(fmod)]:
            continue  # an ancestor's items
        out.add(f)
    edges[rel] = out

# Tarjan's strongly connected components.
index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]


def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            comps.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in index:
        strong(v)
for comp in comps:
    inner = {f: sorted(edges[f] & set(comp)) for f in comp}
    print("circle: " + "; ".join(f"{f} -> {', '.join(t)}" for f, t in inner.items()))
print(f"{len(comps)} circle(s) among {len(files)} files")
sys.exit(1 if comps else 0)
