#!/usr/bin/env python3
"""Fails when sibling modules of a workspace crate import each other in a circle.

For every crate root of every workspace member (src/lib.rs, src/main.rs, src/bin/*.rs) it
walks the `mod` tree and reads every path that names a module of the same crate: `use`
trees (`use crate::a::{b, c::d}`, `use super::x`, `use self::y`, `pub use child::z`) and
paths written inline in code (`crate::secrets::new_token()`). Comments and string
literals are skipped. A path that ends at a name a module re-exports (`pub use
registry::ItemRegistry` in `dataport.rs`) is followed to the module that defines it.

An edge from module S to module T counts between the two children of their nearest common
ancestor that contain them, so `items::enable -> crate::secrets` is `items -> secrets` at the
crate root and `dataport::session -> dataport::close` is `session -> close` under `dataport`.
Edges to one's own ancestors (`use super::*`, a parent's re-export of oneself) are not
sibling edges. Inline modules (`mod tests { ... }`) count as part of their file's module.
Like `cargo modules dependencies --acyclic` (without `--cfg-test`), code under
`#[cfg(test)]` (inline `mod tests { ... }` or a `#[cfg(test)] mod tests;` file) is left out:
a unit test may use a sibling that uses its module. `--cfg-test` counts it too.

Exit status 0 when no sibling modules form a cycle, 1 otherwise (each cycle printed with one
file:line per edge), 2 on a usage or parse error. `--edges` prints every sibling edge.

Usage: scripts/check-import-cycles.py [--edges] [--cfg-test] [WORKSPACE_DIR]
       scripts/check-import-cycles.py --self-test   (the checker's own cases)
"""

import os
import re
import sys
import tomllib
from collections import defaultdict

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
RAW_STRING = re.compile(r'r(#*)"')
CHAR_LITERAL = re.compile(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'")
CFG_TEST_BEFORE = re.compile(r"#\[cfg\(test\)\]\s*(#\[[^\]]*\]\s*)*(pub(\([^)]*\))?\s+)?$")
PATH_ATTRIBUTE = re.compile(r'#\[path\s*=\s*"([^"]+)"\]\s*$')


def strip_comments_and_strings(text):
    """Blanks comments, string and char literals, keeping line breaks (so lines still count)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and RAW_STRING.match(text, i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = RAW_STRING.match(text, i).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:end]))
            i = end
        elif c == '"' or (c == "b" and text.startswith('b"', i)):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", text[i : j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}'), not a lifetime ('a).
            m = CHAR_LITERAL.match(text, i)
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Module:
    def __init__(self, path, file, test_only=False):
        self.path = path  # tuple of names from the crate root
        self.file = file
        self.test_only = test_only  # under #[cfg(test)]
        self.children = {}  # name -> Module
        self.uses = {}  # name -> (absolute path tuple, line): what `use` brings into scope
        self.refs = []  # (kind, segments, line, inline module path inside the file)


def expand_use_tree(tree):
    """`a::{b, c::{d, e as f}, self}` -> [([a, b], b), ([a, c, d], d), ([a, c, e], f), ([a], a)]."""
    tree = re.sub(r"\s+", "", tree)

    def parse(s, prefix):
        results = []
        depth, start, parts = 0, 0, []
        for k, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(s[start:k])
                start = k + 1
        parts.append(s[start:])
        for part in parts:
            if not part:
                continue
            brace = part.find("{")
            if brace >= 0 and part.endswith("}"):
                head = part[:brace].rstrip(":")
                inner = part[brace + 1 : -1]
                new_prefix = prefix + ([seg for seg in head.split("::") if seg] if head else [])
                results.extend(parse(inner, new_prefix))
                continue
            alias = None
            if "as" in part and re.search(r"[A-Za-z0-9_]as[A-Za-z_]", part):
                # whitespace was removed: split on the last `as` between two identifiers
                m = re.match(r"^(.*[A-Za-z0-9_*])as(" + IDENT + r")$", part)
                if m:
                    part, alias = m.group(1), m.group(2)
            segs = [seg for seg in part.split("::") if seg]
            if segs == ["self"]:
                full = prefix
                name = alias or (prefix[-1] if prefix else None)
            else:
                full = prefix + segs
                name = alias or segs[-1]
            results.append((full, name))
        return results

    return parse(tree, [])


def cfg_test_before(text, pos):
    """Whether the item starting at `pos` carries `#[cfg(test)]`."""
    return CFG_TEST_BEFORE.search(text[max(0, pos - 300) : pos]) is not None


def read_module(module, modules_by_file, errors):
    try:
        raw = open(module.file, encoding="utf-8").read()
    except OSError as e:
        errors.append(f"{module.file}: {e}")
        return
    text = strip_comments_and_strings(raw)
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    # A crate root or a mod.rs owns its directory; foo.rs owns foo/.
    if module.path == () or os.path.basename(module.file) == "mod.rs":
        child_dir = os.path.dirname(module.file)
    else:
        child_dir = os.path.join(os.path.dirname(module.file), os.path.splitext(os.path.basename(module.file))[0])

    # Inline modules: find `mod name {` and the extent of their braces.
    inline = []  # (start, end, name)
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", text):
        depth, j = 1, m.end()
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        inline.append((m.start(), j, m.group(1), cfg_test_before(text, m.start())))

    def inline_path(pos):
        return tuple(name for (s, e, name, _) in sorted(inline) if s < pos < e)

    def in_test(pos):
        return module.test_only or any(s < pos < e and test for (s, e, _, test) in inline)

    # File modules: `mod name;` (with an optional #[path = "..."] just before).
    # (`text` keeps every offset of `raw`: comments and strings are blanked, not removed.)
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*;", text):
        name = m.group(1)
        if inline_path(m.start()):
            continue  # a `mod x;` inside an inline module: not used in this workspace
        attribute = PATH_ATTRIBUTE.search(raw[max(0, m.start() - 200) : m.start()].split(";")[-1].rstrip().removesuffix("pub").rstrip())
        if attribute:
            candidates = [os.path.join(os.path.dirname(module.file), attribute.group(1))]
        else:
            candidates = [os.path.join(child_dir, name + ".rs"), os.path.join(child_dir, name, "mod.rs")]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if not found:
            errors.append(f"{module.file}:{line_of(m.start())}: mod {name}: none of {candidates}")
            continue
        child = Module(module.path + (name,), found, module.test_only or cfg_test_before(text, m.start()))
        module.children[name] = child
        modules_by_file[found] = child
        read_module(child, modules_by_file, errors)

    # `use` declarations (any visibility), with their trees expanded.
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        before = text[max(0, m.start() - 1) : m.start()]
        if before and (before.isalnum() or before == "_"):
            continue
        tree = m.group(1)
        where = inline_path(m.start())
        for segs, name in expand_use_tree(tree):
            module.refs.append(("use", segs, line_of(m.start()), where, in_test(m.start())))
            if name and name != "*" and not where:
                module.uses[name] = (segs, line_of(m.start()))

    # Paths written inline in code: crate::a::b, super::a, self::a (not inside `use`).
    use_spans = [(m.start(), m.end()) for m in re.finditer(r"\buse\s+[^;]+;", text)]
    for m in re.finditer(r"(?<![A-Za-z0-9_:])((?:crate|super|self)(?:\s*::\s*(?:" + IDENT + r"))+)", text):
        if any(s <= m.start() < e for s, e in use_spans):
            continue
        segs = [seg for seg in re.split(r"\s*::\s*", m.group(1)) if seg]
        module.refs.append(("path", segs, line_of(m.start()), inline_path(m.start()), in_test(m.start())))


def resolve(root, module, segs, where, depth=0):
    """The module (of this crate) a path names, following re-exports; None if outside."""
    if depth > 8 or not segs:
        return None
    scope = module.path + tuple(where)  # the (possibly inline) module the path is written in
    first, rest = segs[0], list(segs[1:])
    if first == "crate":
        base = ()
    elif first == "self":
        base = scope
    elif first == "super":
        base, rest = scope, list(segs)
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    else:
        # A bare path: a child module of the file module, or an extern crate / prelude name.
        base, rest = module.path, list(segs)
    # Walk down while the segments name modules.
    node = find(root, base)
    if node is None:
        # `super` out of an inline module into its file module, etc.
        node = find(root, base[: len(module.path)]) if len(base) > len(module.path) else None
        if node is None:
            return None
    for k, seg in enumerate(rest):
        if seg in node.children:
            node = node.children[seg]
            continue
        if seg in ("self", "*"):
            return node
        # A name: follow the module's own `use` of it (a re-export, or a private import that
        # children reach through `super::`).
        if seg in node.uses and depth < 8:
            target_segs, _ = node.uses[seg]
            target = resolve(root, node, target_segs, (), depth + 1)
            return target if target is not None else node
        return node
    return node


def find(root, path):
    node = root
    for name in path:
        node = node.children.get(name)
        if node is None:
            return None
    return node


def check_crate(label, root_file, report_edges, cfg_test):
    errors = []
    root = Module((), root_file)
    modules_by_file = {root_file: root}
    read_module(root, modules_by_file, errors)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return None
    # Sibling edges: parent path -> {(a, b): [(file, line)]}
    edges = defaultdict(lambda: defaultdict(list))
    for module in modules_by_file.values():
        for kind, segs, line, where, test in module.refs:
            if test and not cfg_test:
                continue
            target = resolve(root, module, segs, where)
            if target is None:
                continue
            s, t = module.path, target.path
            k = 0
            while k < len(s) and k < len(t) and s[k] == t[k]:
                k += 1
            if k == len(s) or k == len(t):
                continue  # the same module, an ancestor or a descendant
            edges[s[:k]][(s[k], t[k])].append((module.file, line))
    cycles = []
    for parent, pairs in sorted(edges.items()):
        graph = defaultdict(set)
        for a, b in pairs:
            graph[a].add(b)
        for scc in tarjan(graph):
            if len(scc) > 1:
                cycles.append((parent, scc, pairs))
        if report_edges:
            where = "::".join(parent) or "(crate root)"
            for (a, b), sites in sorted(pairs.items()):
                f, l = sites[0]
                print(f"  {label} {where}: {a} -> {b}  ({f}:{l}{', +' + str(len(sites) - 1) if len(sites) > 1 else ''})")
    return cycles, len(modules_by_file), sum(len(p) for p in edges.values())


def tarjan(graph):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    nodes = set(graph) | {b for bs in graph.values() for b in bs}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            out.append(sorted(scc))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def self_test():
    """Runs the checker on small made-up crates; returns 0 when it judges each one right."""
    import tempfile

    cases = {
        # name: (files, expected exit status)
        "a use cycle between siblings": (
            {"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::b::B;\npub struct A;\n",
             "b.rs": "use crate::a::A;\npub struct B;\n"}, 1),
        "an inline-path cycle, nested, through super": (
            {"lib.rs": "mod p;\n", "p.rs": "mod x;\nmod y;\n",
             "p/x.rs": "pub fn f() { super::y::g() }\n", "p/y.rs": "pub fn g() { crate::p::x::f() }\n"}, 1),
        "a cycle through a parent's re-export": (
            {"lib.rs": "mod a;\nmod b;\npub use a::A;\n", "a.rs": "use crate::b::B;\npub struct A;\n",
             "b.rs": "use crate::A;\npub struct B;\n"}, 1),
        "a grouped use tree": (
            {"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::{b::{B, C}, b as other};\npub struct A;\n",
             "b.rs": "use crate::{a::A};\npub struct B;\npub struct C;\n"}, 1),
        "a chain, parents and comments are no cycle": (
            {"lib.rs": "mod a;\nmod b;\nmod c;\n",
             "a.rs": "use crate::b::B; // crate::c::C\nuse super::*;\n/* crate::c */ pub struct A;\n",
             "b.rs": "use crate::c::C;\nconst S: &str = \"crate::a::A\";\npub struct B;\n",
             "c.rs": "pub struct C;\n"}, 0),
        "a test-only back edge is left out": (
            {"lib.rs": "mod a;\nmod b;\n", "a.rs": "use crate::b::B;\npub struct A;\n",
             "b.rs": "pub struct B;\n#[cfg(test)]\nmod tests {\n    use crate::a::A;\n}\n"}, 0),
    }
    failures = 0
    for name, (files, expected) in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "Cargo.toml"), "w") as f:
                f.write('[workspace]\nmembers = ["k"]\n')
            for rel, text in files.items():
                path = os.path.join(tmp, "k", "src", rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                got = main([tmp])
            ok = got == expected
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: exit {got}, expected {expected}")
    return 1 if failures else 0


def main(argv):
    if "--self-test" in argv:
        return self_test()
    report_edges = "--edges" in argv
    cfg_test = "--cfg-test" in argv
    args = [a for a in argv if not a.startswith("--")]
    workspace = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(__file__), ".."))
    try:
        manifest = tomllib.load(open(os.path.join(workspace, "Cargo.toml"), "rb"))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    members = manifest.get("workspace", {}).get("members", [])
    failed, checked = False, []
    for member in members:
        src = os.path.join(workspace, member, "src")
        roots = [os.path.join(src, f) for f in ("lib.rs", "main.rs") if os.path.isfile(os.path.join(src, f))]
        bin_dir = os.path.join(src, "bin")
        if os.path.isdir(bin_dir):
            roots += sorted(
                os.path.join(bin_dir, f) if f.endswith(".rs") else os.path.join(bin_dir, f, "main.rs")
                for f in os.listdir(bin_dir)
            )
        for root_file in roots:
            label = f"{member}/{os.path.relpath(root_file, src)}"
            result = check_crate(label, root_file, report_edges, cfg_test)
            if result is None:
                return 2
            cycles, modules, edge_count = result
            checked.append(f"{label} ({modules} modules, {edge_count} sibling edges)")
            for parent, scc, pairs in cycles:
                failed = True
                where = "::".join(parent) or "crate root"
                print(f"CYCLE in {label} under {where}: {' <-> '.join(scc)}")
                for (a, b), sites in sorted(pairs.items()):
                    if a in scc and b in scc:
                        for f, l in sorted(set(sites))[:3]:
                            print(f"    {a} -> {b}: {os.path.relpath(f, workspace)}:{l}")
    print("checked: " + "; ".join(checked))
    if failed:
        print("import cycles between sibling modules: see above", file=sys.stderr)
        return 1
    print("no import cycles between sibling modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
