"""Issues 14 and 25: `python -m export.validate` on an adversarial corpus built from a synthetic run and a synthetic
sweep (tests/hostile.py).

Each case runs in its own process (forked from one zygote, tests/hostile.py) under a 1.5 GiB address-space
cap, with strict UTF-8 stdout and a 10 s limit, and must exit with the expected code, name the problem with
the keywords, print one line per problem (at most 20 + "... and N more") and never show a traceback. For the
metadata, metrics, pca, FIFO and symlink cases, `export.reader.open_run` must raise `DatasetError` (in a
capped child of its own too, so that a regression cannot eat the test process's memory or hang it).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests import hostile

BUILD_BUDGET_S = 15.0  # both sections build in ~5 s here; generous for shared CPUs


@pytest.fixture(scope="module")
def zygote():
    with hostile.Zygote() as z:
        yield z


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    dest = tmp_path_factory.mktemp("hostile")
    start = time.monotonic()
    built = hostile.build_all(dest)
    yield built, time.monotonic() - start
    shutil.rmtree(dest, ignore_errors=True)  # ~300 MB of real data (the 200 MB prompt); sparse files cost nothing


def case_dir(corpus, case: hostile.Case) -> Path:
    built = corpus[0][case.name]
    if isinstance(built, hostile.Skip):
        pytest.skip(str(built))
    if isinstance(built, hostile.BuildFailure):
        pytest.fail(f"building {case.name} failed: {built.error}")
    return built


def test_corpus_builds_fast_and_a_valid_run_passes_under_the_cap(corpus, zygote):
    built, seconds = corpus
    assert seconds < BUILD_BUDGET_S, f"building the corpus took {seconds:.1f} s"
    failures = {k: v.error for k, v in built.items() if isinstance(v, hostile.BuildFailure)}
    assert not failures
    r = zygote.run("validate", built["valid_template"], ("--strict",))
    assert (r.rc, r.timed_out) == (0, False), r.stdout + r.stderr
    assert r.stdout.startswith("ok: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", hostile.CASES, ids=lambda c: c.name)
def test_validate_handles_hostile_run(corpus, zygote, case):
    r = zygote.run("validate", case_dir(corpus, case), case.args)
    problems = hostile.judge(case, r)
    assert not problems, f"{case.name} ({case.expected}): {'; '.join(problems)}\n--- stdout\n" \
        f"{r.stdout[:3000]}\n--- stderr\n{r.stderr[-3000:]}"


READER_CASES = [c for c in hostile.CASES if c.reader]


@pytest.mark.parametrize("case", READER_CASES, ids=lambda c: c.name)
def test_reader_raises_dataset_error(corpus, zygote, case):
    result = hostile.judge_reader_result(zygote.run("reader", case_dir(corpus, case)))
    assert not hostile.judge_reader(result), result


# ---- the sweep section (issue 25): `validate SWEEP` (or export-figure on a file:// URL), then read_index
@pytest.mark.parametrize("case", hostile.SWEEP_CASES, ids=lambda c: c.name)
def test_hostile_sweep(corpus, zygote, case):
    r, _reader_result, answer = hostile.run_case(zygote, case, case_dir(corpus, case))
    problems = hostile.judge(case, r) + (hostile.judge_reader(answer, case.reader_expect) if answer is not None else [])
    assert not problems, f"{case.name} ({case.expected}): {'; '.join(problems)}\n--- stdout\n" \
        f"{r.stdout[:3000]}\n--- stderr\n{r.stderr[-3000:]}"
