"""The README's quick start, run the way a user runs it: each command as a subprocess in a fresh folder,
with the sizes scaled down so the whole story (data -> pretraining -> two fine-tunings -> comparison
report) takes about a minute on CPU."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALLER = {"--num_images": "48", "--num_unlabeled": "24", "--image_size": "32", "--batch_size": "16",
           "--num_epochs": "2", "--warmup_epochs": "1", "--unfreeze_after_epoch": "1", "--eval_every": "1",
           "--label_fraction": "0.3"}


def quickstart_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- quickstart --> block"
    commands = [shlex.split(line) for line in block.group(1).strip().splitlines() if line.strip()]
    for argv in commands:
        for i, token in enumerate(argv[:-1]):
            if token in SMALLER:
                argv[i + 1] = SMALLER[token]
    return commands


def run(argv, cwd):
    assert argv[0] == "python"
    cmd = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("user")
    for argv in quickstart_commands():
        result = run(argv, cwd)
        assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return cwd


def test_quickstart_runs_every_phase_and_writes_the_comparison_report(quickstart):
    data, ckpts, report = quickstart / "data" / "medical_images", quickstart / "checkpoints", quickstart / "evaluation_results"
    assert (data / "labels.csv").is_file() and (data / "preview.png").stat().st_size > 0
    for name in ("best_ssl_model.pth", "best_finetuned_model.pth", "best_baseline_model.pth"):
        assert (ckpts / name).stat().st_size > 0, name
    for name in ("report.md", "comparison.csv", "comparison.md", "roc_comparison.png"):
        assert (report / name).stat().st_size > 0, name
    table = (report / "comparison.md").read_text()
    assert "| [SSL init](" in table and "| [from scratch](" in table          # named by what they are
    verdict = (report / "report.md").read_text().splitlines()[2]            # the report's first lines say it
    assert verdict.startswith("**Verdict:** SSL pretraining ") and "paired bootstrap 95% CI" in verdict
    assert (report / "SSL_init" / "gradcam.png").stat().st_size > 0          # heat maps of each classifier
    assert "## Grad-CAM pointing game" in table and (report / "pointing_game.png").stat().st_size > 0


def test_every_script_explains_its_flags():
    benchmarks = sorted(os.path.join("benchmarks", f) for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                        if f.endswith(".py"))
    for script in ("data_loader.py", "train_ssl.py", "fine_tune.py", "evaluate.py", *benchmarks):
        result = run(["python", script, "--help"], ROOT)
        assert result.returncode == 0, result.stderr
        assert "(default:" in result.stdout, script
        text = " ".join(result.stdout.split())              # argparse wraps lines
        assert not re.search(r"\(default[ :][^)]*\) \(default:", text), f"{script}: a default said twice"


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path):
    result = run(["python", "train_ssl.py", "--data_dir", str(tmp_path / "nowhere")], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_ci_runs_exactly_the_readme_setup_commands():
    """CI must see what a new user sees: the README's install and test lines are the commands .ci/run runs."""
    block = re.search(r"<!-- setup -->\s*```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md lost its <!-- setup --> block"
    quiet = {"--quiet", "--disable-pip-version-check"}          # CI may only add flags that change no outcome
    ci = [[w for w in shlex.split(line) if w not in quiet]
          for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m ")]
    readme = [shlex.split(line) for line in block.group(1).strip().splitlines()]
    assert ci == readme
    assert "--upgrade" in block.group(1), "without --upgrade a reused machine keeps old packages (issue 25)"
