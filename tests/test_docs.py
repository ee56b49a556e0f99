"""The README and docs/ hold: the README stays a short front door, every relative link and #anchor in them
leads somewhere, every script, module and --help command their code names exists and runs, the set-up block
is CI's, and no file of the repository points outside it."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
HELP = ["main_sp.py", "main_prune.py", "main_rl_prune.py", "main_search.py", "-m evaluation.crossfit"]
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def prose(text):
    """The text outside code: fenced blocks and inline code removed (a link inside code is not a link)."""
    return INLINE.sub("", FENCE.sub("", text))


def code_blocks(text):
    return FENCE.findall(text)


def slug(heading):
    """GitHub's anchor of a heading: link text kept, lower case, punctuation other than - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for line in FENCE.sub("", read(path)).splitlines():
        m = re.match(r"^#{1,6} +(.*?) *#* *$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_readme_is_a_front_door():
    n = read("README.md").count("\n")
    assert n < 250, f"README.md has {n} lines; move detail into docs/"


def test_readme_keeps_its_sections():
    text = read("README.md")
    for heading in ("## The table", "## What the switches add", "## Set-up and tests",
                    "## The three stages on CIFAR-100 (GPU)", "## Where to read more"):
        assert re.search(rf"^{re.escape(heading)}$", text, re.M), heading


def test_setup_block_is_what_ci_runs_in_a_new_venv():
    setup = re.search(r"^## Set-up and tests\n.*?```\n(.*?)```", read("README.md"), re.S | re.M).group(1)
    lines = [line for line in read(".ci/run").splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    # CI is a fresh machine: a new venv, activated, and nothing installed into it but the README's command
    assert lines[:3] == ['venv="$(mktemp -d)/venv"', 'python3 -m venv "$venv"', 'source "$venv/bin/activate"']
    assert setup.strip().splitlines() == lines[3:] == ["pip install -r requirements.txt", "python -m pytest -q"]


def test_requirements_cover_every_import_of_the_product_and_the_suite():
    """Every third-party module imported by the packages, the scripts, the evaluation and the tests is named
    in requirements.txt; only the peer benchmark's Torch-Pruning is left to bench/requirements.txt."""
    import ast
    import sys
    provides = {"scikit-learn": "sklearn", "pillow": "PIL", "onnxruntime": "onnxruntime"}
    named = set()
    for line in read("requirements.txt").splitlines():
        name = re.split(r"[<>=\[ ;]", line.strip(), maxsplit=1)[0].lower()
        if name:
            named.add(provides.get(name, name.replace("-", "_")))
    named |= {"PIL"}  # torchvision's own dependency
    ours = {d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d))} | {
        f[:-3] for d in (ROOT, os.path.join(ROOT, "tests")) for f in os.listdir(d) if f.endswith(".py")}
    missing = {}
    for folder, _, files in os.walk(ROOT):
        if "/." in folder or "/bench/out" in folder or "/evaluation/out" in folder:
            continue
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            for node in ast.walk(ast.parse(open(path).read())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in ours or top in named:
                        continue
                    missing.setdefault(top, set()).add(os.path.relpath(path, ROOT))
    assert set(missing) <= {"torch_pruning"}, missing
    assert all(p.startswith("bench/") for p in missing.get("torch_pruning", ())), missing


@pytest.mark.parametrize("path", DOCS)
def test_relative_links_and_anchors_exist(path):
    broken = []
    for target in LINK.findall(prose(read(path))):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(os.path.join(ROOT, linked)):
            broken.append(f"{target}: no file {linked}")
        elif anchor and (not linked.endswith(".md") or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked}")
    assert not broken, f"{path}: " + "; ".join(broken)


def repository_files():
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # a copy without .git: every file but hidden and work ones
        out = []
        for dirpath, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("out", "__pycache__", "shared")]
            out += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in files]
    return [p for p in out if os.path.isfile(os.path.join(ROOT, p))]


def test_no_file_points_outside_the_repository():
    outside = "SPEC" + ".md"  # spelt in two halves, so that this file does not name it
    hits = []
    for path in repository_files():
        with open(os.path.join(ROOT, path), "rb") as f:
            data = f.read()
        if b"\0" not in data[:8192] and outside.encode() in data:
            hits.append(path)
    assert not hits, f"{outside} named in {hits}"


def named_in_code(pattern):
    """(file, name) for every match of `pattern` in the code (fenced or inline) of the README and docs/."""
    out = []
    for path in DOCS:
        text = read(path)
        for code in code_blocks(text) + INLINE.findall(FENCE.sub("", text)):
            out += [(path, m) for m in re.findall(pattern, code)]
    return out


def module_exists(name):
    base = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def test_scripts_and_modules_named_in_code_exist():
    scripts = named_in_code(r"(?<![\w./<>-])((?:[\w-]+/)*[\w-]+\.(?:py|sh))\b")
    modules = named_in_code(r"python -m ([\w.]+)") + named_in_code(r"^\s*from ([\w.]+) import")
    missing = [f"{p}: {s}" for p, s in scripts if not os.path.isfile(os.path.join(ROOT, s))]
    missing += [f"{p}: module {m}" for p, m in modules if m != "pytest" and not module_exists(m)]
    assert scripts and modules and not missing, missing


def test_help_of_every_script_runs():
    """`python <script> --help` (or `python -m <module> --help`) of the stages, the search, the cross-fitting
    and every other one the docs show, all at once: each exits 0 and prints its usage."""
    shown = {s for _, s in named_in_code(r"(?m)^python ((?:-m [\w.]+)|(?:[\w/.-]+\.py)) --help$")}
    scripts = sorted(set(HELP) | shown)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {s: subprocess.Popen([sys.executable, *s.split(), "--help"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in scripts}
    failed = []
    for s, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0 or "usage" not in out:
            failed.append(f"{s}: exit {proc.returncode}: {err[-500:]}")
    assert not failed, failed
