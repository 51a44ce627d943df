"""Rewrite benchmarks/results/INDEX.md: one table row per result set in benchmarks/results/.

    python -m benchmarks.results_index            # rewrite INDEX.md from the files
    python -m benchmarks.results_index --check    # exit 1 if INDEX.md is not what the files give

A result set is the files that share a stem: the name without its extension and without the suffix of a plot
(`-mtbench-t0.png`) or a server log (`-server.log`). E.g. 2026-12-02-364f3c7.json, .md and -mtbench-t0.png form the
set `2026-12-02-364f3c7`. A subfolder (profiles/) is one set, described by its README.md.

Each row reads what the files record, nothing else: a JSON's "environment" (date, commit, CPU and its flags) and
"command" (the "what it measured" summary is parsed from it: workloads, batch sizes, shapes, dtype, ...), otherwise
the .md's first "Command:" line and "Hardware:" line, then the file name's date and commit. Stdlib only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
INDEX = "INDEX.md"
_PLOT = re.compile(r"-[a-z0-9]+-t\d+\.png$")              # benchmarks.run plots: -<workload>-t<temperature>.png
_SUFFIXES = ("-server.log", ".json", ".md", ".png", ".log", ".csv", ".txt", ".gz")
_DATE = re.compile(r"^(\d{4}-\d\d-\d\d)")
_NAME_COMMIT = re.compile(r"^\d{4}-\d\d-\d\d-([0-9a-f]{7}(?:-dirty)?)(?:-|$)")
_MD_COMMIT = re.compile(r"\bcommit ([0-9a-f]{7}(?:-dirty)?)")
_COMMAND = re.compile(r"^Command: `([^`]+)`", re.M)
_ANY_COMMAND = re.compile(r"`(python -m [^`]+)`")
_OPTION = re.compile(r"\s--(?=[a-z])")                   # option boundaries in a recorded command line
_TOOLS = {"benchmarks.run": "side-by-side run", "benchmarks.interleaved": "batch 1, paired prompt by prompt",
          "benchmarks.soak": "soak of vllm serve", "benchmarks.kernels": "kernel micro-benchmarks",
          "benchmarks.heads": "heads' acceptance side by side",
          "benchmarks.profile_b1": "py-spy profiles of the b1 step"}


def stem(name: str) -> str:
    """File name -> its result set. E.g. '2026-12-02-364f3c7-mtbench-t1.png' -> '2026-12-02-364f3c7'."""
    if _PLOT.search(name):
        return _PLOT.sub("", name)
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return stem(name[: -len(suffix)]) if suffix == ".gz" else name[: -len(suffix)]
    return os.path.splitext(name)[0]


def result_sets(root: str = RESULTS) -> dict[str, list[str]]:
    """{stem: sorted file names relative to root}; a subfolder is one set named 'folder/'; INDEX.md is left out."""
    sets: dict[str, list[str]] = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name == INDEX or name.startswith("."):
            continue
        if os.path.isdir(path):
            sets[name + "/"] = sorted(os.path.join(name, f) for f in os.listdir(path) if not f.startswith("."))
        else:
            sets.setdefault(stem(name), []).append(name)
    return {k: sorted(v) for k, v in sorted(sets.items())}


def options(command: str) -> dict[str, str]:
    """'python -m benchmarks.run --ks 2 3 --fixed' -> {'ks': '2 3', 'fixed': ''} (values kept as recorded: tree
    path tuples contain spaces, so the line is split at ' --', not by shlex)."""
    out = {}
    for part in _OPTION.split(command)[1:]:
        key, _, value = part.partition(" ")
        out[key] = value.strip()
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _count_trees(value: str) -> int:
    return value.count("[(")


def summary(command: str, record: dict) -> str:
    """What a set measured, from its command line (and a soak's own verdict)."""
    m = re.search(r"python -m (benchmarks\.[a-z0-9_]+)", command or "")
    tool = m.group(1) if m else ""
    o = options(command or "")
    parts = [_TOOLS.get(tool, tool or "?")]
    if tool == "benchmarks.run":
        if "quick" in o:
            parts.append("quick smoke check (MT-Bench, T=0, b1 and b8, 64 tokens)")
        for key, label in (("workloads", ""), ("batch-sizes", "b "), ("temperatures", "T "), ("ks", "K "),
                           ("configs", "")):
            if o.get(key):
                parts.append(label + o[key])
        if "trees" in o:
            parts.append(_plural(_count_trees(o["trees"]), "static tree") if o["trees"] else "no static tree")
        if "dynamic" in o:
            parts.append(f"dynamic {o['dynamic']}" if o["dynamic"] else "no dynamic tree")
        if "lookups" in o:
            parts.append(f"lookup {o['lookups']}")
        if "confidences" in o:
            parts.append(f"min_confidence {o['confidences']}")
        if "fixed" in o:
            parts.append("gate on and off")
        if o.get("max-tokens"):
            parts.append(f"{o['max-tokens']} tokens")
        if o.get("rounds", "1") != "1":
            parts.append(f"{o['rounds']} rounds")
        if "serve-concurrency" in o:
            parts.append(f"serve at {o['serve-concurrency']}" if o["serve-concurrency"] else "no serve")
        parts.append(o.get("dtype", "bfloat16"))
    elif tool == "benchmarks.interleaved":
        parts.append(_plural(_count_trees(o.get("trees", "")), "tree"))
        if o.get("dynamic"):
            parts.append(f"dynamic {o['dynamic']}")
        parts.append(f"{o.get('prompts', '16')} prompts")
        parts.append(o.get("dtype", "bfloat16"))
        if "reverse-start" in o:
            parts.append("engines created in reverse order")
    elif tool == "benchmarks.soak":
        parts.append(f"{o.get('minutes', '10')} min, {o.get('concurrency', '64')} clients")
        if "ok" in record:
            parts.append(f"{'passed' if record['ok'] else 'FAILED'}: {record.get('requests')} requests, "
                         f"{len(record.get('failed') or [])} failed, {record.get('greedy_checked')} greedy checked, "
                         f"{len(record.get('greedy_mismatched') or [])} mismatched")
    return "; ".join(parts)


def _hardware(env: dict, name: str) -> str:
    """CPU and its flags as recorded (environments record cpu_flags since the EAGLE-3 change); older sets only say
    in their name whether the machine had AVX-512 that day."""
    flags = env.get("cpu_flags")
    if flags:
        return env.get("cpu", "") + f" ({', '.join(flags)})"
    tag = next((t for t in ("avx512", "avx2") if re.search(rf"-{t}(-|$)", name)), "")
    return env.get("cpu", "") + (f" ({tag}, from the set's name)" if tag and env.get("cpu") else "")


def describe(root: str, name: str, files: list[str]) -> dict:
    """-> {set, date, commit, what, command, files} for one result set."""
    record, md = {}, ""
    js = [f for f in files if f.endswith(".json")]
    mds = [f for f in files if f.endswith(".md")]
    if js:
        with open(os.path.join(root, js[0]), encoding="utf-8") as f:
            loaded = json.load(f)
        record = loaded if isinstance(loaded, dict) else {}
    if mds:
        with open(os.path.join(root, mds[0]), encoding="utf-8") as f:
            md = f.read()
    env = record.get("environment") or {}
    command = record.get("command") or ""
    if not command and md:
        m = _COMMAND.search(md) or _ANY_COMMAND.search(md)
        command = m.group(1) if m else ""
    base = os.path.basename(files[0]) if name.endswith("/") else name
    date = (env.get("date") or "")[:10]
    if not date:
        m = _DATE.match(base)
        date = m.group(1) if m else ""
    commit = env.get("commit") or ""
    if not commit and name.endswith("/"):                 # a folder: the commits its file names carry
        found = [c for f in files for c in re.findall(r"-([0-9a-f]{7})\.", os.path.basename(f))]
        commit = ", ".join(dict.fromkeys(found))
    if not commit:
        m = _NAME_COMMIT.match(base) or _MD_COMMIT.search(md)
        commit = m.group(1) if m else ""
    what = summary(command, record)
    hardware = _hardware(env, name)
    if not hardware:
        m = re.search(r"^Hardware: ([^;]+);", md, re.M) or re.search(r"^Command: `[^`]+` \((.*)\)\s*$", md, re.M)
        hardware = m.group(1).strip() if m else ""
    if hardware:
        what += f"; {hardware}"
    if name.endswith("/") and md:
        title = next((line.lstrip("# ").strip() for line in md.splitlines() if line.startswith("#")), "")
        what = title or what
    return {"set": name, "date": date, "commit": commit, "what": what, "command": command, "files": files}


def _cell(text: str) -> str:
    return (text or "–").replace("|", "\\|").replace("\n", " ")


def render(root: str = RESULTS) -> str:
    rows = [describe(root, name, files) for name, files in result_sets(root).items()]
    out = ["# Benchmark results index",
           "",
           "Every result set in this folder, oldest first: the files that share a stem (a run's .json rows, .md table "
           "and .png plots), what the run measured and the command that made it, as the files record them. "
           "Generated by `python -m benchmarks.results_index` (do not edit by hand); \"–\" = not recorded. "
           "docs/notes.md discusses the runs and docs/benchmarking.md how to read them.",
           "",
           "| set | date | commit | what it measured | command | files |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        first = r["set"] if r["set"].endswith("/") else next(
            (f for ext in (".md", ".json") for f in r["files"] if f == r["set"] + ext), r["files"][0])
        kinds = sorted({"png" if f.endswith(".png") else f.rsplit(".", 1)[-1] if "." in f else f for f in r["files"]})
        files = f"{len(r['files'])}: {', '.join(kinds)}"
        command = f"`{r['command']}`" if r["command"] else "–"
        out.append(f"| [`{r['set']}`]({first}) | {_cell(r['date'])} | {_cell(r['commit'])} | {_cell(r['what'])} | "
                   f"{_cell(command)} | {files} |")
    return "\n".join(out) + "\n"


def listed_sets(index_text: str) -> list[str]:
    """The set names an INDEX.md lists (first cell of each row)."""
    return re.findall(r"^\| \[`([^`]+)`\]", index_text, re.M)


def write_index(root: str = RESULTS) -> str:
    path = os.path.join(root, INDEX)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(root))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results_index", description=__doc__.split("\n")[0])
    p.add_argument("--root", default=RESULTS, help="results folder (default: benchmarks/results)")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if INDEX.md is out of date")
    a = p.parse_args(argv)
    if a.check:
        path = os.path.join(a.root, INDEX)
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
        if current != render(a.root):
            print(f"{path} is out of date: run python -m benchmarks.results_index", file=sys.stderr)
            sys.exit(1)
        return
    print(write_index(a.root))


if __name__ == "__main__":
    main()
