"""The README's quick start, run the way a user runs it: `bash quickstart.sh` in a fresh folder, with the
sizes scaled down so the whole story (data -> pretraining -> two fine-tunings -> comparison report) takes
about a minute on CPU; and the phase commands the README shows are the ones the script ran."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# quickstart.sh's size knobs at the tests' size, and the README flags each one sets
TINY = {"IMAGES": "48", "UNLABELED": "24", "SIZE": "32", "SSL_EPOCHS": "2", "FT_STEPS": "2"}
FLAG_OF = {"--num_images": "IMAGES", "--num_unlabeled": "UNLABELED", "--image_size": "SIZE", "--num_epochs": "SSL_EPOCHS",
           "--num_steps": "FT_STEPS"}


def readme_block(marker: str) -> str:
    block = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, f"README.md lost its <!-- {marker} --> block"
    return block.group(1)


def readme_phase_commands() -> list[list[str]]:
    """The README's phase commands with the sizes quickstart.sh gets from TINY."""
    commands = [shlex.split(line) for line in readme_block("quickstart").strip().splitlines() if line.strip()]
    for argv in commands:
        for i, token in enumerate(argv[:-1]):
            if token in FLAG_OF:
                argv[i + 1] = TINY[FLAG_OF[token]]
    return commands


def as_typed(argv: list[str]) -> list[str]:
    """A command quickstart.sh printed, as a user in the repository types it ('python script.py ...')."""
    script = Path(argv[1])
    return ["python", str(script.relative_to(ROOT)) if script.is_absolute() else str(script), *argv[2:]]


def run(argv, cwd):
    assert argv[0] == "python"
    cmd = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("user")
    env = {**os.environ, **TINY, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    result = subprocess.run(["bash", str(ROOT / "quickstart.sh")], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return cwd, result.stdout


def test_the_readme_shows_the_one_command_and_the_phases_it_runs(quickstart):
    assert "bash quickstart.sh" in readme_block("quickstart-one")
    ran = [as_typed(shlex.split(line[2:])) for line in quickstart[1].splitlines() if line.startswith("$ ")]
    assert ran == readme_phase_commands()
    assert [line for line in quickstart[1].splitlines() if line.startswith("== phase")] == [
        f"== phase {i}/5: {t}" for i, t in enumerate(("synthetic chest X-rays", "SimCLR pretraining",
            "fine-tuning from the SSL encoder on 5% of the labels",
            "the same fine-tuning from scratch (the baseline)", "evaluation of both on the held-out test split"), 1)]


def test_quickstart_runs_every_phase_and_ends_with_the_report_and_its_comparison(quickstart):
    cwd, out = quickstart
    data, ckpts, report = cwd / "data" / "medical_images", cwd / "checkpoints", cwd / "evaluation_results"
    assert (data / "labels.csv").is_file() and (data / "preview.png").stat().st_size > 0
    for name in ("best_ssl_model.pth", "best_finetuned_model.pth", "best_baseline_model.pth"):
        assert (ckpts / name).stat().st_size > 0, name
    for name in ("report.md", "comparison.csv", "comparison.md", "roc_comparison.png"):
        assert (report / name).stat().st_size > 0, name
    table = (report / "comparison.md").read_text()
    assert "| [SSL init](" in table and "| [from scratch](" in table          # named by what they are
    verdict = (report / "report.md").read_text().splitlines()[2]            # the report's first lines say it
    assert verdict.startswith("**Verdict** (primary metric: balanced accuracy): this SSL-initialised model (SSL init) "
                              "vs this from-scratch model (from scratch) on these ")
    assert " test patients (" in verdict and "paired bootstrap over the patients, 95% CI" in verdict
    assert (report / "SSL_init" / "gradcam.png").stat().st_size > 0          # heat maps of each classifier
    assert "## Grad-CAM pointing game" in table and (report / "pointing_game.png").stat().st_size > 0
    tail = out[out.index("== done in"):]                                     # the one command ends with the verdict
    assert "Report: ./evaluation_results/report.md" in tail
    assert "**Verdict** (primary metric: balanced accuracy): this SSL-initialised model (SSL init)" in tail


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
    block = readme_block("setup")
    quiet = {"--quiet", "--disable-pip-version-check"}          # CI may only add flags that change no outcome
    ci = [[w for w in shlex.split(line) if w not in quiet]
          for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m ")]
    readme = [shlex.split(line) for line in block.strip().splitlines()]
    assert ci == readme
    assert "--upgrade" in block, "without --upgrade a reused machine keeps old packages (issue 25)"


def github_anchor(heading: str) -> str:
    """The #fragment GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_short_guide_whose_links_reach_their_tables():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 15_000
    for marker in ("after-training", "multilabel"):
        assert f"<!-- {marker} -->" in text
    links = re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#([\w-]+))?\)", text)
    assert links
    for path, anchor in links:
        target = ROOT / path
        assert target.is_file(), path
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"{path}#{anchor}"
