"""``diffviz generate`` bad input: one line on stderr, exit 2, the filesystem exactly as it was."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capture import cli
from tests.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, size, mtime and content hash."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder holding an existing valid run, a plain file and nothing else."""
    monkeypatch.chdir(tmp_path)
    write_synthetic_run(tmp_path / "old_run")
    (tmp_path / "a_file").write_text("not a folder\n")
    return tmp_path


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


GOOD = ["--prompt", "a red circle", "--num-steps", "2"]


def _cuda_available() -> bool:
    torch = pytest.importorskip("torch")
    return torch.cuda.is_available()


CASES = {
    "empty prompt": (["--prompt", "", "--output-dir", "new"], "--prompt: must not be empty"),
    "blank prompt": (["--prompt", "   ", "--output-dir", "new"], "--prompt: must not be empty"),
    "missing prompt": (["--num-steps", "2", "--output-dir", "new"], "--prompt"),
    "zero steps": (["--prompt", "a", "--num-steps", "0", "--output-dir", "new"], "--num-steps"),
    "negative steps": (["--prompt", "a", "--num-steps", "-4", "--output-dir", "new"], "--num-steps"),
    "non-int steps": (["--prompt", "a", "--num-steps", "four", "--output-dir", "new"], "--num-steps"),
    "zero resolution": (GOOD + ["--attention-resolution", "0", "--output-dir", "new"], "--attention-resolution"),
    "float resolution": (GOOD + ["--attention-resolution", "1.5", "--output-dir", "new"], "--attention-resolution"),
    "negative self resolution": (GOOD + ["--self-attention-resolution", "-16", "--output-dir", "new"],
                                 "--self-attention-resolution"),
    "text self resolution": (GOOD + ["--self-attention-resolution", "big", "--output-dir", "new"],
                             "--self-attention-resolution"),
    "unknown layer glob": (GOOD + ["--layers", "up_blocks.*,nonsense*", "--output-dir", "new"],
                           "'nonsense*' matches no layer; valid layers: down_blocks.0.attentions.0.transformer_blocks.0"),
    "missing model path": (GOOD + ["--model", "./no/such/model", "--output-dir", "new"], "does not exist"),
    "model path is a file": (GOOD + ["--model", "a_file", "--output-dir", "new"], "--model"),
    "model folder is no pipeline": (GOOD + ["--model", "old_run", "--output-dir", "new"],
                                    "old_run has no model_index.json; it is not a diffusers pipeline folder"),
    "uneven pooling, fail on shape error": (GOOD + ["--height", "40", "--attention-resolution", "4",
                                                    "--fail-on-shape-error", "--output-dir", "new"],
                                            "native grid 10x10 does not divide into 3x3"),
    "output is a file": (GOOD + ["--output-dir", "a_file"], "--output-dir: a_file exists and is not a folder"),
    "output exists, no overwrite": (GOOD + ["--output-dir", "old_run"], "pass --overwrite-output"),
    "unknown device": (GOOD + ["--device", "tpu", "--output-dir", "new"], "--device"),
    "odd height": (GOOD + ["--height", "30", "--output-dir", "new"],
                   "--height: must be a multiple of 8 for StableDiffusionPipeline, got 30"),
    "per head without cross maps": (GOOD + ["--per-head", "--no-include-cross-attention", "--output-dir", "new"],
                                    "--per-head: keeps each head's cross maps"),
    "size limit enforced": (GOOD + ["--max-dataset-mb", "0.001", "--enforce-size-limit", "--output-dir", "new"],
                            "over --max-dataset-mb"),
    "unknown words for the toy model": (["--prompt", "A purple dog.", "--output-dir", "new"],
                                        "--prompt: unknown words for the toy model: purple, dog (it knows: a, and"),
    "unknown negative word": (GOOD + ["--negative-prompt", "blurry", "--output-dir", "new"],
                              "--negative-prompt: unknown word for the toy model: blurry"),
    "unknown words, overwrite asked": (["--prompt", "a purple dog", "--output-dir", "old_run", "--overwrite-output"],
                                       "unknown words for the toy model: purple, dog"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, workdir, capsys):
    argv, expected = CASES[case]
    before = snapshot(workdir)
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("diffviz generate: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert snapshot(workdir) == before


def test_cuda_without_cuda(workdir, capsys):
    if _cuda_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid here")
    before = snapshot(workdir)
    code, out, err = run_cli(GOOD + ["--device", "cuda", "--output-dir", "new"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device: cuda was asked for" in err
    assert snapshot(workdir) == before


def test_help_exits_zero_and_lists_every_family(capsys):
    from capture.families import REGISTRY

    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())   # argparse wraps the description
    assert "--attention-resolution" in out
    assert REGISTRY and all(f"{cls} ({module})" in out for cls, module in REGISTRY.items())


def test_readme_table_of_pipeline_classes_is_the_registry():
    """The README's "Models" table is generated from the registry (capture.families.markdown_table)."""
    pytest.importorskip("torch")
    from capture.families import markdown_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- families:start -->\n", "\n<!-- families:end -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == markdown_table()


def test_subprocess_one_line_no_noise(workdir):
    """Through the real ``diffviz`` command: the unknown glob is reported after torch/diffusers import,
    with nothing else on stderr (no import notices, no progress bars, no traceback)."""
    before = snapshot(workdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "diffviz", "generate", *GOOD, "--layers", "bogus", "--output-dir", "new"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "'bogus' matches no layer" in proc.stderr, proc.stderr
    assert snapshot(workdir) == before


def test_unknown_words_are_refused_before_the_heavy_imports(workdir):
    """The toy model's refusal comes from the settings alone: no torch, no model, nothing written."""
    before = snapshot(workdir)
    code = ("import sys; from capture import cli; rc = cli.main(['--prompt', 'a purple dog', '--output-dir', 'new']); "
            "print(rc, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "unknown words for the toy model: purple, dog" in proc.stderr
    assert snapshot(workdir) == before
