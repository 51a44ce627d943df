"""The user docs stay in step with the code (no engines): README's options table names every option, its relative
links resolve, and benchmarks/results/INDEX.md lists every result set there is."""
import inspect
import os
import re

from benchmarks import results_index
from vllm_eagle.config import EagleOptions, speculative_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with `header_start`, separator row skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header_start)), None)
    assert start is not None, f"no table with header {header_start!r}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_readme_options_table_names_every_option():
    text = open(README, encoding="utf-8").read()
    rows = table_rows(text, "| name | default | what it does | when to use it |")
    assert rows and all(len(r) == 4 for r in rows), "each option row has name | default | what | when"
    named = {name for r in rows for name in re.findall(r"`([a-z_]+)`", r[0])}
    fields = set(EagleOptions.__dataclass_fields__)
    kwargs = set(inspect.signature(speculative_kwargs).parameters)
    missing = sorted((fields | kwargs) - named)
    assert not missing, f"README options table lacks {missing}"


def test_readme_results_table_is_generated_from_its_result_files():
    from benchmarks import readme_table
    text = open(README, encoding="utf-8").read()
    marker = re.search(r"<!-- results table: python -m benchmarks.readme_table (.+?) -->\n", text)
    assert marker, "README lacks the results-table marker"
    files = [os.path.join(ROOT, f) for f in marker.group(1).split()]
    want = readme_table.table(files)
    assert text[marker.end():marker.end() + len(want)] == want, "README's results table differs from its files: " \
        "regenerate it with the marker's command"


def test_readme_relative_links_resolve():
    text = open(README, encoding="utf-8").read()
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
               if not re.match(r"[a-z]+://|#|mailto:", t)}
    broken = sorted(t for t in targets if t and not os.path.exists(os.path.join(ROOT, t)))
    assert not broken, f"README links to missing files {broken}"


def test_results_index_lists_every_result_set():
    index = open(os.path.join(results_index.RESULTS, results_index.INDEX), encoding="utf-8").read()
    listed = set(results_index.listed_sets(index))
    sets = set(results_index.result_sets())
    assert not sets - listed, (f"INDEX.md lacks {sorted(sets - listed)}: run python -m benchmarks.results_index")
    assert not listed - sets, f"INDEX.md lists sets that are gone {sorted(listed - sets)}: regenerate it"


def test_result_stems():
    assert results_index.stem("2026-12-02-562a8f6-humaneval-t1.png") == "2026-12-02-562a8f6"
    assert results_index.stem("2026-12-02-562a8f6.json") == "2026-12-02-562a8f6"
    assert results_index.stem("2026-12-01-soak-long-server.log") == "2026-12-01-soak-long"
    plot = "2026-12-03-20e07f2-avx512-b1-trees-mtbench-t0.png"
    assert results_index.stem(plot) == "2026-12-03-20e07f2-avx512-b1-trees"
    cmd = "python -m benchmarks.run --ks 2 3 --trees [(0,), (1,)] [(0,), (1,), (0, 0)] --fixed --dynamic"
    assert results_index.options(cmd) == {"ks": "2 3", "trees": "[(0,), (1,)] [(0,), (1,), (0, 0)]", "fixed": "",
                                          "dynamic": ""}
