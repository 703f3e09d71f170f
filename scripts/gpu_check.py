"""Run every CUDA path of retino once and measure its speed, on a bare GPU machine, in one go.

Usage (``scripts/gpu-check.sh`` wraps it):

    python3 scripts/gpu_check.py OUTDIR                      # on the GPU machine
    python3 scripts/gpu_check.py OUTDIR --device cpu --tiny  # the dry run on a CPU
    python3 scripts/gpu_check.py make-data ../shared/data/eyepacs-256 gpu-data

What it runs (each step a ``python -m retinocli`` child with its own time limit, so one
failure costs one step, never the rest):

1. paths: ``retino train`` 2 epochs with the defaults (bf16 AMP, channels_last on CUDA);
   ``evaluate`` on the device; ``export`` from that checkpoint (parity against onnxruntime
   CPU); ``predict`` with the exported file; ``train`` under ``torchrun --nproc_per_node 1``
   (DistributedDataParallel with one process); a run interrupted with SIGINT after its first
   epoch (must exit 130 and name the ``--resume`` command), then resumed; ``--compile``
   (started first, in the background, since compiling is mostly CPU work); a batch that
   cannot fit (must be one ``error:`` line with a suggestion, exit code 2).
2. speed: ``retino bench`` (data, train, pipeline, infer, predict sections) and then its
   torch.compile rows, each with a time limit.

It writes to OUTDIR: ``paths.log`` (everything the path steps printed), ``bench.log``,
``bench.json`` (the rows of ``retino bench --json``, both bench runs merged) and
``gpu-check.json`` (machine, every step's command, exit code, seconds and checks, the rows).
It exits 0 when every path step passed, else 1; the bench never fails it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from retinocli.rundir import RunDir  # noqa: E402  (plain Python: the run folder's file names)


class Check:
    """Runs the steps, keeps the log and the record, and watches the time left."""

    def __init__(self, out: Path, budget: float):
        self.out = out
        self.work = out / "work"
        self.deadline = time.monotonic() + budget
        self.steps: list[dict] = []
        self.log = open(out / "paths.log", "w", buffering=1)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def run(self, name: str, args: list[str], *, timeout: float, expect_rc: int = 0, log=None,
            checks=None) -> dict:
        """Run ``python args``; record rc, seconds, the output's tail and ``checks(result)`` problems."""
        log = log or self.log
        limit = min(timeout, self.left())
        step = {"name": name, "command": " ".join(["python3", *args]), "expect_rc": expect_rc}
        if limit < 10:
            step.update(rc=None, ok=False, problems=["skipped: the time budget ran out"])
            self.say(f"SKIP {name}: no time left")
            self.steps.append(step)
            return step
        self.say(f"RUN  {name}: {step['command']}")
        start = time.monotonic()
        # its own process group, so a time-out also ends what it started (torchrun's workers, loaders)
        proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT, env=child_env(), start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            rc, stderr = "timeout", stderr + f"\n(killed after {limit:.0f} s)"
        step.update(rc=rc, seconds=round(time.monotonic() - start, 1))
        log.write(f"--- {name} stdout\n{stdout}\n--- {name} stderr\n{stderr}\n")
        problems = [] if rc == expect_rc else [f"exit code {rc}, expected {expect_rc}"]
        if "Traceback (most recent call last)" in stderr:
            problems.append("printed a traceback")
        if checks is not None and rc == expect_rc:
            try:
                problems += checks(stdout, stderr)
            except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check
                problems.append(f"check failed: {type(exc).__name__}: {exc}")
        step.update(ok=not problems, problems=problems, stdout_tail=stdout[-1500:], stderr_tail=stderr[-1500:])
        self.say(f"{'OK  ' if not problems else 'FAIL'} {name} ({step['seconds']} s)"
                 + ("" if not problems else ": " + "; ".join(problems)))
        self.steps.append(step)
        return step


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def child_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def machine() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    probe = ("import json, torch, torchvision, onnxruntime; print(json.dumps({'torch': torch.__version__, "
             "'torchvision': torchvision.__version__, 'cuda': torch.version.cuda, 'cudnn': "
             "torch.backends.cudnn.version(), 'onnxruntime': onnxruntime.__version__, 'providers': "
             "onnxruntime.get_available_providers(), 'gpu': torch.cuda.get_device_name(0) if "
             "torch.cuda.is_available() else None}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    info.update(json.loads(out.stdout) if out.returncode == 0 else {"probe_error": out.stderr[-500:]})
    return info


# ---------------------------------------------------------------------------- the checks


def paths(c: Check, data: Path, device: str, tiny: bool) -> None:
    runs = c.work / "runs"
    small = ["--img-size", "32", "--batch-size", "16", "--workers", "1"] if tiny else []
    train = ["-m", "retinocli", "train", "--data", str(data), "--device", device, "--project", str(runs), "--force",
             *small]
    cuda = device.startswith("cuda")

    def config_checks(name: str, **want):
        def check(stdout: str, stderr: str) -> list[str]:
            cfg = read_json(RunDir(runs / name).config)
            return [f"config.json {k} is {cfg.get(k)!r}, expected {v!r}" for k, v in want.items() if cfg.get(k) != v]
        return check

    # torch.compile spends a minute or more on the CPU: start it now, look at it at the end
    compile_log = open(c.out / "compile.log", "w")
    compile_cmd = [*train, "--epochs", "2", "--compile", "--name", "compiled", "--json"]
    c.say(f"START compile (background): python3 {' '.join(compile_cmd)}")
    compile_start = time.monotonic()
    compiled = subprocess.Popen([sys.executable, *compile_cmd], stdout=compile_log, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=child_env(), text=True, start_new_session=True)

    amp = {"amp": True, "channels_last": True, "amp_dtype": "bfloat16"} if cuda else {}
    c.run("train (defaults)", [*train, "--epochs", "2", "--name", "default", "--json"], timeout=240,
          checks=config_checks("default", **amp, augment_on="device" if cuda else "workers"))
    run = runs / "default"
    # #16: JPEG bytes decoded by nvJPEG in batches; without CUDA one error line, exit 2
    c.run("train --decode gpu", [*train, "--epochs", "1", "--decode", "gpu", "--augment-on", "device",
                                 "--name", "gpudecode", "--json"], timeout=180, expect_rc=0 if cuda else 2,
          checks=config_checks("gpudecode", decode="gpu") if cuda else None)

    def eval_checks(stdout: str, stderr: str) -> list[str]:
        d = json.loads(stdout)
        runtime = json.dumps(d)
        return [] if (not cuda or "cuda" in runtime) else ["evaluate did not run on CUDA"]

    c.run("evaluate (device)", ["-m", "retinocli", "evaluate", str(run), "--split", "val", "--device", device,
                                "--json"], timeout=180, checks=eval_checks)

    def export_checks(stdout: str, stderr: str) -> list[str]:
        d = json.loads(stdout)
        return [] if RunDir(run).model().is_file() else [f"no model.onnx ({d})"]

    c.run("export (from the device checkpoint)", ["-m", "retinocli", "export", str(run), "--json"], timeout=240,
          checks=export_checks)

    def predict_checks(stdout: str, stderr: str) -> list[str]:
        lines = (c.work / "predictions.csv").read_text().splitlines()
        want = len(list((data / "images").rglob("*.jpg")))
        return [] if len(lines) == want + 1 else [f"predictions.csv has {len(lines) - 1} rows for {want} images"]

    c.run("predict (exported model)", ["-m", "retinocli", "predict", str(data / "images"), "--model",
                                       str(RunDir(run).model()), "--out", str(c.work / "predictions.csv")],
          timeout=180, checks=predict_checks)

    c.run("torchrun --nproc_per_node 1", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                                          *train, "--epochs", "2", "--name", "ddp"],
          timeout=240, checks=config_checks("ddp", distributed=True, world_size=1))

    interrupt_and_resume(c, [*train, "--epochs", "3", "--name", "resume"], runs / "resume")

    step = {"name": "train --compile", "command": "python3 " + " ".join(compile_cmd), "expect_rc": 0}
    try:
        rc = compiled.wait(timeout=max(10.0, min(420 - (time.monotonic() - compile_start), c.left())))
    except subprocess.TimeoutExpired:
        os.killpg(compiled.pid, signal.SIGKILL)
        compiled.wait()
        rc = "timeout"
    compile_log.close()
    text = (c.out / "compile.log").read_text()
    c.log.write(f"--- train --compile (stdout and stderr)\n{text}\n")
    problems = [] if rc == 0 else [f"exit code {rc}"]
    if "Traceback (most recent call last)" in text:
        problems.append("printed a traceback")
    step.update(rc=rc, seconds=round(time.monotonic() - compile_start, 1), ok=not problems, problems=problems,
                stdout_tail=text[-1500:])
    c.say(f"{'OK  ' if not problems else 'FAIL'} train --compile ({step['seconds']} s, ran beside the steps "
          f"above){'' if not problems else ': ' + '; '.join(problems)}")
    c.steps.append(step)

    if cuda:  # after compile: the allocation must not starve a neighbour
        def oom_checks(stdout: str, stderr: str) -> list[str]:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else ""
            problems = [] if last.startswith("error:") and "out of memory" in last else [f"last line {last!r}"]
            return problems + ([] if "--batch-size" in last else ["no suggestion of a smaller --batch-size"])

        c.run("a batch that does not fit", [*train, "--epochs", "1", "--arch", "resnet152", "--img-size", "1024",
                                            "--batch-size", "384", "--augment", "none", "--name", "oom"],
              timeout=180, expect_rc=2, checks=oom_checks)
    else:
        c.steps.append({"name": "a batch that does not fit", "ok": True, "rc": None,
                        "problems": [], "note": "not run: CPU memory is not CUDA memory"})


def interrupt_and_resume(c: Check, cmd: list[str], run: Path) -> None:
    """SIGINT just after epoch 1 is saved: exit 130 naming --resume; then resume to the end."""
    step = {"name": "Ctrl-C after epoch 1", "command": "python3 " + " ".join(cmd) + "  (SIGINT after last.pt)",
            "expect_rc": 130}
    c.say(f"RUN  {step['name']}: {step['command']}")
    start = time.monotonic()
    # files, not pipes: nobody reads a pipe while this waits for last.pt
    out_file, err_file = open(c.work / "interrupt.out", "w+"), open(c.work / "interrupt.err", "w+")
    proc = subprocess.Popen([sys.executable, *cmd], stdout=out_file, stderr=err_file, text=True,
                            cwd=ROOT, env=child_env(), start_new_session=True)
    limit = min(240.0, c.left())
    while not RunDir(run).last.exists() and proc.poll() is None and time.monotonic() - start < limit:
        time.sleep(0.1)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stdout, stderr = (c.work / "interrupt.out").read_text(), (c.work / "interrupt.err").read_text()
    out_file.close()
    err_file.close()
    c.log.write(f"--- {step['name']} stdout\n{stdout}\n--- {step['name']} stderr\n{stderr}\n")
    problems = [] if proc.returncode == 130 else [f"exit code {proc.returncode}, expected 130"]
    if f"--resume {run}" not in stdout + stderr:
        problems.append("no --resume command printed")
    if "Traceback (most recent call last)" in stderr:
        problems.append("printed a traceback")
    step.update(rc=proc.returncode, seconds=round(time.monotonic() - start, 1), ok=not problems, problems=problems,
                stderr_tail=stderr[-1500:])
    c.say(f"{'OK  ' if not problems else 'FAIL'} {step['name']} ({step['seconds']} s)"
          + ("" if not problems else ": " + "; ".join(problems)))
    c.steps.append(step)

    def resumed(stdout: str, stderr: str) -> list[str]:
        rows = RunDir(run).history.read_text().splitlines()
        return [] if len(rows) == 4 else [f"history.csv has {len(rows) - 1} epochs, expected 3"]

    c.run("--resume the interrupted run", ["-m", "retinocli", "train", "--resume", str(run), "--json"],
          timeout=240, checks=resumed)


def bench(c: Check, data: Path, device: str, tiny: bool, which: list[str]) -> dict:
    """``retino bench`` without, then with, torch.compile; rows merged, ratios recomputed."""
    sys.path.insert(0, str(ROOT))
    from retinocli.reporting.bench import Row, _ratios

    log = open(c.out / "bench.log", "w", buffering=1)
    common = ["-m", "retinocli", "bench", "--device", device, "--json",
              *(["--quick"] if tiny else ["--min-seconds", "1"])]
    results = []
    cores = str(os.cpu_count() or 1)
    runs = {"main": ("bench", ["--only", "data,train,pipeline,infer,predict", "--data", str(data)], 300),
            "workers": (f"bench pipeline, {cores} workers", ["--only", "pipeline", "--data", str(data), "--arch",
                                                             "resnet18", "--workers", cores], 120),
            "compile": ("bench --compile", ["--only", "train", "--compile"], 300),
            "compile18": ("bench --compile resnet18", ["--only", "train", "--compile", "--arch", "resnet18"], 300)}
    for key in which:
        name, extra, timeout = runs[key]
        step = c.run(name, [*common, *extra], timeout=timeout, log=log)
        if step.get("rc") == 0:
            results.append(json.loads(_last_stdout(log, name)))
    rows: list[Row] = []
    seen = set()
    for res in results:
        for r in res["rows"]:
            key = (r["section"], r["name"], r["batch"], r["size"], r["threads"])
            if key not in seen:
                seen.add(key)
                rows.append(Row(**{**r, "ratio": None}))
    _ratios(rows)
    merged = {"environment": results[0]["environment"] if results else {},
              "command": " ; ".join(s["command"] for s in c.steps if s["name"].startswith("bench")),
              "notes": sorted({n for res in results for n in res["notes"]}),
              "rows": [r.__dict__ for r in rows]}
    (c.out / "bench.json").write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def _last_stdout(log, name: str) -> str:
    """The stdout of step ``name`` as written to ``log`` (the step keeps only a tail)."""
    text = Path(log.name).read_text()
    start = text.rindex(f"--- {name} stdout\n") + len(f"--- {name} stdout\n")
    return text[start:text.index(f"\n--- {name} stderr\n", start)]


def make_data(source: Path, out: Path, patients: int = 600) -> None:
    """The carried cache: ``patients`` patients (both eyes) of a Kaggle-layout set, 256 px, cropped."""
    import random
    import tempfile

    import pandas as pd

    labels = pd.read_csv(source / "trainLabels.csv")
    labels["patient"] = labels["image"].str.split("_").str[0]
    chosen = sorted(labels["patient"].unique())
    random.Random(0).shuffle(chosen)
    subset = labels[labels["patient"].isin(set(chosen[:patients]))]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train").mkdir()
        subset[["image", "level"]].to_csv(Path(tmp) / "trainLabels.csv", index=False)
        for image in subset["image"]:
            shutil.copy(source / "train" / f"{image}.jpeg", Path(tmp) / "train")
        subprocess.run([sys.executable, "-m", "retinocli", "prepare", tmp, "--out", str(out), "--size", "256",
                        "--mode", "crop", "--quality", "90", "--force"], check=True, cwd=ROOT, env=child_env())


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "make-data":
        make_data(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", type=Path, default=ROOT / "gpu-data",
                    help="a retino cache (scripts/gpu_check.py make-data); else generated on the spot")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny images, quick bench")
    ap.add_argument("--budget", type=float, default=480, help="seconds for everything")
    ap.add_argument("--bench", default="main,compile,workers",
                    help="bench runs, in order: main, compile (resnet18 and 50), compile18, workers; none: skip")
    args = ap.parse_args()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out / "work", ignore_errors=True)
    (out / "work").mkdir(parents=True, exist_ok=True)
    c = Check(out, args.budget)
    info = machine()
    c.say(f"machine: {json.dumps(info)}")
    data = args.data.resolve()
    if args.tiny or not (data / "retino-cache.json").is_file():
        # a cache of the demo images (the dry run's two cores would take minutes over the real one)
        synth = c.work / "synth"
        n, size = (160, 48) if args.tiny else (1000, 256)
        c.run("synth", ["-m", "retinocli", "synth", str(synth), "--n", str(n), "--size", str(size), "--force"],
              timeout=180)
        data = c.work / "cache"
        c.run("prepare", ["-m", "retinocli", "prepare", str(synth), "--out", str(data), "--size", str(size),
                          "--mode", "crop"], timeout=180)
    started = time.monotonic()
    paths(c, data, args.device, args.tiny)
    c.say(f"paths done in {time.monotonic() - started:.0f} s")
    record = {"machine": info, "steps": c.steps}
    (out / "gpu-check.json").write_text(json.dumps(record, indent=2) + "\n")
    which = [b for b in args.bench.split(",") if b and b != "none"]
    if which:
        record["bench"] = bench(c, data, args.device, args.tiny, which)
        record["steps"] = c.steps
    (out / "gpu-check.json").write_text(json.dumps(record, indent=2) + "\n")
    failed = [s["name"] for s in c.steps if not s.get("ok") and not s["name"].startswith("bench")]
    c.say(f"done in {time.monotonic() - started:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed
                                                            else "every path step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
