#!/usr/bin/env python3
"""Prints the dependency graph between postbox's top-level modules (from `crate::<module>`
paths in src/) and any cycle in it. Exit 1 if there is a cycle. Used to check the
layering described in src/lib.rs's codemap."""
import glob, os, re, sys

root = os.path.join(os.path.dirname(__file__), "..", "src")
mods = {}
for path in glob.glob(os.path.join(root, "**", "*.rs"), recursive=True):
    rel = os.path.relpath(path, root)
    top = rel.split(os.sep)[0].removesuffix(".rs")
    if top in ("lib", "main"):
        continue
    text = open(path).read()
    # Test modules may reach anywhere.
    text = re.split(r"#\[cfg\(test\)\]", text)[0]
    text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
    deps = set(re.findall(r"\bcrate::(\w+)", text))
    mods.setdefault(top, set()).update(d for d in deps if d != top)
# crate-root re-exports resolve to their module.
reexports = {"Settings": "config", "Shutdown": "shutdown", "shutdown_signal": "shutdown",
             "Role": "runtime", "Runtime": "runtime", "Postbox": "postbox",
             "OpenError": "postbox", "RunError": "postbox", "SubmitError": "postbox",
             "EmailId": "domain", "EmailStatus": "domain", "NewEmail": "domain",
             "Priority": "domain", "EmailReport": "store", "TimelineEntry": "store",
             "SubmitOptions": "postbox", "SubmitOutcome": "postbox", "Submitted": "postbox",
             "NewAttachment": "domain"}
graph = {m: sorted({reexports.get(d, d) for d in ds} - {m}) for m, ds in mods.items()}
for m in sorted(graph):
    print(f"{m:10} -> {' '.join(graph[m])}")
cycles = []
def visit(n, stack, seen):
    for d in graph.get(n, []):
        if d in stack:
            cycles.append(stack[stack.index(d):] + [d])
        elif d not in seen:
            seen.add(d)
            visit(d, stack + [d], seen)
for m in graph:
    visit(m, [m], {m})
uniq = {tuple(sorted(set(c))): c for c in cycles}
for c in uniq.values():
    print("cycle:", " -> ".join(c))
sys.exit(1 if uniq else 0)
