"""Mutation testing of the modules that carry captiond's promises (on demand, not CI).

Each group mutates a few modules with mutmut 3 and runs only the unit tests of those
modules against each mutant, so a group takes minutes, not hours:

    python tools/mutation.py                 # every group
    python tools/mutation.py queue notify    # some groups
    python tools/mutation.py --list          # the groups, their modules and tests
    python tools/mutation.py --survivors queue   # re-test only the last survivors
    make mutation [GROUPS="queue notify"]    # the same through make

Each group runs in its own folder, ``.mutation/<group>/`` (a copy of ``daemon/`` and
``tests/`` plus a generated ``pyproject.toml`` with the group's ``[tool.mutmut]``), so
groups do not share mutmut's caches. The result per module is printed and written to
``.mutation/summary.json``; every surviving mutant's diff goes to
``.mutation/<group>/survivors.md``. ``mutmut show NAME`` / ``mutmut browse`` work in
``.mutation/<group>/`` afterwards.

Score = detected / (mutants - equivalent), where detected counts mutants killed by a
failing test or by a timeout (a mutant that loops for ever is caught too). Mutants
with no test that reaches them count as undetected. Equivalent mutants (no behaviour
changed, so no honest test can kill them) are listed with a reason in
``tools/mutation_equivalents.txt``; a listed mutant that a test kills anyway counts as
killed and is reported as stale.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".mutation"
EQUIVALENTS = Path(__file__).resolve().parent / "mutation_equivalents.txt"


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]  # files mutated (all of their functions unless ``only``)
    tests: tuple[str, ...]  # the unit tests run against each mutant
    only: tuple[str, ...] = ()  # mutant-name patterns, when only part of a file counts
    about: str = ""


GROUPS = {
    g.name: g
    for g in (
        Group(
            "sidecars",
            ("daemon/pipeline/sidecars.py", "daemon/pipeline/targets.py"),
            ("tests/test_sidecar.py",),
            about="sidecar decisions (never clobber) and names/ownership",
        ),
        Group(
            "confined",
            ("daemon/confined.py",),
            ("tests/test_confinement.py", "tests/test_sidecar.py"),
            about="confined reads, the atomic write (stage, commit, sync)",
        ),
        Group(
            "queue",
            ("daemon/queue/jobs.py",),
            ("tests/test_queue.py",),
            about="the queue: claim, ack, retry, dead, leases",
        ),
        Group(
            "notify",
            ("daemon/notify.py", "daemon/worker.py"),
            ("tests/test_notify.py", "tests/test_worker.py"),
            only=("daemon.notify.*", "daemon.worker.xǁWorkerǁprogressing__mutmut_*"),
            about="sd_notify, the progress-gated watchdog, Worker.progressing",
        ),
        Group(
            "security",
            ("daemon/api/security.py", "daemon/api/browsers.py"),
            ("tests/test_api_auth.py", "tests/test_api_units.py", "tests/test_web.py"),
            about="API path confinement, who may change things, browser requests",
        ),
        Group(
            "postprocess",
            ("daemon/text/postprocess.py",),
            ("tests/test_postprocess.py",),
            about="the post-processing chain",
        ),
    )
}

DETECTED = {"killed", "timeout", "segfault", "caught by type check"}


@dataclass
class Score:
    module: str
    counts: dict[str, int] = field(default_factory=dict)
    equivalent: list[str] = field(default_factory=list)
    stale_equivalent: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def detected(self) -> int:
        return sum(n for status, n in self.counts.items() if status in DETECTED)

    @property
    def score(self) -> float:
        considered = self.total - len(self.equivalent) - self.counts.get("skipped", 0)
        return 100.0 * self.detected / considered if considered else 100.0


def load_equivalents() -> dict[str, str]:
    """``mutant name -> reason`` from tools/mutation_equivalents.txt."""
    out: dict[str, str] = {}
    if not EQUIVALENTS.exists():
        return out
    for line in EQUIVALENTS.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        out[name] = reason.strip()
    return out


def pyproject_for(group: Group) -> str:
    """A pyproject.toml with the group's [tool.mutmut] and the repository's pytest settings."""
    repo = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    ini = repo["tool"]["pytest"]["ini_options"]

    def lst(items: list[str] | tuple[str, ...]) -> str:
        return "[" + ", ".join(json.dumps(x) for x in items) + "]"

    lines = [
        "[tool.mutmut]",
        'source_paths = ["daemon"]',
        f"only_mutate = {lst(group.modules)}",
        f"pytest_add_cli_args_test_selection = {lst(group.tests)}",
        # Daemon-subprocess tests (marked slow) are end-to-end, not unit tests; no xdist.
        'pytest_add_cli_args = ["-p", "no:xdist", "-p", "no:cacheprovider", "-m", "not slow"]',
        "",
        "[tool.pytest.ini_options]",
        f"timeout = {int(ini.get('timeout', 300))}",
        f"markers = {lst(ini.get('markers', []))}",
        "",
    ]
    return "\n".join(lines)


def prepare(group: Group) -> Path:
    """A fresh folder for the group: daemon/, tests/ and the generated pyproject.toml."""
    where = WORK / group.name
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "daemon", where / "daemon", ignore=ignore)
    shutil.copytree(REPO / "tests", where / "tests", ignore=ignore)
    (where / "pyproject.toml").write_text(pyproject_for(group), encoding="utf-8")
    return where


def refresh_tests(group: Group) -> Path:
    """The group's folder as it is, with today's tests/ copied in (mutmut copies them
    on into mutants/ and collects coverage for new tests)."""
    where = WORK / group.name
    if not (where / "mutants").exists():
        raise SystemExit(f"{group.name}: no earlier run in {where}; run the group in full first")
    shutil.rmtree(where / "tests")
    shutil.copytree(REPO / "tests", where / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    return where


def run_group(group: Group, jobs: int, survivors: list[str] | None = None) -> float:
    """Mutate and test the group afresh; with ``survivors``, re-test only those mutants
    of the last run (every other result stands) against today's tests."""
    where = prepare(group) if survivors is None else refresh_tests(group)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CI")}
    env |= {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    names = group.only if survivors is None else survivors
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *names]
    with open(where / "mutmut.log", "wb") as log:
        code = subprocess.run(
            cmd, cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        tail = (where / "mutmut.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"mutmut failed for {group.name} (exit {code}):\n{tail}")
    return time.monotonic() - started


def status_of(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


# A mutant that only changes the case of SQL text outside its quoted literals
# (``SELECT`` -> ``select``, ``jobs`` -> ``JOBS``) changes nothing: SQLite's keywords and
# names are case-insensitive. Recognised by rule instead of being listed one by one.
SQL_CASE_RULE = "SQL case only: SQLite keywords and names are case-insensitive"
SQL_MODULES = {"daemon/queue/jobs.py"}  # where the rule applies: messages elsewhere say "set"
# A line counts as SQL by a statement keyword or a parameter placeholder (``?``, ``?2``);
# not by words like AND or IS, which error messages have too. A line that rewrites SQL
# text (``sql.replace(old, new)``) is left to a person: there the case of ``old`` matters.
_SQL_WORD = re.compile(
    r"\b(select|update|delete|insert|where|from|order by|group by|returning|limit|set)\b"
    r"|[=<>] \?|\blike \?",
    re.I,
)
_QUOTED = re.compile(r"'[^']*'")


def sql_case_only(diff: str) -> bool:
    removed = [x[1:] for x in diff.splitlines() if x.startswith("-") and not x.startswith("---")]
    added = [x[1:] for x in diff.splitlines() if x.startswith("+") and not x.startswith("+++")]
    if not removed or len(removed) != len(added):
        return False
    return all(
        a != b
        and a.lower() == b.lower()
        and _SQL_WORD.search(a)
        and ".replace(" not in a
        and _QUOTED.findall(a) == _QUOTED.findall(b)
        for a, b in zip(removed, added, strict=True)
    )


def diffs_of(group: Group, module: str, names: list[str]) -> dict[str, str]:
    """The diff of each named mutant (mutmut reads mutants/<path> from the cwd)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    here = Path.cwd()
    os.chdir(WORK / group.name)
    try:
        return {n: get_diff_for_mutant(n, path=module).strip() for n in names}
    finally:
        os.chdir(here)


def collect(group: Group, equivalents: dict[str, str]) -> tuple[list[Score], dict[str, str]]:
    """Scores per module, and the diff of every mutant not detected."""
    where = WORK / group.name
    scores, diffs = [], {}
    for module in group.modules:
        meta = json.loads((where / "mutants" / (module + ".meta")).read_text(encoding="utf-8"))
        codes = {
            n: c
            for n, c in sorted(meta["exit_code_by_key"].items())
            if not group.only or any(fnmatch.fnmatch(n, p) for p in group.only)
        }
        undetected = [n for n, c in codes.items() if status_of(c) not in DETECTED]
        diffs |= diffs_of(group, module, undetected)
        s = Score(module)
        for name, code in codes.items():
            status = status_of(code)
            if name in equivalents:
                if status in DETECTED:
                    s.stale_equivalent.append(name)
                else:
                    s.equivalent.append(name)
            elif status not in DETECTED:
                if module in SQL_MODULES and sql_case_only(diffs[name]):
                    equivalents[name] = SQL_CASE_RULE
                    s.equivalent.append(name)
                else:
                    s.survivors.append(name)
            s.counts[status] = s.counts.get(status, 0) + 1
        scores.append(s)
    return scores, diffs


def write_survivors(
    group: Group, scores: list[Score], equivalents: dict[str, str], diffs: dict[str, str]
) -> Path:
    """Each surviving (and each equivalent) mutant's diff, for reading."""
    out = [f"# Surviving mutants: {group.name}\n"]
    for s in scores:
        out.append(
            f"\n## {s.module}: {len(s.survivors)} survived, {len(s.equivalent)} equivalent\n"
        )
        for name in s.survivors + s.equivalent:
            label = f"equivalent: {equivalents[name]}" if name in equivalents else "survived"
            out.append(f"\n### {name} ({label})\n\n```diff\n{diffs[name]}\n```\n")
    path = WORK / group.name / "survivors.md"
    path.write_text("".join(out), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", help=f"groups to run (default: all of {list(GROUPS)})")
    ap.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="mutants tested at once (default: half the cores)",
    )
    ap.add_argument("--list", action="store_true", help="show the groups and exit")
    ap.add_argument("--report-only", action="store_true", help="re-read the last results")
    ap.add_argument("--no-diffs", action="store_true", help="skip writing survivors.md")
    ap.add_argument(
        "--survivors",
        action="store_true",
        help="re-test only the last run's survivors against today's tests (quick check "
        "after adding tests; the daemon/ copy is not refreshed: run in full after code "
        "changes)",
    )
    args = ap.parse_args(argv)

    if args.list:
        for g in GROUPS.values():
            print(f"{g.name:12} {g.about}\n{'':12} mutates {', '.join(g.modules)}")
            if g.only:
                print(f"{'':12} only {', '.join(g.only)}")
            print(f"{'':12} tests   {', '.join(g.tests)}")
        return 0
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown groups {unknown}; known: {list(GROUPS)}")
    groups = [GROUPS[g] for g in (args.groups or GROUPS)]
    equivalents = load_equivalents()

    summary_path = WORK / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    failed = False
    for g in groups:
        if args.report_only:
            elapsed = summary.get(g.name, {}).get("seconds", 0.0)
        elif args.survivors:
            last = summary.get(g.name, {}).get("modules", {}).values()
            names = [n for m in last for n in m["survivors"]]
            print(f"[{g.name}] re-testing {len(names)} survivors ...", flush=True)
            rerun = run_group(g, args.jobs, names) if names else 0.0
            print(f"  (survivors re-tested in {rerun:.0f} s)", flush=True)
            elapsed = summary.get(g.name, {}).get("seconds", 0.0)  # the full run's time
        else:
            print(f"[{g.name}] mutating {', '.join(g.modules)} ...", flush=True)
            elapsed = run_group(g, args.jobs)
        scores, diffs = collect(g, equivalents)
        if not args.no_diffs:
            write_survivors(g, scores, equivalents, diffs)
        summary[g.name] = {"seconds": round(elapsed), "modules": {}}
        for s in scores:
            summary[g.name]["modules"][s.module] = {
                "mutants": s.total,
                "detected": s.detected,
                "equivalent": len(s.equivalent),
                "equivalent_by_rule": sum(equivalents[n] == SQL_CASE_RULE for n in s.equivalent),
                "survived": len(s.survivors),
                "counts": s.counts,
                "score": round(s.score, 1),
                "survivors": s.survivors,
                "stale_equivalent": s.stale_equivalent,
            }
            mark = "" if s.score >= 85 else "  (below 85%)"
            failed |= s.score < 85
            by_rule = summary[g.name]["modules"][s.module]["equivalent_by_rule"]
            rule = f" ({by_rule} SQL case)" if by_rule else ""
            print(
                f"  {s.module:34} {s.score:5.1f}%  {s.detected}/{s.total - len(s.equivalent)} "
                f"detected, {len(s.survivors)} survived, {len(s.equivalent)} equivalent"
                f"{rule}{mark}"
            )
            for name in s.stale_equivalent:
                print(f"    listed as equivalent but killed: {name}")
        print(f"  (full run: {elapsed:.0f} s)", flush=True)
        WORK.mkdir(exist_ok=True)  # after each group: an interrupted run keeps what is done
        # Only this group's entry, over the file as it is now: another run of other groups
        # (each in its own folder) keeps its results, unless both write in the same instant
        # (no lock: runs end minutes apart).
        fresh = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        fresh[g.name] = summary[g.name]
        tmp = summary_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(fresh, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, summary_path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
