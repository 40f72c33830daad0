#!/usr/bin/env python3
"""Finds import cycles between the modules of a crate (or of one module subtree).

Usage: scripts/check-import-cycles.py SRC_DIR [--under MODULE] [--graph]

An edge A -> B means A's non-test code names B (`use crate::b::..`, `use super::b`, or an inline
`crate::b::x` path). Edges between a module and its own ancestors or descendants are left out:
a parent re-exporting its children (`pub use fake::FakeKernel`) and children using the parent's
items form one unit. Test modules (`#[cfg(test)] mod ...` to the end of the file) are skipped.
Prints the graph with --graph; exits 1 if any cycle (a strongly connected component of two or
more modules) exists.
"""
import os
import re
import sys


def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            mods[tuple(rel)] = path
    return mods


def strip_tests(text):
    m = re.search(r"^#\[cfg\(test\)\]\s*\n\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text, re.M)
    return text[: m.start()] if m else text


def refs(mod, text, known):
    out = set()
    # Expand `use x::{a, b::c}` groups into paths.
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths.extend(expand(m.group(1).replace("\n", " ")))
    paths.extend(re.findall(r"\b((?:crate|super)(?:::\w+)+)", text))
    for p in paths:
        parts = [x.strip() for x in p.split("::") if x.strip()]
        if not parts:
            continue
        if parts[0] == "crate":
            base, rest = (), parts[1:]
        elif parts[0] == "super":
            base, rest = mod, parts
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
        elif parts[0] == "self":
            base, rest = mod, parts[1:]
        else:
            continue
        target = base
        for r in rest:
            if base + (r,) in known or target + (r,) in known:
                target = target + (r,)
            else:
                break
        out.add(target)
    return out


def expand(s):
    s = s.strip()
    s = re.sub(r"\s+as\s+\w+", "", s)
    m = re.match(r"^(.*?)::\{(.*)\}$", s, re.S)
    if not m:
        return [s]
    prefix, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out = []
    for it in items:
        it = it.strip()
        if not it:
            continue
        if it == "self":
            out.append(prefix)
        else:
            out.extend(expand(prefix + "::" + it))
    return out


def related(a, b):
    return a[: len(b)] == b or b[: len(a)] == a


def sccs(nodes, edges):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        return 2
    src = args[0]
    under = ()
    if "--under" in args:
        under = tuple(args[args.index("--under") + 1].split("::"))
    mods = modules(src)
    known = set(mods)
    edges = {}
    for mod, path in mods.items():
        if mod[: len(under)] != under:
            continue
        with open(path, encoding="utf-8") as f:
            text = strip_tests(f.read())
        for t in refs(mod, text, known):
            if t != mod and t in known and t[: len(under)] == under and not related(mod, t):
                edges.setdefault(mod, set()).add(t)
    name = lambda m: "::".join(m) or "crate"
    nodes = sorted(m for m in mods if m[: len(under)] == under)
    if "--graph" in args:
        for m in nodes:
            print(f"{name(m)} -> {', '.join(sorted(name(t) for t in edges.get(m, ()))) or '-'}")
    cycles = [c for c in sccs(nodes, edges) if len(c) > 1]
    for c in cycles:
        print("cycle: " + ", ".join(sorted(name(m) for m in c)))
    print(f"{src} {name(under) if under else ''}: {len(nodes)} modules, "
          f"{sum(len(v) for v in edges.values())} import edges, {len(cycles)} cycles")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
