"""The import namespace: everything maskless installs lives under `maskless.`, so a user's own
train.py, ingest.py or pseudo/ (a Ray job's working directory is first on every worker's sys.path)
can never stand in for a maskless module."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_MODULES = {"train.py": "", "ingest.py": "", "core.py": "", os.path.join("pseudo", "__init__.py"): ""}


def test_no_top_level_stage_package_is_importable(tmp_path):
    code = ("import importlib.util as u, json; "
            "print(json.dumps([n for n in ('ingest', 'pseudo', 'train', 'core') if u.find_spec(n)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    out = subprocess.run([sys.executable, "-c", "import maskless.ingest.crawl, maskless.core.metrics, "
                          "maskless.core.shards as s; print(s.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == os.path.join(REPO, "core", "shards.py")


def _user_project(root: str, marker: str) -> None:
    """A user's project folder whose own train.py, ingest.py, core.py and pseudo/ record being imported."""
    for name in USER_MODULES:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"open({marker!r}, 'a').write(__name__ + '\\n')\nraise ImportError('the user module')\n")


def test_a_ray_job_from_a_folder_with_its_own_train_and_ingest_runs_maskless(tiny_world, tmp_path):
    project, marker = tmp_path / "project", str(tmp_path / "imported.txt")
    project.mkdir()
    _user_project(str(project), marker)
    out = tmp_path / "crawl"
    # what `ray job submit --working-dir .` hands the driver: its working dir as the job's runtime env,
    # so every Ray worker starts with the project folder first on sys.path
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": str(project)}})}
    cmd = [os.path.join(os.path.dirname(sys.executable), "maskless"), "crawl", "--engine", "local",
           "--local-root", tiny_world, "--keywords", "disc,square", "--images-per-query", "8",
           "--shard-size", "4", "--workers", "2", "--out", str(out), "--num-cpus", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["units"] == 2 and summary["units_run"] == 2 and not summary["units_failed"]
    assert summary["samples_per_class"]["disc"] > 0 and summary["samples_per_class"]["square"] > 0
    assert not os.path.exists(marker), open(marker).read()
