"""The CLI turns a bad config value into one line naming its key and exit status 2, whether the value is bad
on its own or against what the run directory already holds."""

import json
from pathlib import Path

import pytest

from sfpp_ray.cli import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def test_a_bad_value_is_one_line_naming_its_key(capsys):
    assert main(["train", "--config", TINY, "trainer.num_workers=two"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config key 'trainer.num_workers'") and "\n" not in err


@pytest.mark.parametrize("key,saved", [("trainer.num_workers", {"ranks": 4, "zero_stage": 2}),
                                       ("trainer.zero_stage", {"ranks": 1, "zero_stage": 3})])
def test_resuming_on_another_trainer_layout_fails_before_anything_starts(tmp_path, capsys, key, saved):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "teacher_progress.json").write_text(json.dumps({"step": 7, **saved}))
    argv = ["pretrain-teacher", "--config", TINY, f"run.output_dir={tmp_path}", "run.name=r", "trainer.num_workers=1",
            "trainer.zero_stage=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: config key '{key}'") and "step 7" in err and "\n" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["teacher_progress.json"]  # nothing started, nothing written


ROOT = Path(TINY).parents[1]
HEAVY = ("torch", "ray", "diffusers", "mlflow", "deepspeed")


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one line must name): each a bad input a user can give, with the files it needs made in tmp."""
    rng = __import__("random").Random()
    import io

    import torch

    saved = io.BytesIO()
    torch.save({"w": torch.randn(64, 64)}, saved)
    (tmp / "truncated.pt").write_bytes(saved.getvalue()[:rng.randint(100, len(saved.getvalue()) - 100)])
    (tmp / "random.pt").write_bytes(rng.randbytes(rng.randint(100, 3000)))
    (tmp / "garbage.safetensors").write_bytes(rng.randbytes(rng.randint(100, 3000)))
    (tmp / "empty_dir").mkdir()
    (tmp / "dir.gif").mkdir()
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "binary.txt").write_bytes(rng.randbytes(2000) + b"\0")
    (tmp / "latin1.txt").write_bytes(b"caf\xe9 au lait\n\xff\xfe\n")
    (tmp / "bad.yaml").write_text("trainer: {num_workers: 1\n")
    (tmp / "latin1.yaml").write_bytes(b"run: {name: caf\xe9}\n")
    gen = ["generate", "--config", TINY, "--prompt", "two red squares", "--seconds", "2", "--out", str(tmp / "v.gif")]
    with_arg = lambda name, value: [*gen[:gen.index(name) + 1], value, *gen[gen.index(name) + 2:]]  # noqa: E731
    train = ["train", "--config", TINY]
    return [
        (with_arg("--seconds", "-5"), "--seconds"),
        (with_arg("--seconds", "nan"), "--seconds"),
        (with_arg("--seconds", "five"), "--seconds"),
        (with_arg("--prompt", ""), "--prompt"),
        (with_arg("--prompt", "   "), "--prompt"),
        (gen[:3] + gen[5:], "--prompt"),  # missing
        (with_arg("--out", str(tmp / "x.avi")), "--out"),
        (with_arg("--out", str(tmp / "dir.gif")), "--out"),
        (with_arg("--out", str(tmp / "empty.txt" / "v.gif")), "--out"),
        ([*gen, "--seed", "-1"], "--seed"),
        ([*gen, "--checkpoint", str(tmp / "missing.pt")], str(tmp / "missing.pt")),
        ([*gen, "--checkpoint", str(tmp / "truncated.pt")], str(tmp / "truncated.pt")),
        ([*gen, "--checkpoint", str(tmp / "random.pt")], str(tmp / "random.pt")),
        ([*gen, "--checkpoint", str(tmp / "garbage.safetensors")], str(tmp / "garbage.safetensors")),
        ([*gen, "--checkpoint", str(tmp / "empty_dir")], str(tmp / "empty_dir")),
        (["evaluate", "--config", TINY, "--checkpoint", str(tmp / "missing_student")], str(tmp / "missing_student")),
        (["evaluate", "--config", TINY, "--checkpoint", str(tmp / "random.pt")], str(tmp / "random.pt")),
        (["serve", "--config", TINY, "--checkpoint", str(tmp / "truncated.pt")], str(tmp / "truncated.pt")),
        (["serve", "--config", TINY, "serve.port=0"], "serve.port"),
        (["train", "--config", str(tmp / "missing.yaml")], str(tmp / "missing.yaml")),
        (["train", "--config", str(tmp / "bad.yaml")], str(tmp / "bad.yaml")),
        (["train", "--config", str(tmp / "latin1.yaml")], str(tmp / "latin1.yaml")),
        ([*train, "--bogus"], "--bogus"),
        ([*train, "dmd.guidance=.nan"], "dmd.guidance"),
        ([*train, "schedule.shift=.nan"], "schedule.shift"),
        ([*train, "trainer.critic_lr=.nan"], "trainer.critic_lr"),
        ([*train, "trainer.generator_lr=-1e-4"], "trainer.generator_lr"),
        ([*train, "trainer.checkpoint_every=-1"], "trainer.checkpoint_every"),
        ([*train, "rollout.cpus_per_worker=-1"], "rollout.cpus_per_worker"),
        ([*train, "trainer.betas=[0.0"], "trainer.betas"),
        ([*train, "trainer.betas=[0.0,1.5]"], "trainer.betas"),
        ([*train, "dmd.steps=0"], "dmd.steps"),
        ([*train, "trainer.max_bad_steps=0"], "trainer.max_bad_steps"),
        ([*train, "codec.spatial_factor=-2"], "codec.spatial_factor"),  # 3 * (-2)^2 would match the 12 channels
        ([*train, "trainer.grad_clip=-1"], "trainer.grad_clip"),
        ([*train, "trainer.num_workers=two"], "trainer.num_workers"),
        ([*train, "trainer"], "trainer"),
        ([*train, f"data.prompts={tmp / 'empty.txt'}"], "data.prompts"),
        ([*train, f"data.prompts={tmp / 'binary.txt'}"], "data.prompts"),
        ([*train, f"data.prompts={tmp / 'missing.txt'}"], "data.prompts"),
        ([*train, f"data.prompts={tmp / 'latin1.txt'}"], "data.prompts"),
        ([*train, f"model.pretrained={tmp / 'truncated.pt'}"], "model.pretrained"),
        ([*train, f"student.checkpoint={tmp / 'random.pt'}"], "student.checkpoint"),
        ([*train, f"model.pretrained={tmp / 'garbage.safetensors'}"], "model.pretrained"),
        ([*train, f"model.pretrained={tmp / 'empty_dir'}"], "model.pretrained"),
    ]


def test_bad_input_is_one_line_naming_it_with_exit_2_in_under_2_seconds(tmp_path):
    """Each bad input run as a user runs it (python -m sfpp_ray, a fresh process): exit status 2, one line on
    stderr naming the argument, key or path, no traceback, nothing on stdout, in under 2 seconds of wall clock,
    start-up included (about 0.1 s each, 0.08 s of CPU). One at a time: on two cores a second process beside it
    only slows both."""
    import os
    import resource
    import subprocess
    import sys
    import time

    children_cpu = lambda: sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])  # noqa: E731
    table = bad_inputs(tmp_path)
    assert len(table) >= 20
    for argv, names in table:
        t0, cpu0 = time.perf_counter(), children_cpu()
        child = subprocess.Popen([sys.executable, "-m", "sfpp_ray", *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)})
        out, err = child.communicate(timeout=60)
        seconds, cpu = time.perf_counter() - t0, children_cpu() - cpu0
        err = err.strip()
        assert child.returncode == 2, (argv, child.returncode, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)
        assert names in err and "config key '--config'" not in err, (argv, names, err)
        assert out == "", (argv, out)
        assert seconds < 2.0, (argv, f"{seconds:.2f} s, {cpu:.2f} s of CPU", os.getloadavg())


def test_bad_input_is_refused_before_torch_ray_or_mlflow_is_imported(tmp_path):
    """The path that validates imports none of the heavy packages: every bad input of the table, through the
    CLI's main in one fresh process, leaves them out of sys.modules."""
    import os
    import subprocess
    import sys

    table = bad_inputs(tmp_path)
    script = ("import json, sys\nfrom sfpp_ray.cli import main\ncodes = []\n"
              f"for argv in {[argv for argv, _ in table]!r}:\n"
              "    try:\n        codes.append(main(argv))\n    except SystemExit as e:\n        codes.append(e.code)\n"
              f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    codes, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(table) and heavy == []


def test_a_stage_stopped_by_nans_is_one_line_naming_it(monkeypatch, capsys):
    """A stage's NonFiniteError comes back from its Ray Train worker wrapped in Ray's own errors (a worker group's
    failures, each with its traceback): the CLI finds it and prints its one line, exit status 1."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from sfpp_ray import cli
    from sfpp_ray.checks import NonFiniteError

    step = __import__("random").randint(3, 1000)
    message = f"stage dmd, step {step}: 3 steps in a row had a non-finite loss or gradient and were skipped"

    def train(args, cfg):  # what the stage's failure looks like where controller.train raises it
        try:
            raise NonFiniteError(message)
        except NonFiniteError as e:
            wrapped = UserExceptionWithTraceback(e, "Traceback (most recent call last):\n  ...\n" + message)
        raise WorkerGroupError("[Rank 0]\n" + str(wrapped), {0: wrapped})

    monkeypatch.setattr(cli, "_run", train)
    assert main(["train", "--config", TINY]) == 1
    assert capsys.readouterr().err.strip() == f"error: {message}"
    monkeypatch.setattr(cli, "_run", lambda args, cfg: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # any other failure keeps its traceback
        main(["train", "--config", TINY])
